"""The embedding cache on disk (layout: :mod:`scripts.embedding_cache`): where its files are, the check a cache is
opened with (:func:`cache_problems`), and :class:`EmbeddingCache`, which training and evaluation read.

``precompute`` (:func:`.precompute.precompute_embeddings`) writes what this module reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .encoding import decode_embedding
from .identity import CACHE_FORMAT_VERSION, StaleCacheError
from .sources import dataset_of_cache, log_dataset_location, normalised_sources, source_problem

#: Folder of the entry files (format 2), shared by all splits.
ENTRIES_DIR = "entries"
MANIFEST_NAME = "manifest.json"
PRECOMPUTE_COMMAND = (
    "python -m monai.bundle run precompute --config_file <the same config files as this run> "
    "(it resumes an interrupted cache; pass a new cache_dir or delete the old one to rebuild)"
)


def index_path(cache_dir: str, split: str, version: int) -> str:
    """The index of one split and version: its entries (files, classes present, sources)."""
    return os.path.join(cache_dir, "index", f"{split}_v{version:02d}.json")


def entry_paths(cache_dir: str, version: int, key: str, with_taps: bool = False) -> tuple[str, ...]:
    """(embedding .npy, label .png[, taps .npy, frame .png]) of frame ``key`` ("<sequence>/<frame>") in one
    version, shared by all splits; the embedding is written last."""
    stem = os.path.join(cache_dir, ENTRIES_DIR, f"v{version:02d}", key)
    paths = (f"{stem}.npy", f"{stem}_label.png")
    return paths + (f"{stem}_taps.npy", f"{stem}_frame.png") if with_taps else paths


def holds_entries(cache_dir: str) -> bool:
    """Whether any entry (an embedding ``.npy``) is written under ``cache_dir``."""
    for _, _, names in os.walk(os.path.join(cache_dir, ENTRIES_DIR)):
        if any(name.endswith(".npy") for name in names):
            return True
    return False


# -------------------------------------------------------------------------------------------- reading
def check_format(manifest: dict, cache_dir: str, what_to_do: str) -> None:
    """StaleCacheError when the cache was written in another layout than :data:`CACHE_FORMAT_VERSION`."""
    found = (manifest.get("identity") or {}).get("format_version")
    if found != CACHE_FORMAT_VERSION:
        raise StaleCacheError(
            f"the embedding cache at {cache_dir} has format {found} but this bundle reads format "
            f"{CACHE_FORMAT_VERSION} (format 2 shares entry files between splits under '{ENTRIES_DIR}/'): it was "
            f"made by an older version of the bundle and is not used; {what_to_do}"
        )


def identity_diff(found: dict | None, expected: dict) -> str:
    if not found:
        return "no identity recorded"
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: cache {found.get(k)!r} vs run {expected.get(k)!r}" for k in keys)


def _split_problem(manifest: dict, cache_dir: str, split: str) -> str | None:
    if split in manifest["splits"]:
        return None
    return (
        f"the embedding cache at {cache_dir} has no {split!r} split (it has {sorted(manifest['splits'])}): "
        f"run {PRECOMPUTE_COMMAND}"
    )


def cache_problems(cache_dir: str, identity: dict, splits: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Why the cache at ``cache_dir`` cannot serve a run of ``identity`` that reads ``splits``: the one check
    :class:`EmbeddingCache` opens a cache with, and the run's input checks report.

    Returns:
        (missing, stale): messages of what is missing (no cache, a split never precomputed) and of a cache that
        is there but made for other inputs, in another format, or unfinished; each names the command that makes
        or rebuilds the cache. Both empty when the cache serves the run.
    """
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return [f"no embedding cache at {cache_dir}: make it with {PRECOMPUTE_COMMAND}"], []
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    try:
        check_format(
            manifest,
            cache_dir,
            f"delete that folder (or choose a new cache_dir) and rebuild it with {PRECOMPUTE_COMMAND}",
        )
    except StaleCacheError as error:
        return [], [str(error)]
    if manifest.get("identity") != identity and not holds_entries(cache_dir):
        return [
            f"no embedding cache at {cache_dir} (a precompute stopped there before it encoded any frame): make "
            f"it with {PRECOMPUTE_COMMAND}"
        ], []
    if manifest.get("identity") != identity:
        return [], [
            f"the embedding cache at {cache_dir} was made for other inputs than this run "
            f"({identity_diff(manifest.get('identity'), identity)}): it is not used, and precompute "
            f"never overwrites it. Pass --cache_dir NEW_FOLDER (or delete {cache_dir}) and make the cache for "
            f"this run's encoder with {PRECOMPUTE_COMMAND.split(' (')[0]} --cache_dir NEW_FOLDER; or point "
            "--cache_dir at a cache made for this run's encoder and weights."
        ]
    if not manifest.get("complete"):
        return [], [
            f"the embedding cache at {cache_dir} is incomplete (precompute was interrupted): run {PRECOMPUTE_COMMAND}"
        ]
    return [problem for split in splits if (problem := _split_problem(manifest, cache_dir, split))], []


