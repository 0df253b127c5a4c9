"""Prepare CholecSeg8k (13 classes from colour masks; the corrected colour table: known_datasets.CHOLECSEG8K_COLOUR_TABLE).

Raw layout expected (as released on Kaggle)::

    <raw_dir>/videoNN/videoNN_XXXXX/frame_K_endo.png               RGB frame, 854x480 (W x H)
    <raw_dir>/videoNN/videoNN_XXXXX/frame_K_endo_color_mask.png    RGB(A) colour mask, same size

(the ``frame_K_endo_mask.png`` / ``frame_K_endo_watershed_mask.png`` files beside them are not read).
Colours (R, G, B) -> label: :data:`~scripts.data.known_datasets.CHOLECSEG8K_COLOUR_TABLE` (label 0 background, 1..12
the classes). Any other colour (the masks' 1-pixel white edge, stray white pixels,
anything else) becomes the ignore value 255, never a class; the summary counts those pixels per
colour (notes ``unknown colour R,G,B (pixels)``). An alpha channel is dropped.

Output: one sequence per clip folder (``videoNN_XXXXX``), frame ``frame_K``; frames keep their
native size (H, W) (480, 854 in the release); all frames must share the size of the first one
(others are skipped and reported).

Split by video: ``validation`` = the videos of ``val_videos`` (default :data:`DEFAULT_VAL_VIDEOS`,
4 of the 17 videos, our fixed choice; those of them the raw folder holds), ``training`` = all
other videos.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from scripts.data.known_datasets import CHOLECSEG8K_COLOUR_TABLE
from scripts.data.layout import DEFAULT_IGNORE_INDEX, DatasetError
from scripts.data.prepare.common import LoadedFrame, RawFrame, run_preparation
from scripts.data.prepare.output_folder import check_out_dir
from scripts.data.prepare.raw_inputs import (
    SkipFrame,
    check_size,
    layout_error,
    natural_key,
    open_raw_image,
    read_raw_frame,
)

PREPARER = "prepare_cholecseg8k"
#: Label -> (colour, name); label 0 is background (the corrected CholecSeg8k colour table).
COLOUR_TABLE = CHOLECSEG8K_COLOUR_TABLE
#: Held-out videos unless --val_videos says otherwise (our choice: 4 of the 17 videos).
DEFAULT_VAL_VIDEOS = ("video12", "video20", "video48", "video55")
VIDEO_PATTERN = re.compile(r"^video(\d+)$")
FRAME_PATTERN = re.compile(r"^(frame_\d+)_endo\.png$")
MASK_SUFFIX = "_endo_color_mask.png"

EXPECTED_LAYOUT = """\
  <raw_dir>/videoNN/videoNN_XXXXX/frame_K_endo.png              (RGB frame)
  <raw_dir>/videoNN/videoNN_XXXXX/frame_K_endo_color_mask.png   (RGB colour mask, same size)"""


def colour_to_label(mask: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Map an (H, W, 3) uint8 colour mask to an (H, W) uint8 label map.

    Returns:
        the label map (table colours -> 0..12, any other colour -> 255) and the pixel count of
        each colour outside the table, keyed "R,G,B".
    """
    packed = (mask[..., 0].astype(np.int32) << 16) | (mask[..., 1].astype(np.int32) << 8) | mask[..., 2]
    label_map = np.full(packed.shape, DEFAULT_IGNORE_INDEX, dtype=np.uint8)
    for label, ((red, green, blue), _) in enumerate(COLOUR_TABLE):
        label_map[packed == (red << 16 | green << 8 | blue)] = label
    unknown = packed[label_map == DEFAULT_IGNORE_INDEX]
    values, counts = np.unique(unknown, return_counts=True)
    colours = {f"{v >> 16},{(v >> 8) & 255},{v & 255}": int(c) for v, c in zip(values.tolist(), counts.tolist())}
    return label_map, colours


def _load(frame_path: str, mask_path: str) -> LoadedFrame:
    image = read_raw_frame(frame_path)
    mask = open_raw_image(mask_path, "colour mask", missing="every frame needs its colour mask")
    if mask.mode not in ("RGB", "RGBA"):
        raise SkipFrame(mask_path, f"colour mask has image mode {mask.mode!r}, expected RGB or RGBA")
    colours = np.asarray(mask)[..., :3]
    check_size(mask_path, "mask", colours.shape, image.shape, relation="its frame")
    label_map, unknown = colour_to_label(colours)
    notes = {f"unknown colour {colour} (pixels)": count for colour, count in unknown.items()}
    return LoadedFrame(image, label_map, notes)


