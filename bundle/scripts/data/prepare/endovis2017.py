"""Prepare the EndoVis 2017 Robotic Instrument Segmentation training data (instrument types, 4 folds).

Raw layout expected under ``raw_dir`` (as the challenge released it)::

    <raw_dir>/instrument_dataset_K/left_frames/frameNNN.png                 RGB, 1920x1080 (W x H)
    <raw_dir>/instrument_dataset_K/ground_truth/<Name>_labels/frameNNN.png  grey, 1920x1080

with K = 1..8. Each ``<Name>_labels`` folder holds the part masks of one instrument: 0 background,
10 shaft, 20 wrist, 30 claspers (any value > 0 belongs to the instrument). ``<Name>`` gives the
instrument type (as ISINet's EndoVis2017 labels), matched as a substring so that 'Left_Prograsp_Forceps' and
'Maryland_Bipolar_Forceps' are recognised:

    Bipolar_Forceps 1, Prograsp_Forceps 2, Large_Needle_Driver 3, Vessel_Sealer 4,
    Grasping_Retractor 5, Monopolar_Curved_Scissors 6, Other 7

Output (the layout of :mod:`scripts.data.layout`):

* frames and label maps cropped to rows 28:1052, columns 320:1600: (1024, 1280, 3) and (1024, 1280);
* sequence ``instrument_dataset_K`` -> ``seq_K``, frame ``frameNNN`` keeps its name;
* label map: the instrument type of every instrument pixel. Where two instrument folders overlap,
  the folder later in sorted order wins; the overlapping pixels are counted in the summary
  (``overlap pixels``, ``frames with overlaps``). A folder whose name matches no type (or more than
  one) is reported and its pixels are set to the ignore value 255 (counted as
  ``pixels of unknown instrument folders``), never guessed;
* a frame with a part mask holding values other than 0/10/20/30, a missing mask, or a frame or
  mask of another size than 1920x1080 is skipped and reported by name. 'Other' masks (and those
  of unknown folders) are not part-coded: any value > 0 marks the object.

Splits (dataset.json; the training configs rely on these names): the 4 folds by dataset number,
``fold0_validation`` [1, 3], ``fold1_validation`` [2, 5], ``fold2_validation`` [4, 8],
``fold3_validation`` [6, 7]; ``foldN_training`` holds the other six datasets; ``training`` and
``validation`` repeat fold 0.

A partial download (fewer than the eight datasets) is prepared as it is: a fold is written when at least
one of its validation and one of its training datasets are there, and recorded as incomplete
(``incomplete_folds`` in dataset.json and the summary, with the missing datasets) when some are not;
a fold that cannot be made is left out (``left_out_splits``, with why).
"""

from __future__ import annotations

import os
import re

import numpy as np

from scripts.data.known_datasets import ENDOVIS2017_CLASS_NAMES, ENDOVIS2017_FOLDS
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
    read_raw_frame,
)

PREPARER = "prepare_endovis2017"
#: Class ids 1..7 (ISINet's EndoVis2017 instrument types).
CLASS_NAMES = ENDOVIS2017_CLASS_NAMES
#: Substring of the ground-truth folder name -> class id (ISINet's EndoVis2017 labels).
FOLDER_TYPES = {
    "Bipolar_Forceps": 1,
    "Prograsp_Forceps": 2,
    "Large_Needle_Driver": 3,
    "Vessel_Sealer": 4,
    "Grasping_Retractor": 5,
    "Monopolar_Curved_Scissors": 6,
    "Other": 7,
}
#: The 'Other' class: its masks mark the whole object (not part-coded), any value > 0.
OTHER_CLASS = 7
#: Raw frame size (H, W) and the crop to the 1024x1280 camera image: rows, columns.
RAW_SIZE = (1080, 1920)
CROP_ROWS = (28, 1052)
CROP_COLS = (320, 1600)
#: Values of the part masks: background, shaft, wrist, claspers.
PART_VALUES = (0, 10, 20, 30)
#: Cross-validation folds: validation datasets of each fold.
FOLDS = ENDOVIS2017_FOLDS
IGNORE_INDEX = 255
DATASET_PATTERN = re.compile(r"^instrument_dataset_(\d+)$")

EXPECTED_LAYOUT = """\
  <raw_dir>/instrument_dataset_K/left_frames/frameNNN.png                 (1920x1080 RGB)
  <raw_dir>/instrument_dataset_K/ground_truth/<Name>_labels/frameNNN.png  (1920x1080 grey: 0, 10, 20, 30)
  with K = 1..8 and <Name> e.g. Left_Prograsp_Forceps, Maryland_Bipolar_Forceps, Other."""


def sequence_name(dataset_number: int) -> str:
    """Output sequence of ``instrument_dataset_K``: ``seq_K``."""
    return f"seq_{dataset_number}"


