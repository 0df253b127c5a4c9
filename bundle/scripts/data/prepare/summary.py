"""A preparation's summary: frames and pixels per class, the notes its command adds, and the lines it prints."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from scripts.data.prepare.output_folder import SUMMARY_FILE


def class_counts(records: Sequence[dict], names: Mapping[int, str], ignore_index: int) -> dict:
    frames_per_class = {name: 0 for name in names.values()}
    pixels_per_class = {name: 0 for name in names.values()}
    background = ignored = 0
    for record in records:
        for value, count in record["pixels"].items():
            value = int(value)
            if value in names:
                frames_per_class[names[value]] += 1
                pixels_per_class[names[value]] += count
            elif value == 0:
                background += count
            elif value == ignore_index:
                ignored += count
    return {
        "frames_per_class": frames_per_class,
        "pixels_per_class": pixels_per_class,
        "background_pixels": background,
        "ignored_pixels": ignored,
    }


def sum_notes(records: Iterable[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for record in records:
        for key, value in record.get("notes", {}).items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))


def format_summary(summary: Mapping, out_dir: str, written: int, reused: int) -> str:
    """The console report of a preparation."""
    height, width = summary["frame_size"]
    lines = [
        f"{summary['preparer']}: {summary['frames']} frames ({height}x{width}) in {out_dir} "
        f"({written} written, {reused} unchanged and kept)",
    ]
    for split, count in summary["frames_per_split"].items():
        lines.append(f"  {split:<20}{count:7d} frames")
    lines.append("  class                          frames       pixels")
    for name, frames in summary["frames_per_class"].items():
        lines.append(f"  {name:<28}{frames:9d} {summary['pixels_per_class'][name]:12d}")
    lines.append(f"  {'(ignored pixels)':<28}{'':9} {summary['ignored_pixels']:12d}")
    for key, value in summary["notes"].items():
        lines.append(f"  note: {key}: {value}")
    if summary["skipped"]:
        lines.append(f"  {len(summary['skipped'])} file(s) skipped:")
        for item in summary["skipped"][:20]:
            lines.append(f"    {item['file']}: {item['reason']}")
        if len(summary["skipped"]) > 20:
            lines.append(f"    ... and {len(summary['skipped']) - 20} more (see {SUMMARY_FILE})")
    for split, reason in summary.get("left_out_splits", {}).items():
        lines.append(f"  split {split} not written: {reason}")
    lines.append(f"  summary written to {os.path.join(out_dir, SUMMARY_FILE)}")
    return "\n".join(lines)