def video_name(value: object) -> str:
    """'12', 12, 'video12', 'video_12' -> 'video12'."""
    text = str(value).strip().lower().replace("video_", "").replace("video", "")
    if not text.isdigit():
        raise DatasetError(f"a video must be given as videoNN or NN, got {value!r}.")
    return f"video{int(text):02d}"


def find_frames(raw_dir: str) -> tuple[dict[str, list[str]], list[RawFrame]]:
    """Clip folders per video and the raw frames."""
    if not os.path.isdir(raw_dir):
        raise layout_error(f"--raw_dir {raw_dir} does not exist.", EXPECTED_LAYOUT)
    videos = sorted(
        (n for n in os.listdir(raw_dir) if VIDEO_PATTERN.match(n) and os.path.isdir(os.path.join(raw_dir, n))),
        key=natural_key,
    )
    if not videos:
        raise layout_error(f"--raw_dir {raw_dir} holds no videoNN folder.", EXPECTED_LAYOUT)
    clips: dict[str, list[str]] = {}
    frames: list[RawFrame] = []
    for video in videos:
        video_dir = os.path.join(raw_dir, video)
        clips[video] = []
        for clip in sorted(os.listdir(video_dir), key=natural_key):
            clip_dir = os.path.join(video_dir, clip)
            if not os.path.isdir(clip_dir):
                continue
            names = sorted((n for n in os.listdir(clip_dir) if FRAME_PATTERN.match(n)), key=natural_key)
            if not names:
                continue
            clips[video].append(clip)
            for name in names:
                stem = FRAME_PATTERN.match(name).group(1)
                frame_path = os.path.join(clip_dir, name)
                mask_path = os.path.join(clip_dir, stem + MASK_SUFFIX)
                sources = (frame_path, mask_path) if os.path.isfile(mask_path) else (frame_path,)
                frames.append(RawFrame(clip, stem, sources, lambda f=frame_path, m=mask_path: _load(f, m)))
    if not frames:
        raise layout_error(
            f"--raw_dir {raw_dir} holds videoNN folders but no frame_K_endo.png in their clip folders.", EXPECTED_LAYOUT
        )
    return clips, frames


def prepare_cholecseg8k(
    raw_dir: str,
    out_dir: str,
    val_videos: Sequence[object] | None = None,
    check: bool = True,
    progress: bool = True,
) -> dict:
    """Prepare CholecSeg8k (layout in the module docstring) into ``out_dir``; return the summary.

    Args:
        val_videos: videos of the validation split (``video12`` or ``12``); default
            :data:`DEFAULT_VAL_VIDEOS`.
    """
    check_out_dir(str(out_dir), PREPARER)  # before reading anything: a refused out_dir is said first
    raw_dir = os.path.abspath(str(raw_dir))
    clips, frames = find_frames(raw_dir)
    if val_videos is None:  # the default list, as far as the raw folder holds it (e.g. a subset of the videos)
        held_out = [v for v in DEFAULT_VAL_VIDEOS if v in clips]
        if not held_out:
            raise DatasetError(
                f"none of the default validation videos ({', '.join(DEFAULT_VAL_VIDEOS)}) is in --raw_dir {raw_dir} "
                f"(it holds {', '.join(clips)}): choose them with --val_videos."
            )
    else:
        held_out = [video_name(v) for v in val_videos]
    absent = [v for v in held_out if v not in clips]
    if absent:
        raise DatasetError(
            f"validation video(s) {', '.join(absent)} are not in --raw_dir {raw_dir} (it holds "
            f"{', '.join(clips)}): pass --val_videos with videos that exist."
        )
    if set(held_out) >= set(clips):
        raise DatasetError("every video is a validation video: leave at least one for training (--val_videos).")
    split_clips = {
        "training": [c for v, cs in clips.items() if v not in held_out for c in cs],
        "validation": [c for v, cs in clips.items() if v in held_out for c in cs],
    }
    description = {
        "name": "cholecseg8k",
        "description": "CholecSeg8k, 13 classes (0 background) from the corrected colour table; colours outside "
        f"the table are ignored ({DEFAULT_IGNORE_INDEX}); validation videos {', '.join(held_out)}.",
        "classes": {str(i): name for i, (_, name) in enumerate(COLOUR_TABLE) if i > 0},
        "ignore_index": DEFAULT_IGNORE_INDEX,
    }
    settings = {"colours": [list(c) for c, _ in COLOUR_TABLE]}
    return run_preparation(
        out_dir, PREPARER, description, frames, split_clips, raw_dir, settings=settings, check=check, progress=progress
    )
