"""Prepare any folder of frames and PNG label maps, described by a small YAML file (no code needed).

Config file (paths relative to the file)::

    frames_dir: frames                 # required
    labels_dir: labels                 # required
    classes: {1: Grasper, 2: Hook}     # required: ids 1..C -> names (0 is background)
    ignore_index: 255                  # optional (default 255): label value of unlabelled pixels
    validation_sequences: [case_3]     # optional: sequences of the validation split, or
    validation_fraction: 0.2           # optional (default 0.2): the last ceil-rounded share of the
                                       #   sequences in natural order go to validation
    resize: [480, 640]                 # optional: H, W of every output frame
    name: my_lab_dataset               # optional: dataset name in dataset.json

Raw layout expected::

    <frames_dir>/<sequence>/<frame>.png|.jpg|.jpeg    RGB frames (H, W, 3)
    <labels_dir>/<sequence>/<frame>.png               grey label maps (H, W): 0, 1..C, ignore_index

or, for a single sequence, the files directly in ``frames_dir`` / ``labels_dir`` (the sequence is
then named after ``frames_dir``). A frame without its label map, unreadable files, a label map of
another size than its frame and label values outside the table are skipped and reported by name.
Without ``resize`` all frames must have one size: otherwise the command stops and names the files
of each size. With ``resize``, frames are resized bilinearly and label maps by nearest neighbour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import yaml
from PIL import Image

from scripts.data.layout import DEFAULT_IGNORE_INDEX, DatasetError, name_files, validate_description
from scripts.data.prepare.common import LoadedFrame, RawFrame, run_preparation
from scripts.data.prepare.output_folder import check_out_dir
from scripts.data.prepare.raw_inputs import layout_error, natural_key, read_grey_label_map, read_raw_frame

PREPARER = "prepare_custom"
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_VALIDATION_FRACTION = 0.2
CONFIG_KEYS = {
    "frames_dir",
    "labels_dir",
    "classes",
    "ignore_index",
    "validation_sequences",
    "validation_fraction",
    "resize",
    "name",
}

EXPECTED_LAYOUT = """\
  <frames_dir>/<sequence>/<frame>.png|.jpg    (RGB frames)
  <labels_dir>/<sequence>/<frame>.png         (grey label maps: 0 background, 1..C, ignore_index)
  or both folders holding the files directly (one sequence)."""


def read_config(path: str) -> dict:
    """Read and check the YAML config; paths come back absolute."""
    if not os.path.isfile(path):
        raise DatasetError(f"--config {path} does not exist: write a YAML file as in scripts/data/prepare/custom.py.")
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise DatasetError(f"--config {path} is not valid YAML ({error}).") from None
    if not isinstance(config, dict):
        raise DatasetError(f"--config {path} must hold a mapping (frames_dir, labels_dir, classes, ...).")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise DatasetError(f"--config {path}: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}.")
    missing = [k for k in ("frames_dir", "labels_dir", "classes") if k not in config]
    if missing:
        raise DatasetError(f"--config {path} lacks {', '.join(missing)}.")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("frames_dir", "labels_dir"):
        config[key] = os.path.normpath(os.path.join(base, os.path.expanduser(str(config[key]))))
    classes = config["classes"]
    if not isinstance(classes, Mapping) or not classes:
        raise DatasetError(f"--config {path}: 'classes' must map ids 1..C to names, e.g. {{1: Grasper, 2: Hook}}.")
    config["classes"] = {str(k): str(v) for k, v in classes.items()}
    if "validation_sequences" in config and "validation_fraction" in config:
        raise DatasetError(f"--config {path}: give validation_sequences or validation_fraction, not both.")
    fraction = config.get("validation_fraction", DEFAULT_VALIDATION_FRACTION)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise DatasetError(f"--config {path}: validation_fraction must be a number between 0 and 1, got {fraction!r}.")
    config["validation_fraction"] = float(fraction)
    if "validation_sequences" in config:
        sequences = config["validation_sequences"]
        if isinstance(sequences, (str, int)):
            sequences = [sequences]
        if not isinstance(sequences, list) or not sequences:
            raise DatasetError(f"--config {path}: validation_sequences must be a list of sequence names.")
        config["validation_sequences"] = [str(s) for s in sequences]
    resize = config.get("resize")
    if resize is not None:
        if (
            not isinstance(resize, (list, tuple))
            or len(resize) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)
        ):
            raise DatasetError(f"--config {path}: resize must be [height, width] in pixels, got {resize!r}.")
        config["resize"] = [int(v) for v in resize]
    config.setdefault("ignore_index", DEFAULT_IGNORE_INDEX)
    validate_description(
        {"classes": config["classes"], "ignore_index": config["ignore_index"]}, source=f"--config {path}"
    )
    return config


def _frame_files(folder: str) -> list[str]:
    return sorted(
        (
            n
            for n in os.listdir(folder)
            if n.lower().endswith(FRAME_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
        ),
        key=natural_key,
    )


def find_sequences(frames_dir: str, labels_dir: str) -> dict[str, tuple[str, str]]:
    """Sequence name -> (its frames folder, its labels folder)."""
    for what, folder in (("frames_dir", frames_dir), ("labels_dir", labels_dir)):
        if not os.path.isdir(folder):
            raise layout_error(f"{what} {folder} does not exist.", EXPECTED_LAYOUT)
    if _frame_files(frames_dir):
        return {os.path.basename(frames_dir.rstrip(os.sep)) or "seq_0": (frames_dir, labels_dir)}
    sequences = {
        name: (os.path.join(frames_dir, name), os.path.join(labels_dir, name))
        for name in sorted(os.listdir(frames_dir), key=natural_key)
        if os.path.isdir(os.path.join(frames_dir, name)) and _frame_files(os.path.join(frames_dir, name))
    }
    if not sequences:
        raise layout_error(
            f"frames_dir {frames_dir} holds no frames (.png/.jpg) nor sequence folders with frames.", EXPECTED_LAYOUT
        )
    return sequences


def _image_size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError):
        return None  # reported when the frame is loaded


def _load(frame_path: str, label_path: str, num_classes: int, ignore_index: int, resize) -> LoadedFrame:
    image = read_raw_frame(frame_path)
    values = read_grey_label_map(
        label_path,
        num_classes,
        ignore_index,
        image.shape[:2],
        missing="every frame needs a label map of the same name (.png)",
        relation="its frame",
    )
    if resize is not None and tuple(resize) != image.shape[:2]:
        height, width = resize
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        values = np.asarray(Image.fromarray(values).resize((width, height), Image.NEAREST))
    return LoadedFrame(image, values)


def validation_sequences(sequences: list[str], config: Mapping) -> list[str]:
    """The validation sequences: the config's list, or the last share (validation_fraction) of them."""
    if "validation_sequences" in config:
        absent = [s for s in config["validation_sequences"] if s not in sequences]
        if absent:
            raise DatasetError(
                f"validation_sequences {absent} are not sequences of frames_dir (found: {name_files(sequences)})."
            )
        chosen = list(config["validation_sequences"])
    else:
        if len(sequences) < 2:
            raise DatasetError(
                f"frames_dir holds one sequence ({sequences[0]}): the validation split is made of whole sequences, "
                "so put the frames in at least two sequence folders (frames_dir/<sequence>/...)."
            )
        count = min(len(sequences) - 1, max(1, math.ceil(config["validation_fraction"] * len(sequences))))
        chosen = sequences[-count:]
    if set(chosen) >= set(sequences):
        raise DatasetError("every sequence is a validation sequence: leave at least one for training.")
    return chosen


