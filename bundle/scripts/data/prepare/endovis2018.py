"""Prepare EndoVis 2018 Robotic Scene Segmentation frames with ISINet's instrument-type labels.

The challenge itself labels parts and organs (colour masks); the instrument *types* come from ISINet
(Gonzalez et al., MICCAI 2020, github.com/BCV-Uniandes/ISINet), whose download holds the 2018
sequences with one binary mask per instrument instance. Their organising script
(``data/organize2018.py``) reads ``<release>/seq_N/left_frames/*.png`` and per-instance masks in
``<release>/seq_N/instrument_labels_2017/`` named ``<frame>_class<c>_inst<k>.png`` (0/1, 0/255, or RGB
where any channel > 0 is the instrument), with c in their "2017-compatible" numbering; their COCO
script lists that numbering (1 Bipolar Forceps, 2 Prograsp Forceps, 3 Large Needle Driver, 4 Vessel
Sealer, 5 Grasping Retractor, 6 Monopolar Curved Scissors, 7 Ultrasound Probe, 8 Suction Instrument,
9 Clip Applier) and renumbers it for 2018 by dropping 4 and 5, which gives the table below (ISINet's EndoVis2018 types).

Raw layout expected::

    <raw_dir>/seq_N/left_frames/frameNNN.png              RGB, 1280x1024 (W x H)
    (seq_N may also sit one level deeper, e.g. <raw_dir>/miccai_challenge_2018_release_1/seq_N)

and the labels in ONE of these forms:

1. ISINet instance masks, beside the frames (``--labels_dir`` not given)::

       <raw_dir>/seq_N/instrument_labels/<frame>_class<c>_inst<k>.png        c in 1..7 (2018 numbering)
       <raw_dir>/seq_N/instrument_labels_2017/<frame>_class<c>_inst<k>.png   c in 1..9 (2017-compatible)

   (``instrument_labels`` is used when both exist.) The file name may carry a prefix before the frame
   name (``seq1_frame000_class2_inst0.png``). A frame without instance masks has no instrument.
   ``--labels_dir L`` with ``L/seq_N/<frame>_class<c>_inst<k>.png`` is read the same way (numbering
   ``--numbering 2018`` unless the folder is named ``instrument_labels_2017``).

2. Instrument-type label maps, ``--labels_dir L``::

       <L>/seq_N/frameNNN.png      grey (H, W) = (1024, 1280): 0 background, 1..7 types, 255 ignored

Output: sequences keep their names (``seq_N``), frames keep theirs (``frameNNN``); frames and label
maps (1024, 1280[, 3]) are not resized. Overlapping instances: the later file (natural order) wins;
overlaps are counted in the summary. An instance of a class outside the table (e.g. 2017-numbering
4/5) is reported and its pixels set to the ignore value 255. Frames of another size, unreadable
files, masks with values other than 0/1/255 and label maps with values outside 0..7/255 are skipped
and reported by name.

Splits: ``validation`` = seq 2, 5, 9, 15; ``training`` = seq 1, 3, 4, 6, 7, 10, 11, 12, 13, 14, 16.
"""

from __future__ import annotations

import os
import re

import numpy as np

from scripts.data.known_datasets import ENDOVIS2018_CLASS_NAMES
from scripts.data.layout import DatasetError
from scripts.data.prepare.common import LoadedFrame, RawFrame, run_preparation
from scripts.data.prepare.output_folder import check_out_dir
from scripts.data.prepare.raw_inputs import (
    SkipFrame,
    check_size,
    layout_error,
    natural_key,
    open_raw_image,
    paint_masks,
    png_files,
    read_grey_label_map,
    read_raw_frame,
)

PREPARER = "prepare_endovis2018"
#: Class ids 1..7 (ISINet's EndoVis2018 instrument types).
CLASS_NAMES = ENDOVIS2018_CLASS_NAMES
#: ISINet's 2017-compatible class ids -> ids of the 2018 table (4 Vessel Sealer, 5 Grasping Retractor: none).
NUMBERING_2017_TO_2018 = {1: 1, 2: 2, 3: 3, 6: 4, 7: 5, 8: 6, 9: 7}
NUMBERINGS = ("auto", "2018", "2017")
#: Frame size (H, W) of the 2018 release.
FRAME_SIZE = (1024, 1280)
IGNORE_INDEX = 255
VALIDATION_SEQUENCES = (2, 5, 9, 15)
TRAINING_SEQUENCES = (1, 3, 4, 6, 7, 10, 11, 12, 13, 14, 16)
INSTANCE_FOLDERS = ("instrument_labels", "instrument_labels_2017")
SEQUENCE_PATTERN = re.compile(r"^seq_(\d+)$")
INSTANCE_PATTERN = re.compile(r"^(?P<head>.+)_class(?P<class_id>\d+)_inst(?P<instance>\d+)\.png$", re.IGNORECASE)

