"""EndoVis / ISINet evaluation protocol (as ISINet and SurgicalSAM evaluate).

Per frame, class-promptable predictions (one binary mask, class and quality per prompt) are merged into a
label map (:func:`~scripts.evaluation.label_map.merge_class_masks`); each (prediction, ground truth) pair of label maps is reduced to a
small per-class table (:func:`frame_statistics`); the tables of all frames give Challenge IoU, IoU, mean
class IoU and cumulative mIoU (:func:`endovis_metrics`). :class:`EndoVisMetric` wraps this for ignite /
MONAI evaluators and :func:`score_label_map_folders` scores folders of PNG label maps.

All metrics are percentages. A metric whose list of values is empty is ``float('nan')`` (e.g. Challenge IoU
when no evaluated frame has an instrument in its ground truth); a class without any entry has ``None`` as
class IoU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from ..data.layout import DEFAULT_IGNORE_INDEX

__all__ = [
    "frame_statistics",
    "endovis_metrics",
    "EndoVisMetric",
    "score_label_map_folders",
    "read_label_map",
    "METRIC_KEYS",
    "SCALAR_METRIC_KEYS",
    "PROTOCOLS",
    "json_safe",
    "frame_statistics_record",
]

# Columns of the per-frame statistics table returned by :func:`frame_statistics`.
INTERSECTION, UNION, PRED_HAS_CLASS, GT_HAS_CLASS = range(4)
NUM_STATISTICS = 4
#: The four scalar metrics (percentages), in the order every table prints them.
SCALAR_METRIC_KEYS = ("challenge_iou", "iou", "mc_iou", "miou")
METRIC_KEYS = SCALAR_METRIC_KEYS + ("class_iou", "num_frames")
#: The prompting protocols (see scripts.surgical_sam.inferer): the paper's ``oracle`` first.
PROTOCOLS = ("oracle", "auto")
#: File beside metrics.json holding the per-frame statistics that folds are pooled from.
FRAME_STATS_FILE = "frame_stats.json"
FRAME_STATS_FORMAT = 1


def _as_long_tensor(label_map: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(label_map, np.ndarray):
        label_map = torch.from_numpy(np.ascontiguousarray(label_map).astype(np.int64))
    return label_map.long()


def frame_statistics(
    pred_map: torch.Tensor | np.ndarray,
    gt_map: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
) -> torch.Tensor:
    """Per-class statistics of one frame.

    Pixels where ``gt_map == ignore_index`` are removed from both maps before counting.

    Args:
        pred_map: (H, W) integer predicted label map with values in 0..C.
        gt_map: (H, W) integer ground-truth label map with values in 0..C or ``ignore_index``.
        num_classes: C, the number of instrument classes (label values 1..C).
        ignore_index: ground-truth value of pixels to ignore; None ignores nothing.

    Returns:
        (C, 4) float64 tensor; row ``c - 1`` holds ``[|p & g|, |p | g|, p.any(), g.any()]`` for
        ``p = (P == c)`` and ``g = (G == c)``.

    Raises:
        ValueError: on shape mismatch or label values outside the ranges above.
    """
    pred_map, gt_map = _as_long_tensor(pred_map), _as_long_tensor(gt_map)
    if pred_map.shape != gt_map.shape:
        raise ValueError(f"prediction shape {tuple(pred_map.shape)} differs from ground truth {tuple(gt_map.shape)}.")
    if ignore_index is not None:
        kept = gt_map != ignore_index
        pred_map, gt_map = pred_map[kept], gt_map[kept]
    pred_map, gt_map = pred_map.reshape(-1), gt_map.reshape(-1)
    for name, values in (("prediction", pred_map), ("ground truth", gt_map)):
        bad = values[(values < 0) | (values > num_classes)]
        if bad.numel() > 0:
            raise ValueError(
                f"{name} label map has values {sorted(set(bad.unique().tolist()))} outside 0..{num_classes}"
                + (f" (ignore value {ignore_index})." if ignore_index is not None else ".")
            )
    bins = num_classes + 1
    intersection = torch.bincount(gt_map[pred_map == gt_map], minlength=bins)
    pred_count = torch.bincount(pred_map, minlength=bins)
    gt_count = torch.bincount(gt_map, minlength=bins)
    union = pred_count + gt_count - intersection
    statistics = torch.stack([intersection, union, (pred_count > 0).long(), (gt_count > 0).long()], dim=1)
    return statistics[1:].to(device="cpu", dtype=torch.float64)


def _nan_mean_percent(values: list[float]) -> float:
    return 100.0 * float(np.mean(values)) if values else float("nan")


def endovis_metrics(
    stats: Sequence[torch.Tensor] | torch.Tensor,
    class_names: Sequence[str],
    has_entry: Sequence[bool] | torch.Tensor | None = None,
) -> dict[str, Any]:
    """EndoVis / ISINet metrics from per-frame statistics, following ISINet's evaluation code exactly.

    A frame without an entry (``has_entry`` False) is skipped. For an evaluated frame whose prediction has
    no instrument pixel: if its ground truth has one, 0 is added to the IoU and Challenge IoU lists and to
    the list of every class present in the ground truth; otherwise it adds nothing. For any other frame,
    each class present in the prediction or the ground truth adds ``I/U`` to its class list and to the
    frame's IoU average (and to the frame's Challenge average when present in the ground truth), and its
    ``I`` and ``U`` to the cumulative sums.

    Args:
        stats: N tables of shape (C, 4) from :func:`frame_statistics`, or one (N, C, 4) tensor.
        class_names: C class names (label values 1..C in order).
        has_entry: (N,) bool, whether each frame has a prediction entry; None means all frames do.

    Returns:
        dict with ``"challenge_iou"``, ``"iou"``, ``"mc_iou"`` (mean of the class IoUs that have entries),
        ``"miou"`` (cumulative intersection over cumulative union), all python floats in percent or
        ``nan`` when nothing contributes, ``"class_iou"`` ({name: percent or None when the class has no
        entry}) and ``"num_frames"`` (the number of evaluated frames).
    """
    if isinstance(stats, torch.Tensor):
        table = stats.detach().to("cpu", torch.float64)
    else:
        num_classes_hint = len(class_names)
        table = (
            torch.stack([torch.as_tensor(s, dtype=torch.float64).cpu() for s in stats])
            if len(stats) > 0
            else torch.zeros(0, num_classes_hint, NUM_STATISTICS, dtype=torch.float64)
        )
    num_classes = len(class_names)
    if table.ndim != 3 or table.shape[1:] != (num_classes, NUM_STATISTICS):
        raise ValueError(f"stats must be (N, {num_classes}, {NUM_STATISTICS}), got shape {tuple(table.shape)}.")
    if has_entry is None:
        entries = [True] * table.shape[0]
    else:
        entries = [bool(flag) for flag in torch.as_tensor(has_entry).reshape(-1).tolist()]
        if len(entries) != table.shape[0]:
            raise ValueError(f"has_entry has {len(entries)} values for {table.shape[0]} frames.")

    iou_list: list[float] = []
    challenge_list: list[float] = []
    class_lists: list[list[float]] = [[] for _ in range(num_classes)]
    cumulative_intersection = 0.0
    cumulative_union = 0.0
    num_frames = 0
    for frame, has_frame_entry in zip(table.numpy(), entries):
        if not has_frame_entry:
            continue
        num_frames += 1
        pred_has = frame[:, PRED_HAS_CLASS] > 0
        gt_has = frame[:, GT_HAS_CLASS] > 0
        if not pred_has.any():
            if gt_has.any():
                iou_list.append(0.0)
                challenge_list.append(0.0)
                for class_index in np.flatnonzero(gt_has):
                    class_lists[class_index].append(0.0)
            continue
        frame_ious: list[float] = []
        frame_challenge_ious: list[float] = []
        for class_index in np.flatnonzero(pred_has | gt_has):
            intersection = float(frame[class_index, INTERSECTION])
            union = float(frame[class_index, UNION])
            class_iou = intersection / union
            frame_ious.append(class_iou)
            cumulative_intersection += intersection
            cumulative_union += union
            class_lists[class_index].append(class_iou)
            if gt_has[class_index]:
                frame_challenge_ious.append(class_iou)
        if frame_ious:
            iou_list.append(float(np.mean(frame_ious)))
        if frame_challenge_ious:
            challenge_list.append(float(np.mean(frame_challenge_ious)))

    class_iou = {
        name: (_nan_mean_percent(values) if values else None) for name, values in zip(class_names, class_lists)
    }
    class_values = [value for value in class_iou.values() if value is not None]
    return {
        "challenge_iou": _nan_mean_percent(challenge_list),
        "iou": _nan_mean_percent(iou_list),
        "mc_iou": float(np.mean(class_values)) if class_values else float("nan"),
        "miou": 100.0 * cumulative_intersection / cumulative_union if cumulative_union > 0 else float("nan"),
        "class_iou": class_iou,
        "num_frames": num_frames,
    }


class EndoVisMetric(Metric):
    """Ignite metric computing :func:`endovis_metrics` over an epoch.

    ``update`` takes ``(pred_maps, gt_maps, has_entry)`` (``has_entry`` may be omitted or None, meaning
    every frame has an entry): ``pred_maps`` and ``gt_maps`` are (B, H, W) or (B, 1, H, W) integer label
    maps and ``has_entry`` is (B,) bool. Only the per-frame (C, 4) statistics are kept, and they are
    gathered across processes in ``compute``.

    ``compute`` returns the dict of :func:`endovis_metrics`. When attached, every key of that dict is written
    to ``engine.state.metrics``; if the metric is attached under one of those keys (e.g. ``"challenge_iou"``)
    that entry holds the scalar, so MONAI evaluators can use it as key metric; otherwise the whole dict is
    also stored under the attached name.

    Args:
        num_classes: C, the number of instrument classes (label values 1..C).
        class_names: C names; default ``"class_1"``, ..., ``"class_C"``.
        ignore_index: ground-truth value of pixels to ignore; None ignores nothing.
        output_transform: maps the engine output to ``(pred_maps, gt_maps[, has_entry])``.
        device: device on which the statistics are stored and gathered.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = DEFAULT_IGNORE_INDEX,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(1, num_classes + 1)]
        )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.num_classes} classes.")
        self.ignore_index = ignore_index
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._frame_rows: list[torch.Tensor] = []

    @staticmethod
    def _squeeze_channel(label_maps: torch.Tensor) -> torch.Tensor:
        label_maps = torch.as_tensor(label_maps)
        if label_maps.ndim == 4 and label_maps.shape[1] == 1:
            label_maps = label_maps[:, 0]
        if label_maps.ndim != 3:
            raise ValueError(f"label maps must be (B, H, W) or (B, 1, H, W), got shape {tuple(label_maps.shape)}.")
        return label_maps

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        if len(output) == 2:
            pred_maps, gt_maps = output
            has_entry = None
        else:
            pred_maps, gt_maps, has_entry = output
        pred_maps, gt_maps = self._squeeze_channel(pred_maps), self._squeeze_channel(gt_maps)
        if pred_maps.shape[0] != gt_maps.shape[0]:
            raise ValueError(f"{pred_maps.shape[0]} predictions for {gt_maps.shape[0]} ground truths.")
        if has_entry is None:
            has_entry = torch.ones(pred_maps.shape[0], dtype=torch.bool)
        has_entry = torch.as_tensor(has_entry).reshape(-1).cpu()
        if has_entry.shape[0] != pred_maps.shape[0]:
            raise ValueError(f"has_entry has {has_entry.shape[0]} values for {pred_maps.shape[0]} frames.")
        for pred_map, gt_map, entry in zip(pred_maps, gt_maps, has_entry.tolist()):
            statistics = frame_statistics(pred_map, gt_map, self.num_classes, self.ignore_index)
            row = torch.cat([statistics.reshape(-1), torch.tensor([float(entry)], dtype=torch.float64)])
            self._frame_rows.append(row.to(self._device))

    def _gathered_rows(self) -> torch.Tensor:
        row_length = self.num_classes * NUM_STATISTICS + 1
        rows = (
            torch.stack(self._frame_rows)
            if self._frame_rows
            else torch.zeros(0, row_length, dtype=torch.float64, device=self._device)
        )
        if idist.get_world_size() > 1:
            counts = idist.all_gather(rows.shape[0])
            counts = [int(count) for count in torch.as_tensor(counts).reshape(-1).tolist()]
            rows = torch.cat(idist.all_gather_tensors_with_shapes(rows, [[count, row_length] for count in counts]))
        return rows.cpu()

    def compute(self) -> dict[str, Any]:
        rows = self._gathered_rows()
        stats = rows[:, :-1].reshape(-1, self.num_classes, NUM_STATISTICS)
        return endovis_metrics(stats, self.class_names, rows[:, -1] > 0)

    def frame_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame statistics gathered so far: (N, C, 4) float64 and has_entry (N,) bool."""
        rows = self._gathered_rows()
        return rows[:, :-1].reshape(-1, self.num_classes, NUM_STATISTICS), rows[:, -1] > 0

    def completed(self, engine: Engine, name: str) -> None:
        result = self.compute()
        for key, value in result.items():
            engine.state.metrics[key] = value
        if name not in result:
            engine.state.metrics[name] = result
        # The per-frame table, for MetricsReport to write (pooling folds needs it). Not in state.metrics:
        # StatsHandler would print it.
        stats, has_entry = self.frame_statistics()
        engine.state.endovis_frame_statistics = frame_statistics_record(stats, has_entry, self.class_names)


def read_label_map(path: str | Path) -> np.ndarray:
    """Read a single-channel PNG label map (modes ``1``, ``L``, ``P``, ``I``, ``I;16``...) as an int64 array."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
            raise ValueError(f"{path}: expected a single-channel label map, got PNG mode {image.mode!r}.")
        array = np.array(image)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D label map, got shape {array.shape}.")
    return array.astype(np.int64)


