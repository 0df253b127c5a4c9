"""What the cache takes on disk, said before anything is written, and the refusal when it does not fit."""

from __future__ import annotations

import io
import logging
import os
import shutil

import numpy as np
from PIL import Image

from ..data.frame_files import read_frame, read_label_map
from ..errors import BundleError
from .identity import entry_npy_bytes
from .store import entry_paths

logger = logging.getLogger(__name__)


class CacheSpaceError(BundleError, OSError):
    """The cache would not fit in the free space of its disk."""


#: precompute warns when the cache would take more than this fraction of the free space.
SPACE_WARN_FRACTION = 0.8


# ------------------------------------------------------------------------------------------ disk use
def check_disk_space(cache_dir: str, needed_bytes: int, what: str) -> int:
    """Refuse (:class:`CacheSpaceError`) when ``needed_bytes`` do not fit in the free space of the disk that
    holds (or will hold) ``cache_dir``; warn above ``SPACE_WARN_FRACTION`` of it. Returns the free bytes."""
    folder = os.path.abspath(cache_dir)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise CacheSpaceError(
            f"{what} needs about {needed_bytes / 2**30:.2f} GiB but the disk of {cache_dir} has {free / 2**30:.2f} GiB "
            "free; nothing was written. Point cache_dir at a larger disk, or make the cache smaller (fewer "
            "augmentation_versions; for the tap cache fewer taps), or train without it (cache_taps: false)."
        )
    if needed_bytes > SPACE_WARN_FRACTION * free:
        logger.warning(
            "%s will take %.2f GiB of the %.2f GiB free on the disk of %s",
            what,
            needed_bytes / 2**30,
            free / 2**30,
            cache_dir,
        )
    return free


#: Frames whose PNGs precompute writes in memory to measure an entry's PNG bytes.
PNG_SAMPLE_FRAMES = 8


def _png_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.tell()


def entry_disk_bytes(identity: dict, encoding: str, datalist: list[dict], num_classes: int, ignore_index: int) -> int:
    """Bytes one entry takes on disk: the ``.npy`` files of the encoder's arrays (their shapes, the embedding's
    ``encoding`` and the taps' dtype: :func:`~.identity.entry_npy_bytes`) and the PNGs (the label map; a tap cache also the frame), measured
    by writing those of up to :data:`PNG_SAMPLE_FRAMES` frames of ``datalist`` in memory."""
    step = max(1, len(datalist) // PNG_SAMPLE_FRAMES)
    sample = datalist[::step][:PNG_SAMPLE_FRAMES]
    png = [_png_bytes(read_label_map(item["label"], num_classes, ignore_index)) for item in sample]
    if "taps" in identity:
        png = [size + _png_bytes(read_frame(item["image"])) for size, item in zip(png, sample)]
    return entry_npy_bytes(identity, encoding) + (int(np.ceil(np.mean(png))) if png else 0)


def check_cache_fits(
    cache_dir: str,
    identity: dict,
    encoding: str,
    datalists: dict[str, list[dict]],
    plan: dict[str, list[int]],
    with_taps: bool,
    num_classes: int,
    ignore_index: int,
) -> None:
    """Log the cache's disk use (bytes per entry x entries, :func:`entry_disk_bytes`) and refuse when the missing
    entries do not fit (:class:`CacheSpaceError`)."""
    what = "the tap cache" if with_taps else "the embedding cache"
    per_entry = entry_disk_bytes(
        identity, encoding, [item for split in plan for item in datalists[split]], num_classes, ignore_index
    )
    total_entries = sum(len(datalists[s]) * len(plan[s]) for s in plan)
    # entries are shared by splits: a (version, frame) listed by two splits is written once
    missing_entries = len(
        {
            (version, item["key"])
            for split in plan
            for version in plan[split]
            for item in datalists[split]
            if not os.path.isfile(entry_paths(cache_dir, version, item["key"], with_taps)[0])
        }
    )
    logger.info(
        "precompute: %s: %d bytes per entry x %d entries (%s) = %.2f GiB in %s; %d entries to write",
        what,
        per_entry,
        total_entries,
        ", ".join(f"{s}: {len(datalists[s])} frames x {len(plan[s])} versions" for s in plan),
        total_entries * per_entry / 2**30,
        cache_dir,
        missing_entries,
    )
    check_disk_space(cache_dir, missing_entries * per_entry, what)