def fold_splits(folds=FOLDS) -> dict[str, list[str]]:
    """Split name -> sequences: foldN_training / foldN_validation for every fold, training / validation = fold 0."""
    every = sorted({number for fold in folds for number in fold})
    splits: dict[str, list[str]] = {}
    for index, validation in enumerate(folds):
        splits[f"fold{index}_training"] = [sequence_name(n) for n in every if n not in validation]
        splits[f"fold{index}_validation"] = [sequence_name(n) for n in validation]
    splits["training"] = list(splits["fold0_training"])
    splits["validation"] = list(splits["fold0_validation"])
    return splits


def available_folds(present: set[int], folds=FOLDS) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """The splits that can be made from the datasets ``present`` (a partial download), and what is not whole.

    A fold is made when it has at least one of its validation datasets and one of its training datasets;
    it is *incomplete* when some of them are missing (its numbers are then not the challenge's fold).

    Returns:
        (splits as :func:`fold_splits` gives them, only the folds that can be made; split -> why it was
        left out; fold name -> why it is incomplete). ``training`` / ``validation`` repeat fold 0 when it
        can be made.
    """
    every = fold_splits(folds)
    splits: dict[str, list[str]] = {}
    left_out: dict[str, str] = {}
    incomplete: dict[str, str] = {}
    for index in range(len(folds)):
        parts = {part: every[f"fold{index}_{part}"] for part in ("training", "validation")}
        missing = {part: [s for s in seqs if int(s.split("_")[1]) not in present] for part, seqs in parts.items()}
        names = {
            part: ", ".join(f"instrument_dataset_{s.split('_')[1]}" for s in seqs) for part, seqs in missing.items()
        }
        if any(len(missing[part]) == len(parts[part]) for part in parts):
            empty = [part for part in parts if len(missing[part]) == len(parts[part])]
            reason = "; ".join(f"none of its {part} datasets ({names[part]}) is in the raw folder" for part in empty)
            for part in parts:
                left_out[f"fold{index}_{part}"] = reason
            if index == 0:
                left_out["training"] = left_out["validation"] = f"fold 0 cannot be made: {reason}"
            continue
        for part, seqs in parts.items():
            splits[f"fold{index}_{part}"] = [s for s in seqs if s not in missing[part]]
        lacking = [f"{names[part]} ({part})" for part in parts if missing[part]]
        if lacking:
            incomplete[f"fold{index}"] = (
                f"made without {'; '.join(lacking)}: not in the raw folder, so its scores "
                "are not comparable with the challenge's fold"
            )
        if index == 0:
            splits["training"], splits["validation"] = list(splits["fold0_training"]), list(splits["fold0_validation"])
    return splits, left_out, incomplete


def instrument_type(folder_name: str) -> int | None:
    """Class id of a ground-truth folder (e.g. 'Left_Prograsp_Forceps_labels' -> 2); None if unknown or ambiguous."""
    name = folder_name[: -len("_labels")] if folder_name.endswith("_labels") else folder_name
    matches = {class_id for key, class_id in FOLDER_TYPES.items() if key in name}
    return matches.pop() if len(matches) == 1 else None


def crop(array: np.ndarray) -> np.ndarray:
    """Crop a raw (1080, 1920[, 3]) frame or mask to the (1024, 1280[, 3]) camera image."""
    return array[CROP_ROWS[0] : CROP_ROWS[1], CROP_COLS[0] : CROP_COLS[1]]


def read_part_mask(path: str, part_coded: bool = True) -> np.ndarray:
    """A mask as (H, W) uint8; SkipFrame when missing, unreadable, of another size or (``part_coded``) holding
    values other than 0/10/20/30. 'Other' masks are not part-coded: any value > 0 is the instrument."""
    values = np.asarray(
        open_raw_image(path, "part mask", missing="every instrument folder needs a mask for each frame")
    )
    if values.ndim == 3:  # a mask saved as RGB: the grey value is in every channel
        values = values[..., :3].max(axis=2)
    check_size(path, "mask", values.shape, RAW_SIZE)
    unexpected = sorted(set(np.unique(values).tolist()) - set(PART_VALUES)) if part_coded else []
    if unexpected:
        raise SkipFrame(path, f"unexpected mask values {unexpected} (part masks hold {list(PART_VALUES)})")
    return values.astype(np.uint8)


def _load(frame_path: str, masks: list[tuple[str, int | None]]) -> LoadedFrame:
    image = read_raw_frame(frame_path)
    check_size(frame_path, "frame", image.shape, RAW_SIZE)
    # masks are sorted by folder name: the later folder wins an overlap
    instruments = (
        (read_part_mask(path, part_coded=class_id not in (None, OTHER_CLASS)) > 0, class_id) for path, class_id in masks
    )
    label_map, notes = paint_masks(RAW_SIZE, instruments, IGNORE_INDEX, "pixels of unknown instrument folders")
    return LoadedFrame(crop(image), crop(label_map), notes)


