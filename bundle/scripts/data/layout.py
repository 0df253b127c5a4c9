"""The bundle's dataset layout: how a prepared dataset lies on disk, and the checks that read it.

A prepared dataset (made by the demo generator or by a preparation step for EndoVis) is a folder::

    <dataset_dir>/dataset.json
    <dataset_dir>/images/<sequence>/<frame>.png                       RGB frames
    <dataset_dir>/labels/<sequence>/<frame>.png                       uint8 label maps
    <dataset_dir>/binary_annotations/<sequence>/<frame>_class<c>.png  0/255 per-class masks

A label map holds 0 for background, 1..C for the instrument classes and ``ignore_index`` (255 by
default) for unlabelled pixels. The binary masks repeat the label maps in the layout of the
original SurgicalSAM code (one file per class present in the frame), so its users can bring data.

``dataset.json`` describes the dataset::

    {"name": str, "description": str,
     "classes": {"1": "Bipolar Forceps", ..., "C": ...},
     "ignore_index": 255, "frame_size": [H, W],
     "training": [{"image": "images/seq_1/00000.png", "label": "labels/seq_1/00000.png",
                   "sequence": "seq_1", "frame": "00000"}, ...],
     "validation": [...]}

Paths are relative to the dataset folder. Every problem with the input raises :class:`DatasetError`
with a message that says what is wrong, in which file(s) and what to do.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import BundleError, MissingInputError
from ..files import atomic_write_json

logger = logging.getLogger(__name__)

#: Name of the description file at the top of a dataset folder.
DESCRIPTION_FILE = "dataset.json"
#: Sub-folders of a dataset folder.
IMAGES_DIR = "images"
LABELS_DIR = "labels"
BINARY_ANNOTATIONS_DIR = "binary_annotations"
#: Label value of unlabelled pixels unless dataset.json says otherwise.
DEFAULT_IGNORE_INDEX = 255
#: Splits :func:`check_dataset` reads unless told otherwise.
DEFAULT_SPLITS = ("training", "validation")
#: How many file names an error message lists before it says "and N more".
MAX_NAMED_FILES = 10


class DatasetError(BundleError, ValueError):
    """A dataset folder, description or file that the bundle cannot use as it is."""


def name_files(paths: Iterable[object], limit: int = MAX_NAMED_FILES) -> str:
    """Comma-separated names of ``paths``: the first ``limit`` and then "and N more"."""
    names = [str(p) for p in paths]
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def prepare_hint(dataset_dir: str) -> str:
    """How to make a dataset folder, with commands that never write over a user's files: prepare one's own frames
    into a new folder, or run the demo (which keeps its data in the bundle)."""
    return (
        "prepare your frames and label maps into a new folder with `surgical-sam prepare_custom --config "
        "my_data.yaml --out_dir NEW_FOLDER` (or a prepare_* command of a public dataset, see the model card) and "
        f"pass --dataset_dir NEW_FOLDER instead of {dataset_dir}; to try the bundle on generated data, run "
        "`surgical-sam demo`"
    )


# ------------------------------------------------------------------------------------------------
# dataset.json
# ------------------------------------------------------------------------------------------------


def validate_description(description: object, source: str = DESCRIPTION_FILE) -> dict:
    """Check the parts of a dataset description every reader relies on; return it.

    Checks that ``classes`` maps the ids "1".."C" (contiguous, no gaps) to unique non-empty names,
    that ``ignore_index`` (optional, default 255) is an integer in 0..255 outside 1..C and that
    ``frame_size`` (optional) is [H, W] with positive integers. ``source`` names the file in errors.
    """
    if not isinstance(description, dict):
        raise DatasetError(f"{source} must hold a JSON object (a dict), found {type(description).__name__}.")
    classes = description.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise DatasetError(
            f"{source} has no 'classes' table: add one mapping class ids to names, "
            'e.g. "classes": {"1": "Bipolar Forceps", "2": "Prograsp Forceps"} (0 is background).'
        )
    try:
        ids = sorted(int(key) for key in classes)
    except (TypeError, ValueError):
        raise DatasetError(
            f'{source}: the keys of \'classes\' must be integer ids written as strings ("1", "2", ...), '
            f"found {sorted(map(str, classes))}."
        ) from None
    expected = list(range(1, len(ids) + 1))
    if ids != expected:
        raise DatasetError(
            f"{source}: class ids must be 1..C without gaps (0 is background), found {ids}: "
            f"renumber the classes to {expected} in the label maps and in 'classes'."
        )
    names = [classes[str(class_id)] if str(class_id) in classes else None for class_id in ids]
    if any(not isinstance(name, str) or not name.strip() for name in names):
        raise DatasetError(f"{source}: every class needs a non-empty name, found {names}.")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DatasetError(f"{source}: class names must be unique, repeated: {repeated}.")
    ignore_index = description.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not 0 <= ignore_index <= 255:
        raise DatasetError(f"{source}: 'ignore_index' must be an integer in 0..255, found {ignore_index!r}.")
    if 0 <= ignore_index <= len(ids):
        raise DatasetError(
            f"{source}: 'ignore_index' {ignore_index} collides with background (0) or a class id (1..{len(ids)}): "
            f"use a value above {len(ids)}, e.g. {DEFAULT_IGNORE_INDEX}."
        )
    frame_size = description.get("frame_size")
    if frame_size is not None and (
        not isinstance(frame_size, (list, tuple))
        or len(frame_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in frame_size)
    ):
        raise DatasetError(f"{source}: 'frame_size' must be [height, width] in pixels, found {frame_size!r}.")
    return description


def read_dataset_description(dataset_dir: str | os.PathLike) -> dict:
    """Read and check ``<dataset_dir>/dataset.json``.

    Returns:
        the description dict; ``ignore_index`` is filled in with 255 when the file has none.

    Raises:
        DatasetError: the folder or the file is missing, the file is not JSON, or its class table is
            missing or not numbered 1..C.
    """
    dataset_dir = str(dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise DatasetError(f"dataset folder {dataset_dir} does not exist: {prepare_hint(dataset_dir)}.")
    path = os.path.join(dataset_dir, DESCRIPTION_FILE)
    if not os.path.isfile(path):
        raise DatasetError(
            f"{path} is missing: the dataset folder needs a {DESCRIPTION_FILE} describing classes and splits; "
            f"{prepare_hint(dataset_dir)}."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            description = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid JSON ({error}): fix or regenerate the file.") from None
    validate_description(description, source=path)
    description.setdefault("ignore_index", DEFAULT_IGNORE_INDEX)
    return description


def write_dataset_description(dataset_dir: str | os.PathLike, description: dict) -> str:
    """Check ``description`` and write it to ``<dataset_dir>/dataset.json`` (atomically); return the path."""
    validate_description(description, source="the dataset description")
    return atomic_write_json(os.path.join(str(dataset_dir), DESCRIPTION_FILE), description)


def class_names(description: dict) -> list[str]:
    """Names of the classes 1..C, ordered by id (background not included)."""
    classes = description["classes"]
    return [classes[key] for key in sorted(classes, key=int)]


_description_class_names = class_names  # for functions whose argument is named class_names

#: The settings of a training or evaluation run that dataset.json states (its one source).
DATASET_FACTS = ("class_names", "frame_size")


def dataset_fact(dataset_dir: str | os.PathLike, name: str):
    """``class_names`` (list of C names, ordered by id) or ``frame_size`` ([H, W]) of ``<dataset_dir>/dataset.json``.

    train.yaml's default of these settings: the dataset says them once and training, evaluation and the
    embedding cache all read them from there. A config or command line may still set them; then
    :func:`dataset_fact_problems` compares the two before any work.

    Raises:
        DatasetError: no dataset.json (the message says how to make one or set the value), or it has no
            ``frame_size``.
    """
    if name not in DATASET_FACTS:
        raise ValueError(f"unknown dataset fact {name!r}: one of {', '.join(DATASET_FACTS)}")
    path = os.path.join(str(dataset_dir), DESCRIPTION_FILE)
    if not os.path.isfile(path):
        raise DatasetError(
            f"{name} comes from the dataset's {DESCRIPTION_FILE}, but {path} does not exist: "
            f"{prepare_hint(dataset_dir)}. Without a dataset "
            f"(e.g. the original release's features) set --{name} in the config or on the command line."
        )
    description = read_dataset_description(dataset_dir)
    if name == "class_names":
        return class_names(description)
    if description.get("frame_size") is None:
        raise DatasetError(
            f'{path} has no frame_size: add "frame_size": [H, W] (the size of every frame) or pass '
            '--frame_size "[H, W]".'
        )
    return [int(v) for v in description["frame_size"]]


def raise_input_problems(problems: list[str], job: str, error: type[Exception] = MissingInputError) -> None:
    """``error`` "cannot <job>:" naming every problem on a line of its own; nothing when there is none."""
    if problems:
        raise error(f"cannot {job}:\n  - " + "\n  - ".join(problems))


def dataset_fact_problems(
    dataset_dir: str | os.PathLike, class_names: Sequence[str] | None = None, frame_size: Sequence[int] | None = None
) -> list[str]:
    """How the run's ``class_names`` / ``frame_size`` disagree with dataset.json, one line each; [] when they
    agree (None: not compared). Class names are compared by id and name, not by count."""
    description = read_dataset_description(dataset_dir)
    source = os.path.join(str(dataset_dir), DESCRIPTION_FILE)
    problems = []
    if class_names is not None:
        found = _description_class_names(description)
        given = [str(n) for n in class_names]
        if given != found:
            differing = [f"{i}: {g!r} vs {f!r}" for i, (g, f) in enumerate(zip(given, found), start=1) if g != f]
            detail = f"class ids {'; '.join(differing[:4])}" if differing else ""
            if len(given) != len(found):
                detail = (detail + "; " if detail else "") + f"{len(given)} classes vs {len(found)}"
            problems.append(
                f"class_names: the run's {given} disagree with {source}, which has {found} ({detail}). Leave "
                "class_names out of the command line and overlays to use the dataset's, or use the overlay that "
                "matches this dataset (e.g. endovis2017.yaml for EndoVis2017 data)."
            )
    if frame_size is not None and description.get("frame_size") is not None:
        found_size = [int(v) for v in description["frame_size"]]
        given_size = [int(v) for v in frame_size]
        if given_size != found_size:
            problems.append(
                f"frame_size: the run's {given_size} disagrees with {source}, which has {found_size}. Leave "
                f'frame_size out to use the dataset\'s, or pass --frame_size "{found_size}".'
            )
    return problems


def available_splits(description: dict) -> list[str]:
    """Keys of ``description`` holding a list of samples (dicts), e.g. ["training", "validation"]."""
    return [
        key
        for key, value in description.items()
        if isinstance(value, list) and all(isinstance(item, dict) for item in value)
    ]


def load_datalist(dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """The samples of one split with absolute paths.

    Returns:
        one dict per frame: ``image`` and ``label`` (absolute paths), ``sequence``, ``frame`` and
        ``key`` = "<sequence>/<frame>" (unique in the dataset; the cache key of the frame).

    Raises:
        DatasetError: unknown split (the message lists the available ones), empty split, entries
            without image/label, repeated keys, or listed files that are missing (named).
    """
    dataset_dir = os.path.abspath(str(dataset_dir))
    description = read_dataset_description(dataset_dir)
    source = os.path.join(dataset_dir, DESCRIPTION_FILE)
    splits = available_splits(description)
    if split not in splits:
        why = (
            (description.get("left_out_splits") or {}).get(split)
            if isinstance(description.get("left_out_splits"), dict)
            else None
        )
        reason = f" (the preparation could not make it: {why})" if why else ""
        raise DatasetError(
            f"{source} has no split '{split}'{reason}: available splits are {splits or 'none'}; "
            "choose one of them or add the split to the file."
        )
    entries = description[split]
    if not entries:
        raise DatasetError(f"split '{split}' of {source} is empty: list its frames or choose another split.")
    datalist, missing, incomplete = [], [], []
    for position, entry in enumerate(entries):
        if not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            incomplete.append(f"#{position}")
            continue
        image = os.path.normpath(os.path.join(dataset_dir, entry["image"]))
        label = os.path.normpath(os.path.join(dataset_dir, entry["label"]))
        missing.extend(path for path in (image, label) if not os.path.isfile(path))
        sequence = str(entry.get("sequence", Path(image).parent.name))
        frame = str(entry.get("frame", Path(image).stem))
        datalist.append(
            {"image": image, "label": label, "sequence": sequence, "frame": frame, "key": f"{sequence}/{frame}"}
        )
    if incomplete:
        raise DatasetError(
            f"split '{split}' of {source}: entries {name_files(incomplete)} need both an 'image' and a 'label' path."
        )
    if missing:
        raise DatasetError(
            f"split '{split}' of {source} lists {len(missing)} file(s) that do not exist: {name_files(missing)}; "
            "re-run the preparation step or remove those entries."
        )
    repeated = sorted(key for key, count in Counter(item["key"] for item in datalist).items() if count > 1)
    if repeated:
        raise DatasetError(
            f"split '{split}' of {source}: the frame keys (<sequence>/<frame>) must be unique, repeated: "
            f"{name_files(repeated)}; give every sequence a distinct name."
        )
    return datalist
