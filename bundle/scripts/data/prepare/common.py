"""Machinery shared by the preparation commands: the output folder, resuming, the summary.

A preparation command (one module per source in this package) finds the raw frames, describes each
one as a :class:`RawFrame` (its sources and a ``load`` function returning the frame and its label
map) and hands them to :func:`run_preparation`, which

* refuses an ``out_dir`` that holds anything but a dataset made by the same command
  (:func:`check_out_dir`) and the embedding caches ``precompute`` put there: user data is never
  overwritten or deleted, a cache is kept as it is;
* writes every frame in the layout of :mod:`scripts.data.layout` through
  :func:`~scripts.data.frame_files.write_sample`, first into a staging folder inside ``out_dir`` and then
  moved into place file by file with ``os.replace`` (atomic: a file is either the old or the new one);
* records, per frame, a stamp of its sources (relative path, size, modification time) and the
  settings of the command in ``<out_dir>/.preparation_state.json``. A re-run skips every frame whose
  stamp is unchanged and whose outputs exist, so an interrupted run resumes where it stopped and a
  finished one rewrites nothing;
* reports every frame it cannot use (unreadable, wrong size, unexpected mask values...) by file name
  on the console and in the summary, never dropping one silently;
* writes ``<out_dir>/preparation_summary.json`` (frames per split, frames and pixels per class,
  skipped files and why, counters the command adds such as overlap pixels) and then, last,
  ``dataset.json``: a folder without dataset.json is an unfinished preparation;
* optionally reads the result back with :func:`~scripts.data.frame_files.check_dataset`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from scripts.data.frame_files import check_dataset, write_sample
from scripts.data.layout import (
    BINARY_ANNOTATIONS_DIR,
    DEFAULT_IGNORE_INDEX,
    DESCRIPTION_FILE,
    IMAGES_DIR,
    LABELS_DIR,
    DatasetError,
    name_files,
    validate_description,
    write_dataset_description,
)
from scripts.data.prepare.output_folder import STAGING_DIR, STATE_FILE, SUMMARY_FILE, check_out_dir
from scripts.data.prepare.raw_inputs import SkipFrame, natural_key
from scripts.data.prepare.summary import class_counts, format_summary, sum_notes
from scripts.files import atomic_write_text

STATE_SAVE_INTERVAL = 25
#: Version of the state file format; a different version redoes every frame.
STATE_VERSION = 1


@dataclass
class LoadedFrame:
    """What a frame's ``load`` returns.

    Attributes:
        image: (H, W, 3) uint8 RGB frame, already cropped / resized to the output size.
        label_map: (H, W) uint8: 0 background, 1..C classes, ``ignore_index`` unlabelled.
        notes: counters the command wants summed in the summary (e.g. ``{"overlap pixels": 12}``).
    """

    image: np.ndarray
    label_map: np.ndarray
    notes: dict[str, int] = field(default_factory=dict)


@dataclass
class RawFrame:
    """One raw frame to prepare.

    Attributes:
        sequence: output sequence name (folder under images/, labels/...).
        frame: output frame name (file stem).
        sources: the raw files this frame is made from (their stamps decide when to redo it).
        load: returns a :class:`LoadedFrame`; raises :class:`SkipFrame` (or DatasetError) when the
            frame cannot be used.
    """

    sequence: str
    frame: str
    sources: tuple[str, ...]
    load: Callable[[], LoadedFrame]

    @property
    def key(self) -> str:
        return f"{self.sequence}/{self.frame}"


# ------------------------------------------------------------------------------------------ small helpers
def source_stamp(path: str, root: str) -> list:
    """[path relative to ``root``, size in bytes, modification time in ns] of a raw file."""
    status = os.stat(path)
    return [os.path.relpath(path, root), status.st_size, status.st_mtime_ns]


def write_json_if_changed(path: str, data: object) -> bool:
    """Write ``data`` as JSON to ``path`` atomically, only if the content differs; True when written."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return False
    atomic_write_text(path, text)
    return True


