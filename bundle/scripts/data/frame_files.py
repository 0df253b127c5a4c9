"""The files of a prepared dataset (layout: :mod:`.layout`): frames and label maps read, converted and checked
one by one, written atomically, and the whole-dataset check that reads every one of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .layout import (
    BINARY_ANNOTATIONS_DIR,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_SPLITS,
    IMAGES_DIR,
    LABELS_DIR,
    MAX_NAMED_FILES,
    DatasetError,
    class_names,
    load_datalist,
    name_files,
    read_dataset_description,
)

logger = logging.getLogger(__name__)

#: PIL modes read as RGB frames after a conversion (with a warning the first time per mode).
_CONVERTED_FRAME_MODES = {
    "L": "grayscale frame: the grey channel is replicated to RGB",
    "LA": "grayscale frame with alpha: the alpha channel is dropped and grey replicated to RGB",
    "RGBA": "RGBA frame: the alpha channel is dropped",
    "P": "palette frame: converted to RGB through its palette",
}
#: PIL modes that hold one channel of class ids (label maps).
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
_warned_frame_modes: set[str] = set()


# ------------------------------------------------------------------------------------------------
# frames and label maps
# ------------------------------------------------------------------------------------------------


#: What to do about an unreadable file of a prepared dataset.
DATASET_FILE_ADVICE = "re-export it or remove it from dataset.json"


def open_image(path: str | os.PathLike, what: str, advice: str = DATASET_FILE_ADVICE) -> Image.Image:
    """Open and fully decode an image; DatasetError naming the file (and ``advice``) when it cannot be read."""
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path} does not exist.")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"cannot read {what} {path} ({type(error).__name__}: {error}): the file is corrupt or not an image; "
            f"{advice}."
        ) from None
    return image


def read_frame(path: str | os.PathLike, advice: str = DATASET_FILE_ADVICE) -> np.ndarray:
    """Read an RGB frame as a uint8 array (H, W, 3).

    Grayscale (L), grayscale+alpha (LA), RGBA and palette (P) images are converted to RGB (alpha
    dropped), with a warning naming the file the first time each mode is met. ``advice`` ends the
    message of an unreadable file (a frame of a prepared dataset by default).

    Raises:
        DatasetError: the file is unreadable or corrupt, or has another mode (16-bit, float, CMYK...).
    """
    image = open_image(path, "frame", advice)
    mode = image.mode
    if mode in _CONVERTED_FRAME_MODES:
        if mode not in _warned_frame_modes:
            _warned_frame_modes.add(mode)
            logger.warning(
                "%s: %s (further %s frames are converted silently).", path, _CONVERTED_FRAME_MODES[mode], mode
            )
        image = image.convert("RGB")
    elif mode != "RGB":
        raise DatasetError(
            f"frame {path} has image mode {mode!r}: frames must be 8-bit RGB (grayscale, RGBA and palette "
            "images are converted); convert 16-bit or other images to 8-bit RGB PNG in the preparation step."
        )
    return np.asarray(image, dtype=np.uint8).copy()


def read_label_map(path: str | os.PathLike, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """Read a label map of class ids as a uint8 array (H, W).

    Args:
        path: single-channel PNG (mode L, P or I): 0 background, 1..``num_classes`` classes,
            ``ignore_index`` unlabelled.
        num_classes: number of classes C.
        ignore_index: label value of unlabelled pixels.

    Raises:
        DatasetError: the file is unreadable, has colour channels (colour masks need a preparation
            step mapping colours to class ids) or holds values outside {0..C, ignore_index}.
    """
    image = open_image(path, "label map")
    if image.mode not in _LABEL_MODES:
        raise DatasetError(
            f"label map {path} has image mode {image.mode!r} ({len(image.getbands())} channels): label maps must be "
            f"single-channel class ids (0 background, 1..{num_classes}, {ignore_index} unlabelled); colour masks "
            "need a preparation step that maps each colour to its class id."
        )
    values = np.asarray(image)
    present = np.unique(values)
    allowed = np.append(np.arange(num_classes + 1), ignore_index)
    offending = present[~np.isin(present, allowed)]
    if offending.size:
        raise DatasetError(
            f"label map {path} holds values {offending.tolist()} outside the class table "
            f"(0 background, 1..{num_classes} classes, {ignore_index} ignored): fix the label map or the "
            "'classes' / 'ignore_index' of dataset.json."
        )
    return values.astype(np.uint8)


def write_frame(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB frame (H, W, 3) uint8 as PNG, making the folder."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(path)


def write_label_map(path: str | os.PathLike, label_map: np.ndarray) -> None:
    """Write a label map (H, W) uint8 as a single-channel PNG, making the folder."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint8), mode="L").save(path)


