"""What each cache entry was made from: its frame and label map, by path under the dataset and by content.

An index entry of the embedding cache (:mod:`scripts.embedding_cache`) records its two source files as::

    "sources": {"image": {"path": "images/seq_1/00000.png", "size": 91234, "mtime_ns": ..., "blake2b": "..."},
                "label": {"path": "labels/seq_1/00000.png", ...}}

``path`` is relative to the dataset folder, ``blake2b`` a 128-bit BLAKE2b digest of the file's bytes. A
dataset that is moved (``mv``) or copied (``cp -r``) therefore keeps its cache, and an entry is stale only
when the bytes of its frame or label map changed. Size and mtime are a shortcut only: a file whose path,
size and mtime equal the record is taken as unchanged without reading it; otherwise its bytes are hashed
and compared. Caches of bundles up to 0.6 recorded ``[absolute path, size, mtime_ns]`` (no digest): those
records are read relative to the dataset they were made from, and are still valid while size and mtime
agree (``mv`` keeps both); precompute rewrites them in the form above.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: Source kinds of an entry, as the messages name them.
SOURCE_NAMES = {"image": "frame", "label": "label"}
#: How many changed files precompute names one per line before it sums up the rest.
CHANGES_LISTED = 20


def file_digest(path: str) -> str:
    """BLAKE2b (128-bit) of the bytes of ``path``, hex."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_path(path: str, root: str) -> str:
    """``path`` relative to the folder ``root``, with ``/`` separators (as the index records it)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def _same_stamp(record: dict, stat: os.stat_result) -> bool:
    return record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns


def source_record(path: str, dataset_dir: str, known: Iterable[dict] = ()) -> dict:
    """The record of source file ``path`` under ``dataset_dir``; its digest is taken from a ``known`` record of
    the same path, size and mtime when there is one, else from the file's bytes."""
    stat = os.stat(path)
    record = {"path": relative_path(path, dataset_dir), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    reused = next(
        (r["blake2b"] for r in known if r.get("blake2b") and r.get("path") == record["path"] and _same_stamp(r, stat)),
        None,
    )
    record["blake2b"] = reused or file_digest(path)
    return record


def normalised_sources(sources: dict, made_from: str | None) -> dict:
    """An index entry's sources as ``{kind: record}``; a record of bundles up to 0.6 ([absolute path, size,
    mtime_ns]) becomes a record without digest, its path relative to ``made_from`` (the dataset it was made
    from) and ``"absolute": True``."""
    records = {}
    for kind, source in sources.items():
        if isinstance(source, dict):
            records[kind] = source
        else:
            path, size, mtime_ns = source
            inside = made_from and not os.path.relpath(path, made_from).startswith("..")
            records[kind] = {
                "path": relative_path(path, made_from) if inside else path,
                "size": size,
                "mtime_ns": mtime_ns,
                "blake2b": None,
                "absolute": True,
            }
    return records


def same_source(recorded: dict, current: dict) -> bool:
    """Whether ``current`` (:func:`source_record`) is the file ``recorded`` was made from: the same path under
    the dataset and the same bytes (records without digest: the same size and mtime)."""
    if recorded.get("path") != current["path"]:
        return False
    if recorded.get("blake2b"):
        return recorded["blake2b"] == current["blake2b"]
    return recorded.get("size") == current["size"] and recorded.get("mtime_ns") == current["mtime_ns"]


def source_problem(kind: str, recorded: dict, dataset_dir: str) -> str | None:
    """Why the source file of ``recorded`` (a normalised record) is not the one the entry was made from, in a
    few words ("label labels/a/b.png changed"); None when it is. Reads the file only when its size or mtime
    differ from the record."""
    name = SOURCE_NAMES.get(kind, kind)
    path = recorded["path"] if os.path.isabs(recorded["path"]) else os.path.join(dataset_dir, recorded["path"])
    if not os.path.isfile(path):
        return f"{name} {recorded['path']} vanished"
    stat = os.stat(path)
    if _same_stamp(recorded, stat):
        return None
    if recorded.get("blake2b") and file_digest(path) == recorded["blake2b"]:
        return None
    return f"{name} {recorded['path']} changed"


def dataset_of_cache(cache_dir: str, made_from: str | None, depth: int = 3) -> str | None:
    """The dataset folder a cache reads its sources from: the dataset folder that holds it (train.yaml's default
    cache_dir is ``<dataset_dir>/embedding_cache/<sam_variant>``, which moves and is copied with the dataset),
    else ``made_from``, the folder precompute was given."""
    folder = os.path.abspath(cache_dir)
    for _ in range(depth):
        folder = os.path.dirname(folder)
        if os.path.isfile(os.path.join(folder, "dataset.json")):
            return folder
    return made_from


def log_dataset_location(dataset_dir: str, made_from: str | None) -> None:
    """Say in one line that the cache made from ``made_from`` serves the dataset now at ``dataset_dir``."""
    if made_from and os.path.abspath(made_from) != os.path.abspath(dataset_dir):
        how = "copied" if os.path.isdir(made_from) else "moved"
        logger.info(
            "dataset %s from %s: cache kept (entries are checked by content; now at %s)",
            how,
            made_from,
            os.path.abspath(dataset_dir),
        )


def log_changes(changes: dict[tuple[str, str], int]) -> None:
    """One line per changed source file, ``{(kind, description): entries re-encoded}``, e.g. "label a/b.png
    changed: re-encoding 1 entry"; past :data:`CHANGES_LISTED` files, one line for the rest."""
    for (kind, description), entries in list(changes.items())[:CHANGES_LISTED]:
        logger.info("%s: re-encoding %d entr%s", description, entries, "y" if entries == 1 else "ies")
    rest = list(changes.values())[CHANGES_LISTED:]
    if rest:
        logger.info("... and %d more source files changed: re-encoding %d more entries", len(rest), sum(rest))
