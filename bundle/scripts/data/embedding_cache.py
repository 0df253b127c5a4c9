"""The embedding cache: SAM image embeddings computed once per (frame, augmentation version).

SurgicalSAM trains with the image encoder frozen, so its embeddings are computed once by the
``precompute`` workflow and read back by training and validation. Layout under ``cache_dir``::

    manifest.json                                identity (encoder, checkpoint md5, input size, ...)
    index/<split>_v<NN>.json                     one entry per frame: files, classes present, sources
    entries/v<NN>/<sequence>/<frame>.npy         float16 (d, h, w) embedding
    entries/v<NN>/<sequence>/<frame>_label.png   the label map after the version's augmentation

Entry files are keyed by (version, sequence/frame) only, not by split: a frame listed in several splits
(the four EndoVis2017 folds list every sequence in three training splits and one validation split) is
encoded once, and precomputing a new split reuses every entry already there. Indexes stay per split.
The training splits (``augmented_splits``) get versions 0..K, the others version 0. Format 1 (entries
under ``<split>/v<NN>/``) is not read: such a cache raises :class:`StaleCacheError` asking for a rebuild.

A *tap cache* (Distillation-SAM, ``taps=`` given) is the same cache with two more files per entry,
and the tap blocks in its identity::

    entries/v<NN>/<sequence>/<frame>_taps.npy   float16 (n_taps, h, w, C_vit) encoder tokens after the tap blocks
    entries/v<NN>/<sequence>/<frame>_frame.png  the frame after the version's augmentation (uint8 RGB; the
                                                adapter's PVT still runs on it)

Before anything is written, precompute states the disk use (bytes per entry x frames x versions) and
refuses when it does not fit in the free space of the cache's disk (:class:`CacheSpaceError`).
A cache is used only when its identity equals the one the run expects and no source frame or label
changed since; otherwise :class:`StaleCacheError` says what differs and the command that rebuilds it.
Precompute writes every file atomically and skips what is already there, so a killed run resumes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..sam.backbone import build_sam, get_variant, tapped_encoder_forward
from ..sam.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD, frames_to_sam_input, masks_to_embedding_grid
from ..files import atomic_write, atomic_write_json
from ..sam.checkpoint import memoised_md5
from .augmentation import VERSIONS_PER_GROUP, augment_frame, check_augmentation_draws
from .layout import check_dataset, class_names, load_datalist, read_dataset_description, read_frame, read_label_map

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
#: Folder of the entry files (format 2), shared by all splits.
ENTRIES_DIR = "entries"
MANIFEST_NAME = "manifest.json"
PRECOMPUTE_COMMAND = (
    "python -m monai.bundle run precompute --config_file <the same config files as this run> "
    "(it resumes an interrupted cache; pass a new cache_dir or delete the old one to rebuild)"
)


class StaleCacheError(RuntimeError):
    """The cache on disk was made for other inputs than this run's, or is incomplete."""


class CacheSpaceError(OSError):
    """The cache would not fit in the free space of its disk."""


#: precompute warns when the cache would take more than this fraction of the free space.
SPACE_WARN_FRACTION = 0.8


# ------------------------------------------------------------------------------------------ identity
def checkpoint_fingerprint(path: str | None) -> str:
    """md5 of the SAM checkpoint (:func:`~scripts.sam.checkpoint.memoised_md5`), "random-init" for none."""
    if path is None:
        return "random-init"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    return memoised_md5(path)