def _frame_outputs(out_dir: str, sequence: str, frame: str) -> tuple[str, str, list[str]]:
    image = os.path.join(out_dir, IMAGES_DIR, sequence, f"{frame}.png")
    label = os.path.join(out_dir, LABELS_DIR, sequence, f"{frame}.png")
    binary_dir = os.path.join(out_dir, BINARY_ANNOTATIONS_DIR, sequence)
    pattern = re.compile(re.escape(frame) + r"_class\d+\.png$")
    binaries = (
        [os.path.join(binary_dir, n) for n in os.listdir(binary_dir) if pattern.match(n)]
        if os.path.isdir(binary_dir)
        else []
    )
    return image, label, binaries


def _remove_frame_outputs(out_dir: str, sequence: str, frame: str) -> None:
    image, label, binaries = _frame_outputs(out_dir, sequence, frame)
    for path in [image, label, *binaries]:
        if os.path.isfile(path):
            os.remove(path)


def _same_bytes(first: str, second: str) -> bool:
    if not os.path.isfile(second) or os.path.getsize(first) != os.path.getsize(second):
        return False
    with open(first, "rb") as a, open(second, "rb") as b:
        return a.read() == b.read()


def _write_frame_atomically(out_dir: str, raw: RawFrame, loaded: LoadedFrame, num_classes: int) -> dict:
    """write_sample into the staging folder, then move each file into place; return the entry."""
    staging = os.path.join(out_dir, STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    entry = write_sample(staging, raw.sequence, raw.frame, loaded.image, loaded.label_map, num_classes)
    _, _, old_binaries = _frame_outputs(out_dir, raw.sequence, raw.frame)
    new_files = []
    for folder, _, names in os.walk(staging):
        for name in names:
            new_files.append(os.path.relpath(os.path.join(folder, name), staging))
    for relative in sorted(new_files):
        source, target = os.path.join(staging, relative), os.path.join(out_dir, relative)
        if _same_bytes(source, target):
            continue  # an identical file stays untouched (its modification time too)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
    kept = {os.path.normpath(os.path.join(out_dir, r)) for r in new_files}
    for path in old_binaries:  # masks of classes the frame no longer has
        if os.path.normpath(path) not in kept:
            os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)
    return entry