def prepare_custom(config_path: str, out_dir: str, check: bool = True, progress: bool = True) -> dict:
    """Prepare the frames and label maps a YAML config describes (see the module docstring)."""
    check_out_dir(str(out_dir), PREPARER)  # before reading anything: a refused out_dir is said first
    config = read_config(str(config_path))
    sequences = find_sequences(config["frames_dir"], config["labels_dir"])
    num_classes = len(config["classes"])
    ignore_index = int(config["ignore_index"])
    resize = config.get("resize")
    frames: list[RawFrame] = []
    sizes: dict[tuple[int, int], list[str]] = {}
    for sequence, (frame_dir, label_dir) in sequences.items():
        for name in _frame_files(frame_dir):
            stem = os.path.splitext(name)[0]
            frame_path = os.path.join(frame_dir, name)
            label_path = os.path.join(label_dir, stem + ".png")
            size = _image_size(frame_path)
            if size is not None:
                sizes.setdefault(size, []).append(os.path.relpath(frame_path, config["frames_dir"]))
            sources = (frame_path, label_path) if os.path.isfile(label_path) else (frame_path,)
            frames.append(
                RawFrame(
                    sequence,
                    stem,
                    sources,
                    lambda f=frame_path, lab=label_path: _load(f, lab, num_classes, ignore_index, resize),
                )
            )
    if resize is None and len(sizes) > 1:
        listing = "; ".join(
            f"{h}x{w}: {name_files(files, 5)}" for (h, w), files in sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        )
        raise DatasetError(
            f"the frames of {config['frames_dir']} have {len(sizes)} sizes ({listing}): the bundle trains on one frame "
            "size; add `resize: [H, W]` to the config or make the frames one size."
        )
    names = list(sequences)
    validation = validation_sequences(names, config)
    split_sequences = {"training": [s for s in names if s not in validation], "validation": validation}
    description = {
        "name": str(config.get("name", "custom")),
        "description": f"Prepared by {PREPARER} from {os.path.basename(str(config_path))}.",
        "classes": config["classes"],
        "ignore_index": ignore_index,
    }
    settings = {"classes": config["classes"], "ignore_index": ignore_index, "resize": resize}
    root = os.path.commonpath([config["frames_dir"], config["labels_dir"]])
    return run_preparation(
        out_dir,
        PREPARER,
        description,
        frames,
        split_sequences,
        root,
        settings=settings,
        frame_size=resize,
        check=check,
        progress=progress,
    )