def cache_identity(sam_variant: str, sam_checkpoint: str | None, taps: Sequence[int] | None = None) -> dict:
    """What an embedding depends on; a cache is reused only when this matches exactly.

    ``taps`` (1-based ViT blocks, Distillation-SAM) makes it a tap cache's identity: the blocks, in
    order, and the tokens' width are part of it, so a cache of other taps is refused.
    """
    spec = get_variant(sam_variant)
    identity = {
        "format_version": CACHE_FORMAT_VERSION,
        "sam_variant": sam_variant,
        "sam_checkpoint_md5": checkpoint_fingerprint(sam_checkpoint),
        "image_size": spec.image_size,
        "grid_size": [spec.grid_size, spec.grid_size],
        "embed_dim": spec.prompt_embed_dim,
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
        "dtype": "float16",
    }
    if taps is not None:
        blocks = [int(k) for k in taps]
        if not blocks or any(not 1 <= k <= spec.encoder_depth for k in blocks):
            raise ValueError(f"taps must be 1-based blocks in 1..{spec.encoder_depth} for {sam_variant}, "
                             f"got {list(taps)}")
        identity.update({"taps": blocks, "tap_dim": spec.encoder_embed_dim, "contents": "embedding+taps+frame"})
    return identity


def entry_bytes(identity: dict) -> int:
    """Bytes of the float16 arrays of one cache entry (embedding, and the taps of a tap cache), without
    the small ``.npy`` headers and the PNGs."""
    grid_h, grid_w = identity["grid_size"]
    size = identity["embed_dim"] * grid_h * grid_w * 2
    if "taps" in identity:
        size += len(identity["taps"]) * grid_h * grid_w * identity["tap_dim"] * 2
    return size


def check_disk_space(cache_dir: str, needed_bytes: int, what: str) -> int:
    """Refuse (:class:`CacheSpaceError`) when ``needed_bytes`` do not fit in the free space of the disk that
    holds (or will hold) ``cache_dir``; warn above ``SPACE_WARN_FRACTION`` of it. Returns the free bytes."""
    folder = os.path.abspath(cache_dir)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise CacheSpaceError(
            f"{what} needs about {needed_bytes / 2**30:.2f} GiB but the disk of {cache_dir} has {free / 2**30:.2f} GiB "
            "free; nothing was written. Point cache_dir at a larger disk, or make the cache smaller (fewer "
            "augmentation_versions; for the tap cache fewer taps), or train without it (cache_taps: false)."
        )
    if needed_bytes > SPACE_WARN_FRACTION * free:
        logger.warning("%s will take %.2f GiB of the %.2f GiB free on the disk of %s", what, needed_bytes / 2**30,
                       free / 2**30, cache_dir)
    return free


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _source_stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _index_path(cache_dir: str, split: str, version: int) -> str:
    return os.path.join(cache_dir, "index", f"{split}_v{version:02d}.json")


def _entry_paths(cache_dir: str, version: int, key: str, with_taps: bool = False) -> tuple[str, ...]:
    """(embedding .npy, label .png[, taps .npy, frame .png]) of frame ``key`` ("<sequence>/<frame>") in one
    version, shared by all splits; the embedding is written last."""
    stem = os.path.join(cache_dir, ENTRIES_DIR, f"v{version:02d}", key)
    paths = (f"{stem}.npy", f"{stem}_label.png")
    return paths + (f"{stem}_taps.npy", f"{stem}_frame.png") if with_taps else paths


# ---------------------------------------------------------------------------------------- precompute
class _FrameVersionDataset(Dataset):
    """(frame, version) pairs -> augmented frame (3, H, W) uint8 and label map (H, W) uint8."""

    def __init__(self, items: list[tuple[dict, int]], num_classes: int, ignore_index: int, seed: int,
                 draws: str = "original") -> None:
        self.items, self.num_classes, self.ignore_index, self.seed = items, num_classes, ignore_index, seed
        self.draws = draws

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item, version = self.items[index]
        image = read_frame(item["image"])
        label = read_label_map(item["label"], self.num_classes, self.ignore_index)
        if image.shape[:2] != label.shape:
            raise ValueError(f"frame {item['image']} is {image.shape[:2]} but its label map is {label.shape}")
        image, label = augment_frame(image, label, version, item["key"], seed=self.seed, ignore_index=self.ignore_index,
                                     draws=self.draws)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "index": index,
        }


