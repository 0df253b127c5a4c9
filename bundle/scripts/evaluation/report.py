"""The metrics as printed tables: one evaluation, and the folds beside their pooled result."""

from __future__ import annotations

from .metrics import SCALAR_METRIC_KEYS


# ------------------------------------------------------------------------------------------ report tables
def format_metric(value: float | None, width: int = 6, digits: int = 2) -> str:
    """One metric (a percentage) with ``digits`` decimals, right-aligned in ``width``; "n/a" for None or nan."""
    text = "n/a" if value is None or value != value else f"{value:.{digits}f}"
    return text.rjust(width)


def format_metrics_table(result: dict) -> str:
    """A plain-text table of one metrics.json."""
    lines = [f"protocol: {result.get('protocol')}   frames: {result.get('num_frames')}"]
    lines += [f"  {key:<14}{format_metric(result.get(key))}" for key in SCALAR_METRIC_KEYS]
    for name, value in (result.get("class_iou") or {}).items():
        lines.append(f"    IoU {name:<28}{format_metric(value)}")
    return "\n".join(lines)


def format_pooled_table(pooled: dict) -> str:
    """Per-input rows and the pooled row of :func:`pool_frame_statistics`, then the pooled
    class IoUs."""
    keys = SCALAR_METRIC_KEYS
    lines = [
        f"protocol: {pooled.get('protocol')}   pooled over {len(pooled.get('per_input', {}))} evaluations",
        f"  {'':<40}" + "".join(f"{k:>14}" for k in keys) + f"{'frames':>8}",
    ]
    for path, metrics in (pooled.get("per_input") or {}).items():
        label = path if len(path) <= 40 else "..." + path[-37:]
        lines.append(
            f"  {label:<40}"
            + "".join(f"{format_metric(metrics.get(k)):>14}" for k in keys)
            + f"{metrics.get('num_frames', ''):>8}"
        )
    lines.append(
        f"  {'pooled':<40}"
        + "".join(f"{format_metric(pooled.get(k)):>14}" for k in keys)
        + f"{pooled.get('num_frames', ''):>8}"
    )
    for name, value in (pooled.get("class_iou") or {}).items():
        lines.append(f"    IoU {name:<28}{format_metric(value)}")
    return "\n".join(lines)