EXPECTED_LAYOUT = """\
  <raw_dir>/seq_N/left_frames/frameNNN.png   (1280x1024 RGB; seq_N may be inside a release folder)
  labels, either ISINet instance masks
    <raw_dir>/seq_N/instrument_labels/<frame>_class<c>_inst<k>.png
    (or seq_N/instrument_labels_2017/, or --labels_dir L with L/seq_N/<frame>_class<c>_inst<k>.png)
  or instrument-type label maps (--labels_dir L)
    <L>/seq_N/frameNNN.png   (grey: 0 background, 1..7 types, 255 ignored)"""


def splits() -> dict[str, list[str]]:
    return {
        "training": [f"seq_{n}" for n in TRAINING_SEQUENCES],
        "validation": [f"seq_{n}" for n in VALIDATION_SEQUENCES],
    }


def find_sequences(root: str) -> dict[str, str]:
    """``seq_N`` folders directly in ``root`` or one level deeper (release folders): name -> path."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(root), key=natural_key):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if SEQUENCE_PATTERN.match(name):
            found.setdefault(name, path)
            continue
        for inner in sorted(os.listdir(path), key=natural_key):
            if SEQUENCE_PATTERN.match(inner) and os.path.isdir(os.path.join(path, inner)):
                found.setdefault(inner, os.path.join(path, inner))
    return found


def _binary_instance(path: str) -> np.ndarray:
    values = np.asarray(open_raw_image(path, "instance mask"))
    if values.ndim == 3:
        values = values[..., :3].max(axis=2)
        values = np.where(values > 0, 255, 0)
    unexpected = sorted(set(np.unique(values).tolist()) - {0, 1, 255})
    if unexpected:
        raise SkipFrame(path, f"unexpected mask values {unexpected} (instance masks hold 0 and 1 or 255)")
    check_size(path, "mask", values.shape, FRAME_SIZE)
    return values > 0


def _read_frame(path: str) -> np.ndarray:
    image = read_raw_frame(path)
    check_size(path, "frame", image.shape, FRAME_SIZE)
    return image


def _load_instances(frame_path: str, instances: list[tuple[str, int | None]]) -> LoadedFrame:
    image = _read_frame(frame_path)
    masks = ((_binary_instance(path), class_id) for path, class_id in instances)  # the later instance wins
    label_map, notes = paint_masks(FRAME_SIZE, masks, IGNORE_INDEX, "pixels of instances outside the class table")
    return LoadedFrame(image, label_map, notes)


def _load_label_map(frame_path: str, label_path: str) -> LoadedFrame:
    image = _read_frame(frame_path)
    label_map = read_grey_label_map(
        label_path,
        len(CLASS_NAMES),
        IGNORE_INDEX,
        FRAME_SIZE,
        missing="every frame needs its label map",
        grey_hint=f"0..{len(CLASS_NAMES)} (the challenge's colour part/organ labels are not instrument types)",
    )
    return LoadedFrame(image, label_map)


def _instance_folder(sequence_dir: str) -> str | None:
    for name in INSTANCE_FOLDERS:
        if os.path.isdir(os.path.join(sequence_dir, name)):
            return os.path.join(sequence_dir, name)
    return None


def _match_frame(head: str, stems: set[str]) -> str | None:
    """The frame a mask's name (without ``_class..``) belongs to: its whole head or a ``_``-separated tail."""
    parts = head.split("_")
    for start in range(len(parts)):
        candidate = "_".join(parts[start:])
        if candidate in stems:
            return candidate
    return None