def precompute_embeddings(
    dataset_dir: str,
    cache_dir: str,
    sam_variant: str,
    sam_checkpoint: str | None,
    splits: Sequence[str] = ("training", "validation"),
    augmentation_versions: int = 0,
    augmented_splits: Sequence[str] | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 666,
    taps: Sequence[int] | None = None,
    augmentation_draws: str = "original",
) -> dict:
    """Run the frozen encoder once per (frame, version) and store float16 embeddings with a manifest.

    The splits in ``augmented_splits`` (default: those named ``training`` or ``*_training``, e.g.
    ``fold2_training``) get versions 0..``augmentation_versions``, other splits version 0 only. Entries
    are shared by splits: a frame already encoded for another split is not encoded again, and the
    splits precomputed before stay in the manifest.
    An existing cache of another identity is never overwritten: that raises :class:`StaleCacheError`.
    ``taps`` (1-based ViT blocks) makes a tap cache (Distillation-SAM): also the tokens after those
    blocks and the augmented frame. ``augmentation_draws`` (``original``: each version's own transform with
    probability 0.5, or ``always``; ``scripts.data.augmentation``) is recorded, and a cache of other draws
    is refused as one of another seed is. The disk use is logged first and checked against the free space
    (:class:`CacheSpaceError`). Returns the manifest.
    Under ``torch.distributed`` (every rank calls it, e.g. multi_gpu_train.yaml's ``prepare_cache``) the missing
    entries are split across the ranks; rank 0 writes the manifest and the indexes after a barrier, and no rank
    returns before the cache is complete.
    """
    check_augmentation_draws(augmentation_draws)
    description = read_dataset_description(dataset_dir)
    names = class_names(description)
    ignore_index = int(description.get("ignore_index", 255))
    identity = cache_identity(sam_variant, sam_checkpoint, taps)
    with_taps = taps is not None
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    existing = _cache_to_extend(cache_dir, identity, dataset_dir, seed, augmentation_draws)
    # Every file is read and checked first (label values, sizes): bad files are all named in one error
    # before any embedding is written.
    summary = check_dataset(dataset_dir, splits)
    logger.info("precompute: dataset checked: %s frames of %s", summary["frames"], summary["frame_size"])
    plan = _version_plan(splits, augmented_splits, augmentation_versions)
    datalists = {split: load_datalist(dataset_dir, split) for split in splits}
    spec = get_variant(sam_variant)
    _check_disk_use(cache_dir, identity, summary["frame_size"], datalists, plan, with_taps)
    manifest = {
        "identity": identity,
        "dataset": {"dataset_dir": os.path.abspath(dataset_dir), "class_names": names, "ignore_index": ignore_index},
        # Splits indexed by earlier runs stay usable: their entries are shared, their indexes kept.
        "splits": {**existing.get("splits", {}), **plan},
        "augmentation_seed": seed,
        "augmentation_draws": augmentation_draws,
        "complete": False,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # Under torch.distributed (multi_gpu_train.yaml) every rank encodes its share of the missing entries;
    # rank 0 alone writes the manifest, drops changed entries and writes the indexes, between barriers.
    rank, world = distributed_rank_world()
    _barrier(world)  # every rank has read the old manifest before rank 0 replaces it
    if rank == 0:
        atomic_write_json(manifest_path, manifest, indent=1, newline=False)
        for split in splits:
            for version in plan[split]:
                _drop_entries_of_changed_sources(cache_dir, split, version, datalists[split], with_taps)
    _barrier(world)
    todo = _entries_to_encode(cache_dir, plan, datalists, with_taps)
    _barrier(world)  # every rank has listed what is missing before any rank writes
    share = todo[rank::world]
    if world > 1:
        logger.info("precompute: rank %d of %d encodes %d of the %d missing entries", rank, world, len(share),
                    len(todo))
    if share:
        encoder = build_sam(sam_variant, sam_checkpoint).image_encoder.to(device).eval()
        _encode(encoder, share, cache_dir, "+".join(splits), spec.image_size, len(names), ignore_index, seed,
                batch_size, num_workers, device, taps, augmentation_draws)
        del encoder
    _barrier(world)  # every entry is written
    if rank == 0:
        for split in splits:
            for version in plan[split]:
                _write_index(cache_dir, split, version, datalists[split], spec.image_size, spec.grid_size, len(names),
                             with_taps)
        manifest["complete"] = True
        atomic_write_json(manifest_path, manifest, indent=1, newline=False)
    _barrier(world)  # no rank reads the cache before it is complete
    logger.info("precompute: cache complete at %s", cache_dir)
    return manifest


# ------------------------------------------------------------------------------------- precompute's steps
def _cache_to_extend(cache_dir: str, identity: dict, dataset_dir: str, seed: int, augmentation_draws: str) -> dict:
    """The manifest of the cache already at ``cache_dir`` ({} when none), which precompute extends.

    Raises:
        StaleCacheError: that cache is of another format, encoder or input, dataset, augmentation seed or
            augmentation draws (nothing is overwritten).
    """
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return {}
    with open(manifest_path) as handle:
        existing = json.load(handle)
    what_to_do = "nothing was overwritten: choose a new cache_dir or delete that folder, then run precompute again."
    _check_format(existing, cache_dir, what_to_do)
    if existing.get("identity") != identity:
        raise StaleCacheError(f"{cache_dir} holds embeddings of another encoder or input "
                              f"({_identity_diff(existing.get('identity'), identity)}); {what_to_do}")
    made_from = existing.get("dataset", {}).get("dataset_dir")
    if made_from and made_from != os.path.abspath(dataset_dir):
        raise StaleCacheError(f"{cache_dir} holds embeddings of another dataset ({made_from}, not "
                              f"{os.path.abspath(dataset_dir)}); {what_to_do}")
    if existing.get("augmentation_seed", seed) != seed:
        raise StaleCacheError(f"{cache_dir} holds augmentations drawn with seed {existing['augmentation_seed']}, "
                              f"not {seed}; {what_to_do}")
    # caches made before the draws were recorded applied every version's transform every time; versions
    # 1..VERSIONS_PER_GROUP (flips only) are drawn the same way under either draws
    found_draws = existing.get("augmentation_draws", "always-on (a cache of bundle 0.3 or older)")
    if found_draws != augmentation_draws and any(max(v) > VERSIONS_PER_GROUP
                                                 for v in existing.get("splits", {}).values()):
        raise StaleCacheError(f"{cache_dir} holds augmentations with augmentation_draws {found_draws!r}, not "
                              f"{augmentation_draws!r}; {what_to_do}")
    return existing


def _version_plan(splits: Sequence[str], augmented_splits: Sequence[str] | None,
                  augmentation_versions: int) -> dict[str, list[int]]:
    """split -> the augmentation versions to encode: 0..``augmentation_versions`` for the augmented splits
    (default: ``training`` and ``*_training``), 0 for the others."""
    if augmented_splits is None:
        augmented_splits = [s for s in splits if s == "training" or s.endswith("_training")]
    unknown = sorted(set(augmented_splits) - set(splits))
    if unknown:
        raise ValueError(f"augmented_splits {unknown} are not among the splits to precompute {list(splits)}")
    return {split: list(range(augmentation_versions + 1)) if split in augmented_splits else [0] for split in splits}


def _check_disk_use(cache_dir: str, identity: dict, frame_size, datalists: dict[str, list[dict]],
                    plan: dict[str, list[int]], with_taps: bool) -> None:
    """Log the cache's disk use (bytes per entry x entries) and refuse when the missing entries do not fit
    (:class:`CacheSpaceError`). ``frame_size``: the dataset's (H, W), or what check_dataset reports otherwise."""
    what = "the tap cache" if with_taps else "the embedding cache"
    per_entry = entry_bytes(identity)
    frame_hw = frame_size if isinstance(frame_size, (list, tuple)) else None
    if frame_hw and len(frame_hw) == 2:  # PNGs: at most the raw pixels (label 1 byte, frame 3 bytes per pixel)
        per_entry += int(frame_hw[0]) * int(frame_hw[1]) * (4 if with_taps else 1)
    total_entries = sum(len(datalists[s]) * len(plan[s]) for s in plan)
    # entries are shared by splits: a (version, frame) listed by two splits is written once
    missing_entries = len({
        (version, item["key"]) for split in plan for version in plan[split] for item in datalists[split]
        if not os.path.isfile(_entry_paths(cache_dir, version, item["key"], with_taps)[0])
    })
    logger.info(
        "precompute: %s: %d bytes per entry x %d entries (%s) = %.2f GiB in %s; %d entries to write",
        what, per_entry, total_entries,
        ", ".join(f"{s}: {len(datalists[s])} frames x {len(plan[s])} versions" for s in plan),
        total_entries * per_entry / 2**30, cache_dir, missing_entries,
    )
    check_disk_space(cache_dir, missing_entries * per_entry, what)


def _entries_to_encode(cache_dir: str, plan: dict[str, list[int]], datalists: dict[str, list[dict]],
                       with_taps: bool) -> list[tuple[dict, int]]:
    """The unique (datalist item, version) pairs whose entry files are missing, in plan order (entries are
    shared by splits: a frame already encoded for another split or by an earlier run is not listed)."""
    todo, listed = [], set()
    for split, versions in plan.items():
        for version in versions:
            pending = [
                item for item in datalists[split]
                if not all(os.path.isfile(p) for p in _entry_paths(cache_dir, version, item["key"], with_taps))
            ]
            if len(pending) < len(datalists[split]):
                logger.info("precompute %s v%02d: %d of %d frames already encoded (shared with other splits or an "
                            "earlier run)", split, version, len(datalists[split]) - len(pending), len(datalists[split]))
            for item in pending:
                if (version, item["key"]) not in listed:
                    listed.add((version, item["key"]))
                    todo.append((item, version))
    return todo


def _drop_entries_of_changed_sources(cache_dir: str, split: str, version: int, datalist: list[dict],
                                     with_taps: bool = False) -> None:
    """Delete cached entries whose frame or label changed since they were encoded, so they are redone.

    Entries are shared by splits, so the sources recorded by the index of ANY split of this version count:
    a split precomputed for the first time must not pick up an entry encoded from an older frame.
    """
    recorded: dict[str, list[dict]] = {}
    for index_path in sorted(glob.glob(os.path.join(cache_dir, "index", f"*_v{version:02d}.json"))):
        with open(index_path) as handle:
            for entry in json.load(handle)["entries"]:
                recorded.setdefault(entry["key"], []).append(entry["sources"])
    changed = []
    for item in datalist:
        current = {"image": [item["image"], *_source_stamp(item["image"])],
                   "label": [item["label"], *_source_stamp(item["label"])]}
        # An index written after the entry was (re-)encoded records the current stamps: then it is up to date.
        seen = recorded.get(item["key"], [])
        if seen and current not in seen:
            changed.append(item["key"])
            for path in _entry_paths(cache_dir, version, item["key"], with_taps):
                if os.path.isfile(path):
                    os.remove(path)
    if changed:
        logger.info("precompute %s v%02d: %d frames changed since they were encoded, re-encoding them (e.g. %s)",
                    split, version, len(changed), changed[:3])


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, array)

    atomic_write(path, write)


