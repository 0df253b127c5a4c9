"""Per-frame statistics written beside metrics.json, and the metrics of several folds pooled from them (the
statistics of all frames together, not a mean of the folds' metrics)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .metrics import FRAME_STATS_FILE, FRAME_STATS_FORMAT, NUM_STATISTICS, endovis_metrics


def read_frame_statistics(path: str | Path) -> dict[str, Any]:
    """Read a ``frame_stats.json`` (or find it beside a ``metrics.json``) -> its record, ``stats`` as a tensor.

    Raises:
        FileNotFoundError: neither the file nor a frame_stats.json beside the given metrics.json exists.
        ValueError: not a frame statistics file, or inconsistent shapes.
    """
    path = Path(path)
    if path.name != FRAME_STATS_FILE and path.suffix == ".json":
        beside = path.parent / FRAME_STATS_FILE
        if not beside.is_file():
            raise FileNotFoundError(
                f"{path}: no {FRAME_STATS_FILE} beside it; pooling needs the per-frame statistics that evaluation "
                "writes since this version of the bundle: evaluate that fold again."
            )
        path = beside
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the metrics.json (or frame_stats.json) of each evaluated fold."
        )
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or record.get("format") != FRAME_STATS_FORMAT or "stats" not in record:
        raise ValueError(f"{path} is not a frame statistics file (format {FRAME_STATS_FORMAT}) written by evaluation.")
    names = list(record["class_names"])
    stats = torch.tensor(record["stats"], dtype=torch.float64).reshape(-1, len(names), NUM_STATISTICS)
    if stats.shape[0] != len(record["has_entry"]):
        raise ValueError(
            f"{path}: {stats.shape[0]} frames of statistics but {len(record['has_entry'])} has_entry flags."
        )
    return {**record, "stats": stats, "path": str(path)}


def pool_frame_statistics(paths: Sequence[str | Path]) -> dict[str, Any]:
    """EndoVis metrics over several evaluations (e.g. the four EndoVis2017 folds) pooled (as the paper reports them).

    Pooling concatenates the frames: the per-frame IoU and Challenge IoU lists, the per-class lists and the
    cumulative intersection and union sums run over all frames of all inputs, exactly as if one evaluation
    had seen them all. It is NOT the mean of the per-fold numbers (folds differ in frame count).

    Returns:
        the dict of :func:`endovis_metrics` plus ``protocol``, ``inputs`` (the files read) and ``per_input``
        (each input's own metrics, for the table).

    Raises:
        ValueError: no input, or inputs of other class names or protocols.
    """
    if not paths:
        raise ValueError("no input to pool: pass the metrics.json of each fold.")
    records = [read_frame_statistics(p) for p in paths]
    names, protocol = records[0]["class_names"], records[0].get("protocol")
    for record in records[1:]:
        if record["class_names"] != names:
            raise ValueError(
                f"cannot pool {record['path']}: its classes {record['class_names']} differ from {names} "
                f"of {records[0]['path']}."
            )
        if record.get("protocol") != protocol:
            raise ValueError(
                f"cannot pool {record['path']} ({record.get('protocol')} protocol) with "
                f"{records[0]['path']} ({protocol} protocol): pool each protocol separately."
            )
    stats = torch.cat([r["stats"] for r in records])
    has_entry = [flag for r in records for flag in r["has_entry"]]
    result = endovis_metrics(stats, names, has_entry)
    result["protocol"] = protocol
    result["inputs"] = [r["path"] for r in records]
    result["per_input"] = {r["path"]: endovis_metrics(r["stats"], names, r["has_entry"]) for r in records}
    return result