# ------------------------------------------------------------------------------------------ the run
def run_preparation(
    out_dir: str,
    preparer: str,
    description: Mapping,
    frames: Sequence[RawFrame],
    splits: Mapping[str, Iterable[str]],
    raw_root: str,
    settings: Mapping | None = None,
    frame_size: Sequence[int] | None = None,
    problems: Sequence[tuple[str, str]] = (),
    check: bool = True,
    progress: bool = True,
    left_out_splits: Mapping[str, str] | None = None,
    optional_splits: bool = False,
    extra_summary: Mapping | None = None,
) -> dict:
    """Prepare ``frames`` into ``out_dir``; write the summary and dataset.json; return the summary.

    Args:
        out_dir: the prepared dataset folder (made if needed; see :func:`check_out_dir`).
        preparer: name of the command (recorded; another command's folder is refused).
        description: dataset.json without the splits: ``name``, ``description``, ``classes``
            ({"1": name, ...}), ``ignore_index``; ``frame_size`` is filled in.
        frames: the raw frames, in the order of the datalists.
        splits: split name -> sequence names in it (a sequence may be in several splits, e.g.
            cross-validation folds). Frames of a sequence in no split are skipped and reported.
        raw_root: the raw folder; source stamps are relative to it (so the raw folder may move).
        settings: everything else that changes the output (crop, class table, ...); a change
            redoes every frame.
        frame_size: (H, W) every output frame must have; None: the first usable frame decides.
            A frame of another size is skipped and reported.
        problems: (file, reason) pairs the command found before loading (e.g. unknown folders).
        check: read the result back with check_dataset at the end.
        progress: show a tqdm progress bar.
        left_out_splits: split name -> why the command could not make it (e.g. an EndoVis2017 fold whose
            datasets are not in the download); recorded in dataset.json and the summary (``left_out_splits``).
        optional_splits: a split that ends up without a usable frame is left out (and recorded with why)
            instead of failing the preparation; at least one split must remain.
        extra_summary: more entries of the summary (e.g. ``incomplete_folds``).

    Returns:
        the summary (also written to ``<out_dir>/preparation_summary.json``) plus ``written`` and
        ``reused``: frames written by this run and frames kept from an earlier run.

    Raises:
        DatasetError: ``out_dir`` is refused, no frame is usable, or a split ends up empty.
    """
    out_dir = str(out_dir)
    _check_frames_and_description(preparer, description, frames)
    num_classes = len(description["classes"])
    ignore_index = int(description.get("ignore_index", DEFAULT_IGNORE_INDEX))
    previous = check_out_dir(out_dir, preparer)
    state = _PreparationState(out_dir, preparer, json.loads(json.dumps(dict(settings or {}))))  # plain JSON types
    old_frames = state.previous_frames(previous)
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(os.path.join(out_dir, STAGING_DIR), ignore_errors=True)
    split_sequences = {name: set(sequences) for name, sequences in splits.items()}
    skipped: list[dict] = [{"file": str(f), "reason": r} for f, r in problems]
    for file, reason in problems:
        tqdm.write(f"skipped {file}: {reason}")
    if previous is None:
        state.save()  # mark the folder as ours before the first frame is written

    in_some_split = set().union(*split_sequences.values()) if split_sequences else set()
    size = tuple(int(v) for v in frame_size) if frame_size is not None else None
    written, reused, size = _prepare_frames(
        state, frames, old_frames, in_some_split, raw_root, size, num_classes, skipped, progress
    )
    _remove_dropped_frames(out_dir, old_frames, state.frames)
    state.save()
    if not state.frames:
        shown = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
        raise DatasetError(
            f"no usable frame was found for {preparer} ({len(skipped)} skipped{': ' + shown if shown else ''})."
        )

    names = {
        class_id: description["classes"][str(class_id)] for class_id in sorted(int(k) for k in description["classes"])
    }
    order = {raw.key: position for position, raw in enumerate(frames)}
    kept = sorted(state.frames, key=order.__getitem__)
    entries, left_out = _split_entries(preparer, split_sequences, kept, left_out_splits, optional_splits)
    final = {**description, "frame_size": list(size), **entries, **({"left_out_splits": left_out} if left_out else {})}
    summary = {
        "preparer": preparer,
        "frame_size": list(size),
        "classes": {str(k): v for k, v in names.items()},
        "ignore_index": ignore_index,
        "frames": len(kept),
        "frames_per_split": {split: len(entries[split]) for split in entries},
        "sequences": {
            split: sorted(split_sequences[split] & {k.rsplit("/", 1)[0] for k in kept}, key=natural_key)
            for split in entries
        },
        **class_counts([state.frames[k] for k in kept], names, ignore_index),
        "per_split": {
            split: class_counts([state.frames[f"{e['sequence']}/{e['frame']}"] for e in items], names, ignore_index)
            for split, items in entries.items()
        },
        "notes": sum_notes(state.frames[k] for k in kept),
        "skipped": skipped,
        **({"left_out_splits": left_out} if left_out else {}),
        **dict(extra_summary or {}),
    }
    write_json_if_changed(os.path.join(out_dir, SUMMARY_FILE), summary)
    _write_description_if_changed(out_dir, final)  # last: its presence marks a finished preparation
    if check:  # splits that together hold every frame once or so: each frame is read back, not once per split
        check_dataset(out_dir, splits=_covering_splits(entries))
    print(format_summary(summary, out_dir, written, reused))
    return {**summary, "written": written, "reused": reused}


# ------------------------------------------------------------------------------------------ its steps
def _check_frames_and_description(preparer: str, description: Mapping, frames: Sequence[RawFrame]) -> None:
    """A valid dataset description (without frame size and splits), and one raw file per output frame."""
    validate_description({**description, "frame_size": None}, source="the dataset description")
    repeated = sorted(key for key, count in Counter(raw.key for raw in frames).items() if count > 1)
    if repeated:
        raise DatasetError(
            f"{preparer}: several raw files would become the same output frame(s) {name_files(repeated)} (e.g. "
            "frame.png and frame.jpg in one sequence): keep one file per frame name."
        )