def _save_png(path: str, array: np.ndarray) -> None:
    atomic_write(path, Image.fromarray(array).save, keep_suffix=True)


@torch.no_grad()
def _encode(encoder, todo, cache_dir, split, image_size, num_classes, ignore_index, seed, batch_size, num_workers,
            device, taps=None, draws="original"):
    """Encode the (frame, version) pairs of ``todo``; with ``taps`` also store the tapped tokens and the frame."""
    loader = DataLoader(
        _FrameVersionDataset(todo, num_classes, ignore_index, seed, draws), batch_size=batch_size,
        num_workers=num_workers
    )
    done = 0
    for batch in loader:
        sizes = {tuple(batch["image"].shape[-2:])}
        sam_input = frames_to_sam_input(batch["image"].to(device), image_size)
        if taps is None:
            embeddings, tapped = encoder(sam_input), None
        else:
            embeddings, tapped = tapped_encoder_forward(encoder, sam_input, taps)
            tapped = torch.stack(tapped, dim=1).half().cpu().numpy()  # (B, n_taps, h, w, C_vit)
        embeddings = embeddings.half().cpu().numpy()
        for row, index in enumerate(batch["index"].tolist()):
            item, version = todo[index]
            paths = _entry_paths(cache_dir, version, item["key"], taps is not None)
            os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
            _save_png(paths[1], batch["label"][row].numpy())
            if tapped is not None:
                _save_npy(paths[2], tapped[row])
                _save_png(paths[3], batch["image"][row].permute(1, 2, 0).numpy())
            _save_npy(paths[0], embeddings[row])  # the embedding last: it marks the entry done
        done += len(batch["index"])
        logger.info("precompute %s: %d/%d (frame size %s)", split, done, len(todo), sizes.pop())


