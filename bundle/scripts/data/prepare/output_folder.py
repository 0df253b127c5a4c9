"""A preparation's output folder: what a preparation writes at its top, and the check that refuses a folder holding
anything else (user data is never overwritten or deleted; the embedding caches ``precompute`` put there are kept).
"""

from __future__ import annotations

import json
import os

from scripts.data.layout import (
    BINARY_ANNOTATIONS_DIR,
    DESCRIPTION_FILE,
    IMAGES_DIR,
    LABELS_DIR,
    DatasetError,
    name_files,
)

#: Summary of a preparation, next to dataset.json.
SUMMARY_FILE = "preparation_summary.json"
#: Per-frame source stamps of the last run (what makes re-runs idempotent and resumable).
STATE_FILE = ".preparation_state.json"
#: Folder inside out_dir where a frame's files are written before they are moved into place.
STAGING_DIR = ".staging"
#: Everything a preparation writes at the top of out_dir.
OUTPUT_ENTRIES = frozenset(
    {
        DESCRIPTION_FILE,
        DESCRIPTION_FILE + ".tmp",
        IMAGES_DIR,
        LABELS_DIR,
        BINARY_ANNOTATIONS_DIR,
        SUMMARY_FILE,
        SUMMARY_FILE + ".tmp",
        STATE_FILE,
        STATE_FILE + ".tmp",
        STAGING_DIR,
    }
)
#: The state is saved after this many newly written frames (and at the end).


#: Depth below a top-level folder of out_dir at which an embedding cache's manifest is looked for
#: (train.yaml's default cache_dir is <dataset_dir>/embedding_cache/<sam_variant>).
CACHE_SEARCH_DEPTH = 2


def is_embedding_cache_folder(path: str, depth: int = CACHE_SEARCH_DEPTH) -> bool:
    """Whether ``path`` is (or holds, ``depth`` folders down) an embedding or tap cache made by ``precompute``.

    The default cache_dir lies inside the dataset folder, so a prepared dataset holds one after
    ``run precompute``; a re-run of the preparation keeps it as it is (and never reads or writes it).
    A cache is recognised by its manifest.json with an ``identity``.
    """
    if not os.path.isdir(path):
        return False
    manifest = os.path.join(path, "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as handle:
                return isinstance(json.load(handle).get("identity"), dict)
        except (OSError, ValueError, AttributeError):
            return False
    if depth <= 0:
        return False
    try:
        children = [os.path.join(path, name) for name in os.listdir(path)]
    except OSError:
        return False
    folders = [child for child in children if os.path.isdir(child)]
    return (
        bool(folders)
        and len(folders) == len(children)
        and all(is_embedding_cache_folder(child, depth - 1) for child in folders)
    )


def check_out_dir(out_dir: str, preparer: str) -> dict | None:
    """Make sure ``out_dir`` may be written by ``preparer``; return its previous state (or None).

    ``out_dir`` may be missing, empty, or hold a (possibly unfinished) preparation by the same
    command. Anything else (other files, a dataset made by another command or by hand) is refused
    with DatasetError, and nothing is touched.
    """
    if not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise DatasetError(f"--out_dir {out_dir} is a file, not a folder: choose a folder for the prepared dataset.")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return None
    foreign = [
        e for e in entries if e not in OUTPUT_ENTRIES and not is_embedding_cache_folder(os.path.join(out_dir, e))
    ]
    state_path = os.path.join(out_dir, STATE_FILE)
    state = None
    if os.path.isfile(state_path):
        try:
            with open(state_path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            state = None
    if foreign or not isinstance(state, dict):
        what = (
            f"files this command did not make ({name_files(foreign)})"
            if foreign
            else (f"a dataset without the record {STATE_FILE} of a preparation")
        )
        raise DatasetError(
            f"--out_dir {out_dir} is not empty and holds {what}: the preparation writes only into an empty "
            "folder or one it prepared before, and never deletes your data; choose another --out_dir."
        )
    if state.get("preparer") != preparer:
        raise DatasetError(
            f"--out_dir {out_dir} holds a dataset prepared by {state.get('preparer')!r}, not by {preparer!r}: "
            "choose another --out_dir (the existing dataset is left as it is)."
        )
    return state