def _png_files(folder: Path) -> dict[str, Path]:
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*.png")) if path.is_file()}


def json_safe(value: Any) -> Any:
    """``value`` with every ``nan`` (in nested dicts, lists and tuples) replaced by None, for JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def score_label_map_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    class_names: Sequence[str],
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
    protocol: str = "auto",
    output_file: str | Path | None = None,
) -> dict[str, Any]:
    """Score a folder of predicted PNG label maps against a folder of ground-truth PNG label maps.

    Files are paired by path relative to their folder (searched recursively). A ground-truth file without a
    prediction counts as an empty prediction and is listed in ``"missing_predictions"``.

    Args:
        pred_dir: folder of predicted label maps (values 0..C).
        gt_dir: folder of ground-truth label maps (values 0..C or ``ignore_index``).
        class_names: C class names (label values 1..C).
        ignore_index: ground-truth value of pixels to ignore; None ignores nothing.
        protocol: ``"oracle"``: frames whose ground truth has no instrument have no entry (the paper's
            protocol, where such frames get no prompt); ``"auto"``: every frame has an entry.
        output_file: when given, the result is written there as JSON (``nan`` written as ``null``).

    Returns:
        the dict of :func:`endovis_metrics` plus ``"protocol"``, ``"class_names"`` and
        ``"missing_predictions"`` (sorted relative paths).

    Raises:
        ValueError: unknown protocol, no ground-truth file, predictions without ground truth, size
            mismatch, or label values out of range (the message names the file).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    class_names = list(class_names)
    num_classes = len(class_names)
    pred_files, gt_files = _png_files(Path(pred_dir)), _png_files(Path(gt_dir))
    if not gt_files:
        raise ValueError(f"no PNG label map found under {gt_dir}.")
    unmatched = sorted(set(pred_files) - set(gt_files))
    if unmatched:
        raise ValueError(f"{len(unmatched)} prediction(s) without ground truth in {gt_dir}: {unmatched}")

    stats: list[torch.Tensor] = []
    has_entry: list[bool] = []
    missing_predictions: list[str] = []
    for relative_path, gt_path in gt_files.items():
        gt_map = read_label_map(gt_path)
        invalid = np.unique(gt_map[(gt_map < 0) | (gt_map > num_classes)])
        if ignore_index is not None:
            invalid = invalid[invalid != ignore_index]
        if invalid.size > 0:
            raise ValueError(f"{gt_path}: ground-truth values {invalid.tolist()} are not in 0..{num_classes}.")
        if relative_path in pred_files:
            pred_map = read_label_map(pred_files[relative_path])
            if pred_map.shape != gt_map.shape:
                raise ValueError(
                    f"{pred_files[relative_path]}: size {pred_map.shape} differs from ground truth {gt_map.shape}."
                )
        else:
            missing_predictions.append(relative_path)
            pred_map = np.zeros_like(gt_map)
        try:
            frame_stats = frame_statistics(pred_map, gt_map, num_classes, ignore_index)
        except ValueError as error:
            raise ValueError(f"{pred_files.get(relative_path, gt_path)}: {error}") from error
        stats.append(frame_stats)
        has_entry.append(protocol == "auto" or bool(frame_stats[:, GT_HAS_CLASS].any()))

    result = endovis_metrics(stats, class_names, has_entry)
    result.update(protocol=protocol, class_names=class_names, missing_predictions=missing_predictions)
    if output_file is not None:
        output_path = Path(output_file)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    return result