def find_frames(raw_dir: str) -> tuple[list[RawFrame], list[tuple[str, str]]]:
    """The raw frames of every ``instrument_dataset_K`` and the problems found (unknown folders).

    Raises:
        DatasetError: ``raw_dir`` is missing or holds no instrument_dataset_K with frames.
    """
    if not os.path.isdir(raw_dir):
        raise layout_error(f"--raw_dir {raw_dir} does not exist.", EXPECTED_LAYOUT)
    datasets = sorted(
        (
            (int(m.group(1)), name)
            for name in os.listdir(raw_dir)
            if (m := DATASET_PATTERN.match(name)) and os.path.isdir(os.path.join(raw_dir, name))
        ),
    )
    if not datasets:
        raise layout_error(f"--raw_dir {raw_dir} holds no instrument_dataset_K folder.", EXPECTED_LAYOUT)
    frames: list[RawFrame] = []
    problems: list[tuple[str, str]] = []
    for number, name in datasets:
        folder = os.path.join(raw_dir, name)
        frame_names = png_files(os.path.join(folder, "left_frames"))
        truth_dir = os.path.join(folder, "ground_truth")
        if not frame_names:
            raise layout_error(f"{folder} has no left_frames/*.png.", EXPECTED_LAYOUT)
        if not os.path.isdir(truth_dir):  # e.g. a test dataset without labels: reported, the others are prepared
            problems.append((folder, "no ground_truth folder"))
            continue
        instruments = []
        for sub in sorted(os.listdir(truth_dir), key=natural_key):
            if not os.path.isdir(os.path.join(truth_dir, sub)):
                continue
            class_id = instrument_type(sub)
            if class_id is None:
                problems.append(
                    (
                        os.path.join(name, "ground_truth", sub),
                        f"unknown instrument folder (known types: {', '.join(FOLDER_TYPES)}); "
                        f"its pixels are set to the ignore value {IGNORE_INDEX}",
                    )
                )
            instruments.append((os.path.join(truth_dir, sub), class_id))
        for frame_name in frame_names:
            frame_path = os.path.join(folder, "left_frames", frame_name)
            masks = [(os.path.join(sub, frame_name), class_id) for sub, class_id in instruments]
            frames.append(
                RawFrame(
                    sequence=sequence_name(number),
                    frame=os.path.splitext(frame_name)[0],
                    sources=(frame_path, *(p for p, _ in masks if os.path.isfile(p))),
                    load=lambda f=frame_path, m=masks: _load(f, m),
                )
            )
    if not frames:
        raise layout_error(
            f"no instrument_dataset_K of --raw_dir {raw_dir} has a ground_truth folder.", EXPECTED_LAYOUT
        )
    return frames, problems


def prepare_endovis2017(raw_dir: str, out_dir: str, check: bool = True, progress: bool = True) -> dict:
    """Prepare EndoVis2017 (layout in the module docstring) into ``out_dir``; return the summary."""
    check_out_dir(str(out_dir), PREPARER)  # before reading anything: a refused out_dir is said first
    raw_dir = os.path.abspath(str(raw_dir))
    frames, problems = find_frames(raw_dir)
    description = {
        "name": "endovis2017",
        "description": "EndoVis 2017 Robotic Instrument Segmentation, instrument types; frames cropped to "
        "rows 28:1052, cols 320:1600; 4-fold cross-validation by dataset (fold0 = training/validation).",
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES, start=1)},
        "ignore_index": IGNORE_INDEX,
    }
    settings = {"crop": [CROP_ROWS, CROP_COLS], "types": FOLDER_TYPES, "overlap": "later folder wins"}
    present = {int(raw.sequence.split("_")[1]) for raw in frames}
    splits, left_out, incomplete = available_folds(present)
    if not splits:
        raise layout_error(
            f"--raw_dir {raw_dir} holds instrument_dataset_{', '.join(str(n) for n in sorted(present))} only: no "
            f"fold can be made ({'; '.join(f'{k}: {v}' for k, v in left_out.items() if k.endswith('_validation'))}). "
            "Every fold needs one of its validation and one of its training datasets.",
            EXPECTED_LAYOUT,
        )
    if incomplete:
        description["incomplete_folds"] = incomplete
    summary = run_preparation(
        out_dir,
        PREPARER,
        description,
        frames,
        splits,
        raw_dir,
        settings=settings,
        frame_size=(CROP_ROWS[1] - CROP_ROWS[0], CROP_COLS[1] - CROP_COLS[0]),
        problems=problems,
        check=check,
        progress=progress,
        left_out_splits=left_out,
        optional_splits=True,
        extra_summary={"incomplete_folds": incomplete} if incomplete else None,
    )
    for fold, reason in incomplete.items():
        print(f"  {fold} is incomplete: {reason}")
    return summary
