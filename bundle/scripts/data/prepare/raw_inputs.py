"""Reading the raw downloads a preparation command turns into the dataset layout: raw frames and label maps
read and checked one by one (a :class:`SkipFrame` names a file that cannot be used and why), masks painted into
label maps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from scripts.data.frame_files import open_image, read_frame
from scripts.data.layout import DatasetError


class SkipFrame(Exception):
    """Raised by a frame's ``load`` when the frame cannot be used; the message says why."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason


def natural_key(text: str) -> list:
    """Sort key that orders "seq_2" before "seq_10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def png_files(folder: str) -> list[str]:
    """Names of the .png files in ``folder`` (naturally sorted); [] when the folder does not exist."""
    if not os.path.isdir(folder):
        return []
    return sorted((n for n in os.listdir(folder) if n.lower().endswith(".png")), key=natural_key)


def read_raw_frame(path: str) -> np.ndarray:
    """:func:`~scripts.data.frame_files.read_frame` of a raw frame; SkipFrame (naming the file) when unusable."""
    try:
        return read_frame(path)
    except DatasetError as error:
        raise SkipFrame(path, str(error)) from None


def open_raw_image(path: str, what: str, missing: str | None = None):
    """Open a raw mask or label file (a PIL image); SkipFrame naming the file when it cannot be used.

    Args:
        path: the file.
        what: what the file is, for the message of an unreadable file (e.g. "label map").
        missing: when given, a missing file is reported as "missing: <missing>" (e.g. "every frame
            needs its label map"); when None, the existence is not checked here.
    """
    if missing is not None and not os.path.isfile(path):
        raise SkipFrame(path, f"missing: {missing}")
    try:
        return open_image(path, what)
    except DatasetError as error:
        raise SkipFrame(path, str(error)) from None


def check_size(path: str, what: str, shape: Sequence[int], size: Sequence[int], relation: str = "expected") -> None:
    """SkipFrame "<what> is HxW, <relation> HxW" when ``shape[:2]`` is not ``size`` (H, W).

    ``relation`` names the required size in the message: "expected" for a fixed size, "its frame"
    when it is the size of the frame the file belongs to.
    """
    if tuple(shape[:2]) != tuple(size[:2]):
        raise SkipFrame(path, f"{what} is {shape[0]}x{shape[1]}, {relation} {size[0]}x{size[1]}")


def read_grey_label_map(
    path: str,
    num_classes: int,
    ignore_index: int,
    size: Sequence[int],
    missing: str,
    relation: str = "expected",
    grey_hint: str = "",
) -> np.ndarray:
    """A raw grey label map (0 background, 1..C, ``ignore_index``) as (H, W) uint8.

    Checked in this order, each failure a SkipFrame naming the file: it exists (``missing`` says
    why it is needed), it can be read, it has one channel (``grey_hint`` is added to the message,
    e.g. which values are meant), its values are 0..C or ``ignore_index``, it is ``size`` (H, W)
    (``relation`` as in :func:`check_size`).
    """
    values = np.asarray(open_raw_image(path, "label map", missing=missing))
    if values.ndim != 2:
        hint = f" {grey_hint}" if grey_hint else ""
        raise SkipFrame(path, f"label map has {values.shape[2]} channels: label maps must be grey class ids{hint}")
    allowed = set(range(num_classes + 1)) | {ignore_index}
    unexpected = sorted(set(np.unique(values).tolist()) - allowed)
    if unexpected:
        raise SkipFrame(path, f"unexpected label values {unexpected} (allowed: 0..{num_classes}, {ignore_index})")
    check_size(path, "label map", values.shape, size, relation)
    return values.astype(np.uint8)


def paint_masks(
    size: Sequence[int], masks: Iterable[tuple[np.ndarray, int | None]], ignore_index: int, unknown_note: str
) -> tuple[np.ndarray, dict[str, int]]:
    """Paint binary masks into one label map, in order: a later mask wins where masks overlap.

    Args:
        size: (H, W) of the label map; pixels of no mask are background (0).
        masks: (boolean (H, W) mask, class id) pairs, read one at a time; class id None (a class
            outside the table) paints ``ignore_index``.
        ignore_index: the label of unlabelled pixels.
        unknown_note: name of the note that counts the pixels of masks with class id None.

    Returns:
        the (H, W) uint8 label map and its notes: ``overlap pixels`` (pixels painted over),
        ``frames with overlaps`` (0 or 1) and ``unknown_note``.
    """
    label_map = np.zeros(tuple(size), dtype=np.uint8)
    overlap = unknown = 0
    for mask, class_id in masks:
        overlap += int(np.count_nonzero(mask & (label_map > 0)))
        label_map[mask] = ignore_index if class_id is None else class_id
        unknown += int(np.count_nonzero(mask)) if class_id is None else 0
    return label_map, {"overlap pixels": overlap, "frames with overlaps": int(overlap > 0), unknown_note: unknown}


def layout_error(message: str, expected_layout: str) -> DatasetError:
    """A DatasetError about a raw folder that also shows the layout the command expects."""
    return DatasetError(f"{message}\nExpected layout:\n{expected_layout.rstrip()}")


# ------------------------------------------------------------------------------------------ out_dir