class _PreparationState:
    """The preparation state file of ``out_dir``: who made the folder, with which settings, and a record of each
    frame written (``frames``: key -> stamp, size, pixel counts, notes), so that a rerun redoes only what changed."""

    def __init__(self, out_dir: str, preparer: str, settings: dict) -> None:
        self.out_dir, self.preparer, self.settings = out_dir, preparer, settings
        self.frames: dict[str, dict] = {}

    def previous_frames(self, previous: dict | None) -> dict:
        """The records of an earlier run that may be kept (same state version and settings); with other
        settings, the earlier frames' keys with None (so that their outputs are removed)."""
        if previous and previous.get("version") == STATE_VERSION and previous.get("settings") == self.settings:
            return dict(previous.get("frames", {}))
        return {key: None for key in previous.get("frames", {})} if previous else {}

    def save(self) -> None:
        write_json_if_changed(
            os.path.join(self.out_dir, STATE_FILE),
            {"preparer": self.preparer, "version": STATE_VERSION, "settings": self.settings, "frames": self.frames},
        )


def _prepare_frames(
    state: _PreparationState,
    frames: Sequence[RawFrame],
    old_frames: Mapping,
    in_some_split: set,
    raw_root: str,
    size: tuple[int, int] | None,
    num_classes: int,
    skipped: list[dict],
    progress: bool,
) -> tuple[int, int, tuple[int, int] | None]:
    """Write every usable frame of a split into ``state.out_dir`` (keeping those an earlier run made from the same
    sources), recording each in ``state.frames`` and each unusable one in ``skipped``.

    ``size``: (H, W) every frame must have; None: the first usable frame decides. Returns (frames written,
    frames kept, the frame size).
    """
    out_dir = state.out_dir
    written = reused = unsaved = 0
    bar = tqdm(frames, desc=state.preparer, unit="frame", disable=not progress, leave=False)
    for raw in bar:
        if raw.sequence not in in_some_split:
            skipped.append({"file": raw.key, "reason": f"sequence {raw.sequence} is in no split"})
            continue
        try:
            stamp = [source_stamp(path, raw_root) for path in raw.sources]
        except OSError as error:
            skipped.append({"file": raw.key, "reason": f"cannot read its sources ({error})"})
            continue
        old = old_frames.get(raw.key)
        if _still_prepared(out_dir, raw, old, stamp, size):
            state.frames[raw.key] = old
            size = size or tuple(old["size"])
            reused += 1
            continue
        loaded = _load_frame(raw, size, skipped)
        if loaded is None:
            continue
        size = tuple(loaded.image.shape[:2])
        if written == 0 and os.path.isfile(os.path.join(out_dir, DESCRIPTION_FILE)):
            os.remove(os.path.join(out_dir, DESCRIPTION_FILE))  # the folder changes: unfinished until the end
        _write_frame_atomically(out_dir, raw, loaded, num_classes)
        counts = np.bincount(loaded.label_map.ravel(), minlength=256)
        state.frames[raw.key] = {
            "stamp": stamp,
            "size": list(size),
            "pixels": {str(v): int(counts[v]) for v in np.flatnonzero(counts)},
            "notes": {k: int(v) for k, v in loaded.notes.items() if v},
        }
        written += 1
        unsaved += 1
        if unsaved >= STATE_SAVE_INTERVAL:
            state.save()
            unsaved = 0
    bar.close()
    return written, reused, size


def _still_prepared(out_dir: str, raw: RawFrame, old: dict | None, stamp: list, size: tuple[int, int] | None) -> bool:
    """An earlier run wrote this frame from the same sources, its outputs are there, and it has the run's size."""
    image_path, label_path, _ = _frame_outputs(out_dir, raw.sequence, raw.frame)
    return (
        old is not None
        and old.get("stamp") == stamp
        and os.path.isfile(image_path)
        and os.path.isfile(label_path)
        and (size is None or list(size) == old.get("size"))
    )


