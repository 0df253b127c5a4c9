"""Temporal consistency for the automatic protocol: decide each class's presence over consecutive frames.

The automatic protocol (EndoVis protocol, model card) decides frame by frame that a class is present when
its mask (logits > 0) covers at least ``min_mask_fraction`` of the frame. On video that decision flickers:
a class comes and goes for single frames, which reads as the instrument changing type.
:class:`TemporalPresence` replaces it, causally (one frame in, one decision out, constant memory), by

- hysteresis on the mask fraction: an absent class turns on at ``on_fraction``, a present one stays on
  down to ``off_fraction`` (<= ``on_fraction``);
- a minimum run length: the decision changes only after the hysteresis has said the other thing for
  ``min_run`` consecutive frames (a change is reported ``min_run - 1`` frames late).

With ``on_fraction == off_fraction == min_mask_fraction`` and ``min_run == 1`` it is the frame-by-frame
rule exactly. :func:`class_switches` counts how often classes appear or vanish between consecutive label
maps; :func:`evaluate_temporal` measures both rules on held-out videos of a prepared dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class TemporalPresence:
    """Per-class presence over a sequence of frames (see the module docstring).

    Args:
        num_classes: C.
        on_fraction: mask fraction at which an absent class becomes present.
        off_fraction: mask fraction below which a present class becomes absent (None: ``on_fraction``).
        min_run: consecutive frames a change must persist before it is taken (1: at once).
    """

    def __init__(
        self, num_classes: int, on_fraction: float, off_fraction: float | None = None, min_run: int = 1
    ) -> None:
        off_fraction = on_fraction if off_fraction is None else off_fraction
        if not 0.0 <= float(off_fraction) <= float(on_fraction) < 1.0:
            raise ValueError(f"need 0 <= off_fraction <= on_fraction < 1, got on {on_fraction}, off {off_fraction}")
        if int(min_run) < 1:
            raise ValueError(f"min_run must be >= 1, got {min_run}")
        self.num_classes, self.min_run = int(num_classes), int(min_run)
        self.on_fraction, self.off_fraction = float(on_fraction), float(off_fraction)
        self.reset()

    def reset(self) -> None:
        """Forget the sequence so far (a new video starts with every class absent)."""
        self.present = torch.zeros(self.num_classes, dtype=torch.bool)
        self.pending = torch.zeros(self.num_classes, dtype=torch.long)

    @staticmethod
    def _min_pixels(fraction: float, area: int) -> int:
        return max(1, math.ceil(fraction * area))

    def update_counts(self, pixels: torch.Tensor, area: int) -> torch.Tensor:
        """Mask pixel counts (B, C) of B consecutive frames of ``area`` pixels -> presence (B, C) bool."""
        on_pixels, off_pixels = self._min_pixels(self.on_fraction, area), self._min_pixels(self.off_fraction, area)
        decisions = []
        for row in pixels.detach().cpu():
            wanted = torch.where(self.present, row >= off_pixels, row >= on_pixels)
            changed = wanted != self.present
            self.pending = torch.where(changed, self.pending + 1, torch.zeros_like(self.pending))
            flip = self.pending >= self.min_run
            self.present = torch.where(flip, wanted, self.present)
            self.pending[flip] = 0
            decisions.append(self.present.clone())
        return torch.stack(decisions).to(pixels.device)

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """Binary masks (B, C, H, W) of B consecutive frames -> presence (B, C) bool."""
        return self.update_counts(masks.flatten(2).sum(-1), int(masks.shape[-2]) * int(masks.shape[-1]))

    def describe(self) -> dict:
        return {"on_fraction": self.on_fraction, "off_fraction": self.off_fraction, "min_run": self.min_run}


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
    from ..data.layout import class_names as dataset_class_names
    from ..data.layout import load_datalist, read_dataset_description
    from ..evaluation.label_map import merge_class_masks
    from ..evaluation.metrics import endovis_metrics, frame_statistics

    description = read_dataset_description(dataset_dir)
    names = dataset_class_names(description)
    num_classes = len(names)
    ignore_index = description.get("ignore_index", 255)
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
        from .onnx_backend import load_model_file

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