def _write_index(cache_dir, split, version, datalist, image_size, grid_size, num_classes, with_taps=False) -> None:
    entries = []
    for item in datalist:
        paths = _entry_paths(cache_dir, version, item["key"], with_taps)
        embedding_path, label_path = paths[:2]
        label = np.asarray(Image.open(label_path))
        present = [c for c in range(1, num_classes + 1) if (label == c).any()]
        grid_present = []
        if present:
            masks = torch.from_numpy(np.stack([label == c for c in present]))
            on_grid = masks_to_embedding_grid(masks, image_size, (grid_size, grid_size)).flatten(1).any(1)
            grid_present = [c for c, on in zip(present, on_grid.tolist()) if on]
        extra = {"taps": os.path.relpath(paths[2], cache_dir), "frame": os.path.relpath(paths[3], cache_dir)} \
            if with_taps else {}
        entries.append({
            "key": item["key"],
            "embedding": os.path.relpath(embedding_path, cache_dir),
            "label": os.path.relpath(label_path, cache_dir),
            **extra,
            "classes": present,
            "grid_classes": grid_present,
            "frame_size": list(label.shape),
            "sources": {"image": [item["image"], *_source_stamp(item["image"])],
                        "label": [item["label"], *_source_stamp(item["label"])]},
        })
    atomic_write_json(_index_path(cache_dir, split, version), {"split": split, "version": version, "entries": entries},
                      indent=1, newline=False)


