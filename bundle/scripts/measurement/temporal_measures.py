"""Temporal-consistency measures of the presence rules (:class:`scripts.deploy.temporal.TemporalPresence`).

:func:`class_switches` counts how often classes appear or vanish between consecutive label maps;
:func:`evaluate_temporal` measures several rules on held-out videos of a prepared dataset, and
:func:`temporal_report` is video_measures.yaml's ``temporal_table``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def classes_shown(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (H, W), values 0..C -> (C,) bool, the classes it shows."""
    counts = torch.bincount(torch.as_tensor(label_map).flatten().long().cpu(), minlength=num_classes + 1)
    return counts[1 : num_classes + 1] > 0


def class_switches(label_maps: Sequence[torch.Tensor], num_classes: int) -> int:
    """Times a class appears in or vanishes from consecutive label maps (each (H, W), values 0..C)."""
    switches, previous = 0, None
    for label_map in label_maps:
        present = classes_shown(label_map, num_classes)
        if previous is not None:
            switches += int((present != previous).sum())
        previous = present
    return switches


def switches_per_100_frames(switches: int, transitions: int) -> float:
    return 100.0 * switches / transitions if transitions else float("nan")


def evaluate_temporal(
    network, dataset_dir: str, rules: dict, split: str = "validation", pairs_per_pass: int = 32
) -> dict:
    """Automatic-protocol metrics and class switches of several presence rules on a dataset's videos.

    Each sequence of ``split`` is run in frame order (the network once per frame); every rule decides
    presence from the same masks and the label map is merged by quality as the automatic protocol does.

    Args:
        network: a model with ``predict_classes`` (SurgicalSAM with its image encoder, or the ONNX backend).
        dataset_dir: a prepared dataset (dataset.json; frames with ``sequence`` and ``frame`` fields).
        rules: ``{name: TemporalPresence}`` (a frame-by-frame rule is ``TemporalPresence(C, f, f, 1)``).
        split: the dataset split to run.

    Returns:
        ``{name: {"iou", "challenge_iou", "mc_iou", "switches_per_100_frames", "switches", "frames",
        "sequences", "rule"}}``.
    """
    import os

    from ..data.frame_files import read_frame, read_label_map
    from ..data.layout import DEFAULT_IGNORE_INDEX, load_datalist, read_dataset_description
    from ..data.layout import class_names as dataset_class_names
    from ..evaluation.label_map import merge_class_masks
    from ..evaluation.metrics import endovis_metrics, frame_statistics

    description = read_dataset_description(dataset_dir)
    names = dataset_class_names(description)
    num_classes = len(names)
    ignore_index = description.get("ignore_index", DEFAULT_IGNORE_INDEX)
    sequences: dict[str, list[dict]] = {}
    for item in load_datalist(dataset_dir, split):
        sequences.setdefault(str(item.get("sequence", "")), []).append(item)
    stats = {name: [] for name in rules}
    switches = {name: 0 for name in rules}
    transitions = 0
    class_ids = torch.arange(1, num_classes + 1)
    for items in sequences.values():
        items = sorted(items, key=lambda item: str(item.get("frame", item["image"])))
        for rule in rules.values():
            rule.reset()
        previous = {name: None for name in rules}
        for item in items:
            image_path = item["image"] if os.path.isabs(item["image"]) else os.path.join(dataset_dir, item["image"])
            label_path = item["label"] if os.path.isabs(item["label"]) else os.path.join(dataset_dir, item["label"])
            frame = torch.from_numpy(read_frame(image_path)).permute(2, 0, 1)[None].float()
            gt = torch.as_tensor(read_label_map(label_path, num_classes, ignore_index)).long()
            with torch.no_grad():
                logits, quality = network.predict_classes(
                    frame, torch.ones(1, num_classes, dtype=torch.bool), pairs_per_pass=pairs_per_pass
                )
            masks = logits > 0
            for name, rule in rules.items():
                present = rule(masks)[0]
                label_map = merge_class_masks(masks[0][present], class_ids[present], quality[0][present])
                stats[name].append(frame_statistics(label_map, gt, num_classes, ignore_index))
                shown = classes_shown(label_map, num_classes)
                if previous[name] is not None:
                    switches[name] += int((shown != previous[name]).sum())
                previous[name] = shown
        transitions += max(0, len(items) - 1)
    results = {}
    for name, rule in rules.items():
        metrics = endovis_metrics(stats[name], names)
        results[name] = {
            "iou": metrics["iou"],
            "challenge_iou": metrics["challenge_iou"],
            "mc_iou": metrics["mc_iou"],
            "switches": switches[name],
            "switches_per_100_frames": switches_per_100_frames(switches[name], transitions),
            "frames": sum(len(items) for items in sequences.values()),
            "sequences": len(sequences),
            "rule": rule.describe(),
        }
    return results


def temporal_report(
    network,
    model_file: str | None,
    dataset_dir: str,
    rules: dict,
    output_file: str | None = None,
    split: str = "validation",
) -> dict:
    """video_measures.yaml's ``temporal_table``: load ``model_file`` into ``network`` (SurgicalSAM with its
    image encoder), run :func:`evaluate_temporal` and write the results as JSON to ``output_file``."""
    import json
    import os

    if model_file:
        from ..deploy.onnx_backend import load_model_file

        load_model_file(network, model_file)
    network = network.cpu().eval()
    results = evaluate_temporal(network, dataset_dir, rules, split=split)
    if output_file:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w") as handle:
            json.dump({"dataset": os.path.abspath(dataset_dir), "split": split, "results": results}, handle, indent=2)
    for name, result in results.items():
        print(
            f"{name:>12}: IoU {result['iou']:.2f}, Challenge IoU {result['challenge_iou']:.2f}, class switches per "
            f"100 frames {result['switches_per_100_frames']:.1f} ({result['frames']} frames, {result['rule']})"
        )
    return results
