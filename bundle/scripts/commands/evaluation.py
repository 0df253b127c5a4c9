"""The commands that score: label-map folders against ground truth, and the folds of a cross-validation pooled."""

from __future__ import annotations

import os
from typing import Any

from .registry import command, existing_dir, fail, name_list


# ------------------------------------------------------------------------------------------------ score
@command(ValueError, OSError)
def score(
    pred_dir: str,
    gt_dir: str,
    dataset_dir: str | None = None,
    class_names: Any = None,
    protocol: str = "auto",
    output_file: str | None = "metrics.json",
    ignore_index: int | None = None,
) -> dict:
    """Score a folder of predicted PNG label maps against ground truth (the EndoVis/ISINet protocol).

    Args:
        pred_dir: predicted label maps (0 = background, 1..C), paired with gt_dir by relative path.
        gt_dir: ground-truth label maps.
        dataset_dir: a prepared dataset whose dataset.json gives the class names (and ignore index).
        class_names: the C class names, comma separated (instead of dataset_dir).
        protocol: ``auto`` (every frame has an entry) or ``oracle`` (frames without instruments have none).
        output_file: where to write the metrics as JSON; None to write nothing.
        ignore_index: ground-truth value to ignore (default: dataset.json's, else 255).

    Returns:
        the metrics dict (see scripts.evaluation.metrics.score_label_map_folders).
    """
    from scripts.data.layout import DEFAULT_IGNORE_INDEX, read_dataset_description
    from scripts.data.layout import class_names as description_class_names
    from scripts.evaluation.metrics import PROTOCOLS, score_label_map_folders
    from scripts.evaluation.report import format_metrics_table

    pred_folder = existing_dir(pred_dir, "pred_dir")
    gt_folder = existing_dir(gt_dir, "gt_dir")
    if protocol not in PROTOCOLS:
        raise fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    if dataset_dir is not None and class_names is not None:
        raise fail("pass either --dataset_dir or --class_names, not both.")
    description_ignore = None
    if class_names is not None:
        names = name_list(class_names)
    elif dataset_dir is not None:
        description = read_dataset_description(existing_dir(dataset_dir, "dataset_dir"))
        names = description_class_names(description)
        description_ignore = description.get("ignore_index")
    else:
        raise fail(
            "the class names are needed: pass --dataset_dir DIR (a prepared dataset with dataset.json) "
            "or --class_names 'name 1,name 2,...' (label values 1..C in order)."
        )
    if ignore_index is None:
        ignore_index = DEFAULT_IGNORE_INDEX if description_ignore is None else int(description_ignore)
    if output_file == "":
        output_file = None
    result = score_label_map_folders(
        pred_folder, gt_folder, names, ignore_index=ignore_index, protocol=protocol, output_file=output_file
    )
    table = {
        "protocol": result.get("protocol"),
        "num_frames": result.get("num_frames"),
        **{key: result.get(key) for key in ("challenge_iou", "iou", "mc_iou", "miou")},
        "class_iou": result.get("class_iou"),
    }
    print(format_metrics_table(table))
    missing = result.get("missing_predictions") or []
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"  {len(missing)} ground-truth file(s) had no prediction and count as empty: {shown}")
    if output_file is not None:
        print(f"metrics written to {os.path.abspath(str(output_file))}")
    return result


@command(ValueError, OSError)
def pool_metrics(inputs: Any, output: str | None = "pooled_metrics.json") -> dict:
    """Pool the evaluations of several folds (EndoVis2017 4-fold cross-validation, as the SurgicalSAM paper reports it).

    Pooled numbers run over all frames of all folds (per-frame lists concatenated, cumulative I/U summed),
    not a mean of the per-fold numbers. Each input is a metrics.json with the frame_stats.json that
    evaluation writes beside it (or that frame_stats.json itself).

    Args:
        inputs: comma-separated paths.
        output: where to write the pooled metrics (JSON); "" to write nothing.
    """
    from scripts.evaluation.metrics import json_safe
    from scripts.evaluation.pooling import pool_frame_statistics
    from scripts.evaluation.report import format_pooled_table
    from scripts.files import atomic_write_json

    paths = [p.strip() for p in inputs.split(",")] if isinstance(inputs, str) else [str(p) for p in (inputs or [])]
    paths = [p for p in paths if p]
    if not paths:
        raise fail("--inputs needs the metrics.json of each fold, comma separated.")
    result = pool_frame_statistics(paths)
    print(format_pooled_table(result))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        print(f"pooled metrics written to {os.path.abspath(atomic_write_json(output, json_safe(result)))}")
    return result