def _load_frame(raw: RawFrame, size: tuple[int, int] | None, skipped: list[dict]) -> LoadedFrame | None:
    """The loaded frame, or None (recorded in ``skipped`` and shown) when it cannot be used: the command's
    loader refused it, its label map and frame differ in size, or it is not of the dataset's ``size``."""
    try:
        loaded = raw.load()
    except SkipFrame as skip:
        file, reason = skip.file, skip.reason
    except DatasetError as error:
        file, reason = raw.key, str(error)
    else:
        file, frame_shape = raw.key, tuple(loaded.image.shape[:2])
        if loaded.label_map.shape != frame_shape:
            reason = f"label map {loaded.label_map.shape} and frame {frame_shape} differ in size"
        elif size is not None and frame_shape != size:
            reason = f"frame is {frame_shape[0]}x{frame_shape[1]}, the dataset's frames are {size[0]}x{size[1]}"
        else:
            return loaded
    skipped.append({"file": file, "reason": reason})
    tqdm.write(f"skipped {file}: {reason}")
    return None


def _remove_dropped_frames(out_dir: str, old_frames: Mapping, kept: Mapping) -> None:
    """Remove the outputs of frames an earlier run wrote but this run did not keep (source gone, now bad, ...)."""
    for key in old_frames:
        if key not in kept and "/" in key:
            sequence, frame = key.rsplit("/", 1)
            _remove_frame_outputs(out_dir, sequence, frame)


def _split_entries(
    preparer: str,
    split_sequences: Mapping[str, set],
    kept: Sequence[str],
    left_out_splits: Mapping[str, str] | None,
    optional_splits: bool,
) -> tuple[dict, dict]:
    """dataset.json's splits: split -> entries of its kept frames (in the order of ``kept``), and the splits
    left out with why (given ones, plus with ``optional_splits`` those without a usable frame).

    Raises:
        DatasetError: a split has no usable frame (and ``optional_splits`` is off), or no split remains.
    """
    entries: dict[str, list[dict]] = {}
    left_out = dict(left_out_splits or {})
    for split, sequences in split_sequences.items():
        keys = [key for key in kept if key.rsplit("/", 1)[0] in sequences]
        if not keys:
            shown = name_files(sorted(sequences, key=natural_key)) or "none"
            if not optional_splits:
                raise DatasetError(
                    f"split '{split}' of {preparer} has no usable frame (its sequences: {shown}): "
                    "check the raw folder and the split."
                )
            left_out[split] = f"no usable frame in its sequences {shown}"
            continue
        entries[split] = [_entry(*key.rsplit("/", 1)) for key in keys]
    if not entries:
        reasons = "; ".join(f"{k}: {v}" for k, v in left_out.items())
        raise DatasetError(f"no split of {preparer} can be made: {reasons}")
    return entries, left_out


def _entry(sequence: str, frame: str) -> dict:
    """The dataset.json entry of a frame (as write_sample returns it)."""
    return {
        "image": f"{IMAGES_DIR}/{sequence}/{frame}.png",
        "label": f"{LABELS_DIR}/{sequence}/{frame}.png",
        "sequence": sequence,
        "frame": frame,
    }


def _covering_splits(entries: Mapping[str, list[dict]]) -> list[str]:
    """A few splits that together list every frame (greedy: the split adding most frames first)."""
    keys = {split: {(e["sequence"], e["frame"]) for e in items} for split, items in entries.items()}
    remaining = set().union(*keys.values()) if keys else set()
    chosen: list[str] = []
    while remaining:
        best = max(keys, key=lambda split: len(remaining & keys[split]))
        chosen.append(best)
        remaining -= keys[best]
    return chosen


def _write_description_if_changed(out_dir: str, description: dict) -> None:
    path = os.path.join(out_dir, DESCRIPTION_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                if json.load(handle) == json.loads(json.dumps(description)):
                    return
        except (OSError, ValueError):
            pass
    write_dataset_description(out_dir, description)