def find_frames(raw_dir: str, labels_dir: str | None = None, numbering: str = "auto"):
    """The raw frames and the problems found (orphan masks, unknown classes); see the module docstring."""
    if numbering not in NUMBERINGS:
        raise DatasetError(f"numbering must be one of {', '.join(NUMBERINGS)}, got {numbering!r}.")
    if not os.path.isdir(raw_dir):
        raise layout_error(f"--raw_dir {raw_dir} does not exist.", EXPECTED_LAYOUT)
    sequences = find_sequences(raw_dir)
    if not sequences:
        raise layout_error(f"--raw_dir {raw_dir} holds no seq_N folder.", EXPECTED_LAYOUT)
    label_sequences: dict[str, str] = {}
    if labels_dir is not None:
        if not os.path.isdir(labels_dir):
            raise layout_error(f"--labels_dir {labels_dir} does not exist.", EXPECTED_LAYOUT)
        label_sequences = find_sequences(labels_dir)
        if not label_sequences:
            raise layout_error(f"--labels_dir {labels_dir} holds no seq_N folder.", EXPECTED_LAYOUT)
    frames: list[RawFrame] = []
    problems: list[tuple[str, str]] = []
    for sequence, sequence_dir in sequences.items():
        frame_names = png_files(os.path.join(sequence_dir, "left_frames"))
        if not frame_names:
            raise layout_error(f"{sequence_dir} has no left_frames/*.png.", EXPECTED_LAYOUT)
        if labels_dir is not None:
            label_dir = label_sequences.get(sequence)
            if label_dir is None:
                problems.append((sequence_dir, f"no labels for {sequence} in --labels_dir {labels_dir}"))
                continue
            label_dir = _instance_folder(label_dir) or label_dir
        else:
            label_dir = _instance_folder(sequence_dir)
            if label_dir is None:  # e.g. a test sequence without labels: reported, the others are prepared
                problems.append((sequence_dir, "no instrument_labels/ folder of ISINet instance masks"))
                continue
        names = png_files(label_dir)
        stems = {os.path.splitext(n)[0] for n in frame_names}
        instance_names = [n for n in names if INSTANCE_PATTERN.match(n)]
        numbers = numbering
        if numbers == "auto":
            numbers = "2017" if os.path.basename(label_dir) == "instrument_labels_2017" else "2018"
        instances: dict[str, list[tuple[str, int | None]]] = {stem: [] for stem in stems}
        for name in instance_names:
            match = INSTANCE_PATTERN.match(name)
            stem = _match_frame(match["head"], stems)
            if stem is None:
                problems.append((os.path.join(label_dir, name), "instance mask of no frame in left_frames"))
                continue
            raw_class = int(match["class_id"])
            class_id = NUMBERING_2017_TO_2018.get(raw_class) if numbers == "2017" else raw_class
            if class_id is not None and not 1 <= class_id <= len(CLASS_NAMES):
                class_id = None
            if class_id is None:
                problems.append(
                    (
                        os.path.join(label_dir, name),
                        f"class {raw_class} ({numbers} numbering) is not in the class table; its pixels are set to the "
                        f"ignore value {IGNORE_INDEX}",
                    )
                )
            instances[stem].append((os.path.join(label_dir, name), class_id))
        # ISINet's instrument_labels/ folder: instance masks (none in a frame: no instrument). A --labels_dir
        # folder without instance masks is read as label maps, so a frame without one is reported, not emptied.
        use_instances = bool(instance_names) or os.path.basename(label_dir) in INSTANCE_FOLDERS
        for frame_name in frame_names:
            stem = os.path.splitext(frame_name)[0]
            frame_path = os.path.join(sequence_dir, "left_frames", frame_name)
            if use_instances:
                masks = instances[stem]
                frames.append(
                    RawFrame(
                        sequence,
                        stem,
                        (frame_path, *(p for p, _ in masks)),
                        lambda f=frame_path, m=masks: _load_instances(f, m),
                    )
                )
            else:
                label_path = os.path.join(label_dir, frame_name)
                sources = (frame_path, label_path) if os.path.isfile(label_path) else (frame_path,)
                frames.append(
                    RawFrame(sequence, stem, sources, lambda f=frame_path, lab=label_path: _load_label_map(f, lab))
                )
    if not frames:
        raise layout_error(
            f"no sequence of --raw_dir {raw_dir} has labels ({'; '.join(f'{p}: {r}' for p, r in problems[:3])}); "
            "pass --labels_dir for labels kept elsewhere.",
            EXPECTED_LAYOUT,
        )
    return frames, problems


def prepare_endovis2018(
    raw_dir: str,
    out_dir: str,
    labels_dir: str | None = None,
    numbering: str = "auto",
    check: bool = True,
    progress: bool = True,
) -> dict:
    """Prepare EndoVis2018 with instrument-type labels (layout in the module docstring); return the summary."""
    check_out_dir(str(out_dir), PREPARER)  # before reading anything: a refused out_dir is said first
    raw_dir = os.path.abspath(str(raw_dir))
    labels_dir = None if labels_dir in (None, "") else os.path.abspath(str(labels_dir))
    frames, problems = find_frames(raw_dir, labels_dir, numbering)
    description = {
        "name": "endovis2018",
        "description": "EndoVis 2018 Robotic Scene Segmentation frames with ISINet instrument-type labels; "
        "validation sequences 2, 5, 9, 15.",
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES, start=1)},
        "ignore_index": IGNORE_INDEX,
    }
    settings = {"numbering": numbering, "labels_dir": labels_dir is not None, "overlap": "later instance wins"}
    root = os.path.commonpath([raw_dir, labels_dir]) if labels_dir else raw_dir
    return run_preparation(
        out_dir,
        PREPARER,
        description,
        frames,
        splits(),
        root,
        settings=settings,
        frame_size=FRAME_SIZE,
        problems=problems,
        check=check,
        progress=progress,
    )