def write_sample(
    dataset_dir: str | os.PathLike,
    sequence: str,
    frame: str,
    image: np.ndarray,
    label_map: np.ndarray,
    num_classes: int,
) -> dict:
    """Write one frame in the layout: the RGB frame, its label map and its per-class binary masks.

    Args:
        image: (H, W, 3) uint8 frame.
        label_map: (H, W) uint8 class ids.
        num_classes: C; binary masks ``<frame>_class<c>.png`` (0/255) are written for the classes
            1..C present in ``label_map``.

    Returns:
        the dataset.json entry of the frame (paths relative to ``dataset_dir``).
    """
    if image.shape[:2] != label_map.shape:
        raise ValueError(
            f"frame {image.shape[:2]} and label map {label_map.shape} of {sequence}/{frame} differ in size."
        )
    image_rel = f"{IMAGES_DIR}/{sequence}/{frame}.png"
    label_rel = f"{LABELS_DIR}/{sequence}/{frame}.png"
    write_frame(os.path.join(str(dataset_dir), image_rel), image)
    write_label_map(os.path.join(str(dataset_dir), label_rel), label_map)
    for class_id in np.unique(label_map):
        if 1 <= class_id <= num_classes:
            binary_path = os.path.join(
                str(dataset_dir), BINARY_ANNOTATIONS_DIR, sequence, f"{frame}_class{class_id}.png"
            )
            write_label_map(binary_path, (label_map == class_id).astype(np.uint8) * 255)
    return {"image": image_rel, "label": label_rel, "sequence": sequence, "frame": frame}


# ------------------------------------------------------------------------------------------------
# whole-dataset check
# ------------------------------------------------------------------------------------------------


def check_dataset(dataset_dir: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS) -> dict:
    """Read every frame and label map of ``splits`` and check them against dataset.json.

    Checks that every file reads, label values lie in {0..C, ignore_index}, each frame and its label
    map have the same size and all frames share one size (the bundle trains on one frame size),
    equal to ``frame_size`` of dataset.json when it gives one. All problems are gathered and
    reported in one DatasetError.

    Returns:
        ``{"frames": {split: n}, "frame_size": [H, W],
        "pixels_per_class": {split: {class name: pixels}},
        "frames_per_class": {split: {class name: frames containing it}}}``
    """
    description = read_dataset_description(dataset_dir)
    names = class_names(description)
    num_classes = len(names)
    ignore_index = description["ignore_index"]
    problems: list[str] = []
    pair_mismatches: list[str] = []
    frames_by_size: dict[tuple[int, int], list[str]] = {}
    summary: dict = {"frames": {}, "frame_size": None, "pixels_per_class": {}, "frames_per_class": {}}
    for split in splits:
        datalist = load_datalist(dataset_dir, split)
        pixels = np.zeros(num_classes + 1, dtype=np.int64)
        frames = np.zeros(num_classes + 1, dtype=np.int64)
        for item in datalist:
            try:
                image = read_frame(item["image"])
                label_map = read_label_map(item["label"], num_classes, ignore_index)
            except DatasetError as error:
                problems.append(str(error))
                continue
            frame_size = tuple(image.shape[:2])
            frames_by_size.setdefault(frame_size, []).append(item["image"])
            if label_map.shape != frame_size:
                pair_mismatches.append(
                    f"{item['label']} ({label_map.shape[0]}x{label_map.shape[1]} vs frame "
                    f"{frame_size[0]}x{frame_size[1]})"
                )
                continue
            counts = np.bincount(label_map.ravel(), minlength=256)[: num_classes + 1]
            pixels += counts
            frames += counts > 0
        summary["frames"][split] = len(datalist)
        summary["pixels_per_class"][split] = {name: int(pixels[i + 1]) for i, name in enumerate(names)}
        summary["frames_per_class"][split] = {name: int(frames[i + 1]) for i, name in enumerate(names)}
    # Every kind of problem is gathered and reported together, one section per kind, in one DatasetError.
    sections: list[str] = []
    if problems:
        shown = "\n  ".join(problems[:MAX_NAMED_FILES])
        more = f"\n  and {len(problems) - MAX_NAMED_FILES} more" if len(problems) > MAX_NAMED_FILES else ""
        sections.append(f"{len(problems)} file(s) cannot be used:\n  {shown}{more}")
    if pair_mismatches:
        sections.append(
            f"{len(pair_mismatches)} label map(s) differ in size from their frame: {name_files(pair_mismatches)}; "
            "a label map must have the size of its frame."
        )
    if len(frames_by_size) > 1:
        sizes = "; ".join(
            f"{height}x{width}: {len(files)} frame(s), e.g. {files[0]}"
            for (height, width), files in sorted(frames_by_size.items(), key=lambda kv: -len(kv[1]))
        )
        sections.append(
            f"the frames have {len(frames_by_size)} different sizes ({sizes}): the bundle trains on one frame size, "
            "so the preparation step must resize or crop all frames (and label maps) to one size."
        )
    expected = description.get("frame_size")
    if len(frames_by_size) == 1 and expected is not None and list(expected) != list(next(iter(frames_by_size))):
        height, width = next(iter(frames_by_size))
        sections.append(
            f"the frames are {height}x{width} but dataset.json says frame_size {expected}: correct 'frame_size' in "
            "dataset.json or re-run the preparation step."
        )
    if sections:
        if len(sections) == 1:
            raise DatasetError(f"{dataset_dir}: {sections[0]}")
        raise DatasetError(
            f"{dataset_dir} has {len(sections)} kind(s) of problem:\n"
            + "\n".join(f"- {section}" for section in sections)
        )
    if frames_by_size:
        (frame_size,) = frames_by_size
        summary["frame_size"] = list(frame_size)
    return summary
