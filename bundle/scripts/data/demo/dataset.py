"""The demo dataset on disk: the sequences of :mod:`.scene` written in the layout of :mod:`scripts.data.layout`,
with a ``generator`` entry in dataset.json holding the parameters, a ``preview.png`` grid of frames with colour
overlays, and the marker that lets the generator replace only what it wrote.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..frame_files import write_sample
from ..layout import (
    BINARY_ANNOTATIONS_DIR,
    DEFAULT_IGNORE_INDEX,
    DESCRIPTION_FILE,
    IMAGES_DIR,
    LABELS_DIR,
    DatasetError,
    name_files,
    read_dataset_description,
    write_dataset_description,
)
from ..overlay import overlay
from .scene import GENERATOR_VERSION, MAX_INSTRUMENTS_PER_FRAME, demo_class_names, render_sequence

GENERATOR_NAME = "surgical-sam-demo"
PREVIEW_FILE = "preview.png"
#: The generator's defaults: the demo's own set (demo.yaml's and demo_distill.yaml's frame_size, 7 classes and
#: demo_data; a test keeps them equal), so `surgical-sam make_demo_data` makes the data the demo then keeps.
DEMO_FRAME_SIZE = (128, 160)
DEMO_NUM_CLASSES = 7
DEMO_TRAIN_SEQUENCES = 16
DEMO_VAL_SEQUENCES = 4
DEMO_FRAMES_PER_SEQUENCE = 12
#: Entries a folder made by the demo holds; anything else means it is not (only) demo data.
#: (``videos`` holds the demo video that scripts.data.demo.video makes from these frames.)
#: Written first into every folder the generator makes: what tells a demo folder (also one left unfinished) from a
#: user's frames in the same layout. Without it (or a finished demo's dataset.json) nothing is replaced.
DEMO_MARKER = ".surgical_sam_demo"
DEMO_ENTRIES = frozenset(
    {DESCRIPTION_FILE, PREVIEW_FILE, IMAGES_DIR, LABELS_DIR, BINARY_ANNOTATIONS_DIR, "videos", DEMO_MARKER}
)


def _generator_entry(frame_size, num_classes, train_sequences, val_sequences, frames_per_sequence, seed) -> dict:
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "frame_size": [int(v) for v in frame_size],
        "num_classes": int(num_classes),
        "train_sequences": int(train_sequences),
        "val_sequences": int(val_sequences),
        "frames_per_sequence": int(frames_per_sequence),
        "seed": int(seed),
    }


def _split_classes(rng: np.random.Generator, num_classes: int, num_sequences: int) -> list[list[int]]:
    """Classes of each sequence of a split: shuffled rounds over all classes, so every class appears
    when the split has room (at least MAX_INSTRUMENTS_PER_FRAME appearances per sequence)."""
    per_sequence = max(MAX_INSTRUMENTS_PER_FRAME, math.ceil(num_classes / max(num_sequences, 1)))
    needed = per_sequence * num_sequences
    slots: list[int] = []
    while len(slots) < needed:
        slots.extend(int(c) for c in rng.permutation(np.arange(1, num_classes + 1)))
    return [slots[i * per_sequence : (i + 1) * per_sequence] for i in range(num_sequences)]


def _check_only_demo_content(out_dir: str) -> None:
    """DatasetError unless ``out_dir`` holds nothing but what the demo wrote (its marker or a demo dataset.json)."""
    entries = sorted(os.listdir(out_dir))
    foreign = sorted(set(entries) - DEMO_ENTRIES)
    description_path = os.path.join(out_dir, DESCRIPTION_FILE)
    owned = os.path.isfile(os.path.join(out_dir, DEMO_MARKER)) or os.path.isfile(description_path)
    if foreign or not owned:
        raise DatasetError(
            f"{out_dir} holds files the demo did not make ({name_files(foreign or entries)}): the demo only writes "
            "into an empty folder or one it made, and never replaces your files; choose another --out_dir. For your "
            "own frames and label maps use `surgical-sam prepare_custom --config my_data.yaml --out_dir NEW_FOLDER`."
        )
    if os.path.isfile(description_path):
        try:
            generator = read_dataset_description(out_dir).get("generator", {})
        except DatasetError:
            generator = {}
        if not isinstance(generator, dict) or generator.get("name") != GENERATOR_NAME:
            raise DatasetError(
                f"{out_dir} holds a dataset that the demo did not make ({description_path} has no demo 'generator' "
                "entry): the demo will not overwrite it; choose another --out_dir."
            )


def _clear_demo_content(out_dir: str) -> None:
    for entry in DEMO_ENTRIES:
        path = os.path.join(out_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def make_demo_dataset(
    out_dir: str,
    frame_size: Sequence[int] = DEMO_FRAME_SIZE,
    num_classes: int = DEMO_NUM_CLASSES,
    train_sequences: int = DEMO_TRAIN_SEQUENCES,
    val_sequences: int = DEMO_VAL_SEQUENCES,
    frames_per_sequence: int = DEMO_FRAMES_PER_SEQUENCE,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write a deterministic EndoVis-like demo dataset to ``out_dir``; return ``out_dir``.

    Args:
        out_dir: folder to write (made if needed; must be empty or hold demo data only).
        frame_size: (H, W) of the frames.
        num_classes: C; names from the EndoVis2018 table when C <= 7, else "class_k".
        train_sequences: sequences of the training split ("seq_1"...).
        val_sequences: sequences of the validation split (numbered after the training ones).
        frames_per_sequence: frames per sequence (video length).
        seed: seed of every random draw; equal arguments give byte-identical files.
        overwrite: replace demo data already in ``out_dir`` (never anything else).

    Raises:
        DatasetError: ``out_dir`` holds a dataset (and ``overwrite`` is False) or non-demo files.
    """
    height, width = (int(v) for v in frame_size)
    if height < 16 or width < 16:
        raise ValueError(f"frame_size must be at least 16x16, got {frame_size}.")
    if num_classes < 1 or frames_per_sequence < 1 or train_sequences < 1 or val_sequences < 0:
        raise ValueError("num_classes, frames_per_sequence and train_sequences must be >= 1, val_sequences >= 0.")
    if num_classes >= DEFAULT_IGNORE_INDEX:
        raise ValueError(f"num_classes must be below the ignore index {DEFAULT_IGNORE_INDEX}, got {num_classes}.")
    out_dir = str(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        _check_only_demo_content(out_dir)
        if os.path.isfile(os.path.join(out_dir, DESCRIPTION_FILE)) and not overwrite:
            raise DatasetError(f"{out_dir} already holds a demo dataset: pass overwrite=True to replace it.")
        _clear_demo_content(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, DEMO_MARKER), "w") as handle:  # first: the folder is the demo's from now on
        handle.write("made by surgical-sam's demo generator (scripts.data.demo); it may replace this folder\n")

    description = {
        "name": "surgical-sam-demo",
        "description": "Synthetic EndoVis-like surgical videos with instrument-type label maps (demo data).",
        "classes": {str(k): name for k, name in enumerate(demo_class_names(num_classes), start=1)},
        "ignore_index": DEFAULT_IGNORE_INDEX,
        "frame_size": [height, width],
        "generator": _generator_entry(
            (height, width), num_classes, train_sequences, val_sequences, frames_per_sequence, seed
        ),
    }
    splits = {"training": train_sequences, "validation": val_sequences}
    preview_samples = []
    sequence_number = 0
    for split_index, (split, num_sequences) in enumerate(splits.items()):
        split_rng = np.random.default_rng([seed, split_index])
        sequence_classes = _split_classes(split_rng, num_classes, num_sequences)
        entries = []
        for index in range(num_sequences):
            sequence_number += 1
            sequence = f"seq_{sequence_number}"
            rng = np.random.default_rng([seed, split_index, index])
            # every other sequence opens with a few instrument-free frames (when long enough)
            empty_frames = min(2, frames_per_sequence // 8) if index % 2 == 0 else 0
            frames = render_sequence(rng, sequence_classes[index], (height, width), frames_per_sequence, empty_frames)
            for frame_index, (image, label_map) in enumerate(frames):
                entries.append(write_sample(out_dir, sequence, f"{frame_index:05d}", image, label_map, num_classes))
            preview_samples.append(frames[len(frames) // 2])
        description[split] = entries
    save_preview(os.path.join(out_dir, PREVIEW_FILE), preview_samples)
    write_dataset_description(out_dir, description)  # last: a folder without it is an unfinished demo
    return out_dir


def ensure_demo_dataset(
    out_dir: str,
    frame_size: Sequence[int] = DEMO_FRAME_SIZE,
    num_classes: int = DEMO_NUM_CLASSES,
    train_sequences: int = DEMO_TRAIN_SEQUENCES,
    val_sequences: int = DEMO_VAL_SEQUENCES,
    frames_per_sequence: int = DEMO_FRAMES_PER_SEQUENCE,
    seed: int = 0,
) -> str:
    """Make the demo dataset in ``out_dir`` unless it is already there with these parameters; return ``out_dir``.

    Regenerates when ``out_dir/dataset.json`` is missing or was made with other parameters (or by
    another generator version), but only if the folder holds nothing but demo data.

    Raises:
        DatasetError: ``out_dir`` holds a dataset or files that the demo did not make.
    """
    out_dir = str(out_dir)
    wanted = _generator_entry(frame_size, num_classes, train_sequences, val_sequences, frames_per_sequence, seed)
    if os.path.isfile(os.path.join(out_dir, DESCRIPTION_FILE)):
        if read_dataset_description(out_dir).get("generator") == wanted:
            return out_dir
        _check_only_demo_content(out_dir)
    return make_demo_dataset(
        out_dir,
        frame_size=frame_size,
        num_classes=num_classes,
        train_sequences=train_sequences,
        val_sequences=val_sequences,
        frames_per_sequence=frames_per_sequence,
        seed=seed,
        overwrite=True,
    )


def save_preview(path: str, samples: Sequence[tuple[np.ndarray, np.ndarray]], columns: int = 4) -> None:
    """Save a grid of frames (top of each cell pair) and their class overlays (below) as PNG."""
    if not samples:
        return
    height, width = samples[0][1].shape
    gap = 2
    rows = math.ceil(len(samples) / columns)
    columns = min(columns, len(samples))
    grid = np.full((rows * (2 * height + gap) + gap, columns * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for index, (image, label_map) in enumerate(samples):
        top = gap + (index // columns) * (2 * height + gap)
        left = gap + (index % columns) * (width + gap)
        grid[top : top + height, left : left + width] = image
        grid[top + height : top + 2 * height, left : left + width] = overlay(image, label_map)
    Image.fromarray(grid, mode="RGB").save(path)