class EmbeddingCache:
    """A checked, complete cache on disk (see the module docstring).

    The interface the datasets use (also implemented by ``original_layout.OriginalLayoutReader``):
    ``cache_dir``, ``class_names``, ``image_size``, ``grid_size``, ``versions(split)``,
    ``entries(split, version)`` (dicts with ``key``, ``classes``, ``grid_classes``, ``frame_size``) and
    ``load(entry) -> (embedding (d, h, w) float32, label map (H, W) long)``; a reader that keeps one binary
    mask per class also offers ``load_class_mask(entry, class_id) -> (embedding, mask (H, W) bool)``, which
    training samples then use.

    ``check_sources``: check, once per split and version, that each entry's frame and label map are still the
    files it was made from (:mod:`.sources`: by path under the dataset and by content) in ``dataset_dir``:
    by default the dataset folder that holds the cache (train.yaml's default place, which moves with it), else
    the one precompute was given.

    Raises:
        FileNotFoundError: no cache at ``cache_dir``.
        StaleCacheError: the cache is of another format, made for other inputs than ``identity``, or unfinished
            (:func:`cache_problems` says which).
    """

    def __init__(
        self, cache_dir: str, identity: dict, check_sources: bool = True, dataset_dir: str | None = None
    ) -> None:
        self.cache_dir = cache_dir
        missing, stale = cache_problems(cache_dir, identity)
        if missing:
            raise FileNotFoundError(missing[0])
        if stale:
            raise StaleCacheError(stale[0])
        with open(os.path.join(cache_dir, MANIFEST_NAME)) as handle:
            self.manifest = json.load(handle)
        self.check_sources = check_sources
        self.made_from = (self.manifest.get("dataset") or {}).get("dataset_dir")
        self.dataset_dir = os.path.abspath(dataset_dir) if dataset_dir else dataset_of_cache(cache_dir, self.made_from)
        self._location_said = False
        self._indexes: dict[tuple[str, int], list[dict]] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["dataset"]["class_names"])

    @property
    def image_size(self) -> int:
        """S, the side of SAM's square input the embeddings were made at."""
        return int(self.manifest["identity"]["image_size"])

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the embedding grid."""
        return tuple(self.manifest["identity"]["grid_size"])

    def versions(self, split: str) -> list[int]:
        problem = _split_problem(self.manifest, self.cache_dir, split)
        if problem:
            raise StaleCacheError(problem)
        return list(self.manifest["splits"][split])

    def entries(self, split: str, version: int = 0) -> list[dict]:
        """Index entries of one split and version, checked against their source files once."""
        if (split, version) not in self._indexes:
            if version not in self.versions(split):
                raise StaleCacheError(f"the embedding cache at {self.cache_dir} has no version {version} of {split!r}")
            with open(index_path(self.cache_dir, split, version)) as handle:
                entries = json.load(handle)["entries"]
            if self.check_sources:
                self._check_sources(entries)
            self._indexes[(split, version)] = entries
        return self._indexes[(split, version)]

    def _check_sources(self, entries: list[dict]) -> None:
        """StaleCacheError naming the frames and label maps that changed or vanished since ``entries`` were made."""
        problems, absolute = [], False
        for entry in entries:
            for kind, record in normalised_sources(entry["sources"], self.made_from).items():
                problem = source_problem(kind, record, self.dataset_dir)
                if problem:
                    problems.append(problem)
                    absolute = absolute or record.get("absolute", False)
        if problems:
            older = (
                " This cache was made by a bundle up to 0.6, which recorded its sources by absolute paths and "
                "file times: precompute records them by content and keeps the entries of unchanged files."
                if absolute
                else ""
            )
            raise StaleCacheError(
                f"{len(problems)} source files changed or vanished since the embedding cache at {self.cache_dir} was "
                f"made from the dataset at {self.dataset_dir} ({'; '.join(problems[:3])}).{older} Re-encode those "
                f"entries with {PRECOMPUTE_COMMAND}"
            )
        if not self._location_said:
            log_dataset_location(self.dataset_dir, self.made_from)
            self._location_said = True

    def load(self, entry: dict, as_stored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embedding (d, h, w) float32, label map (H, W) long; with ``as_stored`` compact: the embedding as
        float16 (a float16 entry as it is) and the uint8 label map as the cache holds it (the training batch widens
        them once, on its device). Either encoding of the entry (:mod:`.encoding`) is read."""
        stored = np.load(os.path.join(self.cache_dir, entry["embedding"]))
        label = np.array(Image.open(os.path.join(self.cache_dir, entry["label"])))
        if as_stored:
            embedding = stored if stored.dtype == np.float16 else decode_embedding(stored).astype(np.float16)
            return torch.from_numpy(embedding), torch.from_numpy(label)
        return torch.from_numpy(decode_embedding(stored)), torch.from_numpy(label.astype(np.int64))

    def load_taps(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Tap cache only -> taps (n_taps, h, w, C_vit) float32 and the augmented frame (3, H, W) float32 0..255."""
        if "taps" not in entry:
            raise StaleCacheError(
                f"the cache at {self.cache_dir} holds no encoder taps (a SurgicalSAM embedding "
                f"cache?): make a tap cache with {PRECOMPUTE_COMMAND}"
            )
        taps = torch.from_numpy(np.load(os.path.join(self.cache_dir, entry["taps"])).astype(np.float32))
        frame = np.asarray(Image.open(os.path.join(self.cache_dir, entry["frame"])).convert("RGB"))
        return taps, torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1))).float()