# -------------------------------------------------------------------------------------------- reading
def _check_format(manifest: dict, cache_dir: str, what_to_do: str) -> None:
    """StaleCacheError when the cache was written in another layout than :data:`CACHE_FORMAT_VERSION`."""
    found = (manifest.get("identity") or {}).get("format_version")
    if found != CACHE_FORMAT_VERSION:
        raise StaleCacheError(
            f"the embedding cache at {cache_dir} has format {found} but this bundle reads format "
            f"{CACHE_FORMAT_VERSION} (format 2 shares entry files between splits under '{ENTRIES_DIR}/'): it was "
            f"made by an older version of the bundle and is not used; {what_to_do}"
        )


def _identity_diff(found: dict | None, expected: dict) -> str:
    if not found:
        return "no identity recorded"
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: cache {found.get(k)!r} vs run {expected.get(k)!r}" for k in keys)


def _split_problem(manifest: dict, cache_dir: str, split: str) -> str | None:
    if split in manifest["splits"]:
        return None
    return (f"the embedding cache at {cache_dir} has no {split!r} split (it has {sorted(manifest['splits'])}): "
            f"run {PRECOMPUTE_COMMAND}")


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
        _check_format(manifest, cache_dir, f"delete that folder (or choose a new cache_dir) and rebuild it with "
                                           f"{PRECOMPUTE_COMMAND}")
    except StaleCacheError as error:
        return [], [str(error)]
    if manifest.get("identity") != identity:
        return [], [
            f"the embedding cache at {cache_dir} was made for other inputs than this run "
            f"({_identity_diff(manifest.get('identity'), identity)}): it is not used, and precompute "
            f"never overwrites it. Pass --cache_dir NEW_FOLDER (or delete {cache_dir}) and make the cache for "
            f"this run's encoder with {PRECOMPUTE_COMMAND.split(' (')[0]} --cache_dir NEW_FOLDER; or point "
            "--cache_dir at a cache made for this run's encoder and weights."
        ]
    if not manifest.get("complete"):
        return [], [f"the embedding cache at {cache_dir} is incomplete (precompute was interrupted): "
                    f"run {PRECOMPUTE_COMMAND}"]
    return [problem for split in splits if (problem := _split_problem(manifest, cache_dir, split))], []