# ------------------------------------------------------------------------------------------- pooling
def frame_statistics_record(
    stats: torch.Tensor,
    has_entry: torch.Tensor | Sequence[bool],
    class_names: Sequence[str],
    protocol: str | None = None,
) -> dict[str, Any]:
    """The per-frame statistics as a JSON-able dict (the content of ``frame_stats.json``).

    Args:
        stats: (N, C, 4) from :func:`frame_statistics` (intersection, union, pred has class, GT has class).
        has_entry: (N,) bool.
        class_names: C names.
        protocol: recorded beside (pooling refuses to mix protocols).
    """
    stats = torch.as_tensor(stats, dtype=torch.float64).cpu()
    entries = [bool(x) for x in torch.as_tensor(has_entry).reshape(-1).tolist()]
    if stats.ndim != 3 or stats.shape[1:] != (len(class_names), NUM_STATISTICS) or len(entries) != stats.shape[0]:
        raise ValueError(
            f"stats {tuple(stats.shape)} and has_entry ({len(entries)}) do not fit {len(class_names)} classes"
        )
    return {
        "format": FRAME_STATS_FORMAT,
        "protocol": protocol,
        "class_names": list(class_names),
        "columns": ["intersection", "union", "pred_has_class", "gt_has_class"],
        "has_entry": entries,
        # pixel counts are integers: stored as such, exact in JSON
        "stats": [[[int(v) for v in row] for row in frame] for frame in stats.tolist()],
    }