class EmbeddingCache:
    """A checked, complete cache on disk (see the module docstring).

    The interface the datasets use (also implemented by ``original_layout.OriginalLayoutReader``):
    ``cache_dir``, ``class_names``, ``image_size``, ``grid_size``, ``versions(split)``,
    ``entries(split, version)`` (dicts with ``key``, ``classes``, ``grid_classes``, ``frame_size``) and
    ``load(entry) -> (embedding (d, h, w) float32, label map (H, W) long)``; a reader that keeps one binary
    mask per class also offers ``load_class_mask(entry, class_id) -> (embedding, mask (H, W) bool)``, which
    training samples then use.

    Raises:
        FileNotFoundError: no cache at ``cache_dir``.
        StaleCacheError: the cache is of another format, made for other inputs than ``identity``, or unfinished
            (:func:`cache_problems` says which).
    """

    def __init__(self, cache_dir: str, identity: dict, check_sources: bool = True) -> None:
        self.cache_dir = cache_dir
        missing, stale = cache_problems(cache_dir, identity)
        if missing:
            raise FileNotFoundError(missing[0])
        if stale:
            raise StaleCacheError(stale[0])
        with open(os.path.join(cache_dir, MANIFEST_NAME)) as handle:
            self.manifest = json.load(handle)
        self.check_sources = check_sources
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
            with open(_index_path(self.cache_dir, split, version)) as handle:
                entries = json.load(handle)["entries"]
            if self.check_sources:
                changed = [
                    path for entry in entries for path, *stamp in entry["sources"].values()
                    if not os.path.isfile(path) or _source_stamp(path) != stamp
                ]
                if changed:
                    raise StaleCacheError(
                        f"{len(changed)} source files changed or vanished since the embedding cache at "
                        f"{self.cache_dir} was made (e.g. {changed[:3]}): rebuild it with {PRECOMPUTE_COMMAND}"
                    )
            self._indexes[(split, version)] = entries
        return self._indexes[(split, version)]

    def load(self, entry: dict, as_stored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embedding (d, h, w) float32, label map (H, W) long; with ``as_stored`` the float16 embedding and
        the uint8 label map as the cache holds them (the training batch widens them once, on its device)."""
        embedding = np.load(os.path.join(self.cache_dir, entry["embedding"]))
        label = np.array(Image.open(os.path.join(self.cache_dir, entry["label"])))
        if as_stored:
            return torch.from_numpy(embedding), torch.from_numpy(label)
        return torch.from_numpy(embedding.astype(np.float32)), torch.from_numpy(label.astype(np.int64))

    def load_taps(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Tap cache only -> taps (n_taps, h, w, C_vit) float32 and the augmented frame (3, H, W) float32 0..255."""
        if "taps" not in entry:
            raise StaleCacheError(f"the cache at {self.cache_dir} holds no encoder taps (a SurgicalSAM embedding "
                                  f"cache?): make a tap cache with {PRECOMPUTE_COMMAND}")
        taps = torch.from_numpy(np.load(os.path.join(self.cache_dir, entry["taps"])).astype(np.float32))
        frame = np.asarray(Image.open(os.path.join(self.cache_dir, entry["frame"])).convert("RGB"))
        return taps, torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1))).float()
