"""``precompute``: the frozen encoder run once per (frame, augmentation version), its outputs written as the
cache's entries (layout: :mod:`scripts.embedding_cache`), resumably and atomically."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.augmentation import VERSIONS_PER_GROUP, augment_frame, check_augmentation_draws
from ..data.frame_files import check_dataset, read_frame, read_label_map
from ..data.layout import DEFAULT_IGNORE_INDEX, class_names, load_datalist, read_dataset_description
from ..files import atomic_write, atomic_write_json
from ..sam.backbone import build_sam, get_variant
from ..sam.fast_encoder import frozen_encoder_forward
from ..sam.geometry import frames_to_sam_input, masks_to_embedding_grid
from .disk_use import check_cache_fits
from .encoding import DEFAULT_EMBEDDING_ENCODING, check_embedding_encoding, encode_embedding, manifest_encoding
from .identity import StaleCacheError, cache_identity
from .sources import (
    SOURCE_NAMES,
    log_changes,
    log_dataset_location,
    normalised_sources,
    relative_path,
    same_source,
    source_record,
)
from .store import MANIFEST_NAME, check_format, entry_paths, holds_entries, identity_diff, index_path

logger = logging.getLogger(__name__)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------- precompute
class _FrameVersionDataset(Dataset):
    """(frame, version) pairs -> augmented frame (3, H, W) uint8 and label map (H, W) uint8."""

    def __init__(
        self, items: list[tuple[dict, int]], num_classes: int, ignore_index: int, seed: int, draws: str = "original"
    ) -> None:
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
        image, label = augment_frame(
            image, label, version, item["key"], seed=self.seed, ignore_index=self.ignore_index, draws=self.draws
        )
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
    embedding_encoding: str | None = None,
) -> dict:
    """Run the frozen encoder once per (frame, version) and store its embeddings with a manifest.

    The splits in ``augmented_splits`` (default: those named ``training`` or ``*_training``, e.g.
    ``fold2_training``) get versions 0..``augmentation_versions``, other splits version 0 only. Entries
    are shared by splits: a frame already encoded for another split is not encoded again, and the
    splits precomputed before stay in the manifest.
    An existing cache of another identity is never overwritten: that raises :class:`StaleCacheError`.
    ``taps`` (1-based ViT blocks) makes a tap cache (Distillation-SAM): also the tokens after those
    blocks and the augmented frame. ``augmentation_draws`` (``original``: each version's own transform with
    probability 0.5, or ``always``; ``scripts.data.augmentation``) is recorded, and a cache of other draws
    is refused as one of another seed is. The disk use is logged first and checked against the free space
    (:class:`~.disk_use.CacheSpaceError`). ``embedding_encoding`` (:mod:`.encoding`: ``uint8``, the default for a
    new cache, or ``float16``) is how the embeddings are stored; None keeps an existing cache's own. Returns the
    manifest.
    Under ``torch.distributed`` (every rank calls it, e.g. multi_gpu_train.yaml's ``prepare_cache``) the missing
    entries are split across the ranks; rank 0 writes the manifest and the indexes after a barrier, and no rank
    returns before the cache is complete.
    """
    check_augmentation_draws(augmentation_draws)
    description = read_dataset_description(dataset_dir)
    names = class_names(description)
    ignore_index = int(description.get("ignore_index", DEFAULT_IGNORE_INDEX))
    identity = cache_identity(sam_variant, sam_checkpoint, taps)
    with_taps = taps is not None
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    existing = _cache_to_extend(cache_dir, identity, seed, augmentation_draws)
    encoding = _encoding_to_write(existing, embedding_encoding, cache_dir)
    # Every file is read and checked first (label values, sizes): bad files are all named in one error
    # before any embedding is written.
    summary = check_dataset(dataset_dir, splits)
    logger.info("precompute: dataset checked: %s frames of %s", summary["frames"], summary["frame_size"])
    plan = _version_plan(splits, augmented_splits, augmentation_versions)
    datalists = {split: load_datalist(dataset_dir, split) for split in splits}
    spec = get_variant(sam_variant)
    check_cache_fits(cache_dir, identity, encoding, datalists, plan, with_taps, len(names), ignore_index)
    manifest = {
        "identity": identity,
        "dataset": {"dataset_dir": os.path.abspath(dataset_dir), "class_names": names, "ignore_index": ignore_index},
        # Splits indexed by earlier runs stay usable: their entries are shared, their indexes kept.
        "splits": {**existing.get("splits", {}), **plan},
        "augmentation_seed": seed,
        "augmentation_draws": augmentation_draws,
        "embedding_encoding": encoding,
        "complete": False,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # Under torch.distributed (multi_gpu_train.yaml) every rank encodes its share of the missing entries;
    # rank 0 alone writes the manifest, drops changed entries and writes the indexes, between barriers.
    rank, world = distributed_rank_world()
    _barrier(world)  # every rank has read the old manifest before rank 0 replaces it
    if rank == 0:
        made_from = (existing.get("dataset") or {}).get("dataset_dir")
        log_dataset_location(dataset_dir, made_from)
        sources = _source_records(cache_dir, dataset_dir, datalists, made_from)
        atomic_write_json(manifest_path, manifest, indent=1, newline=False)
        _drop_entries_of_changed_sources(cache_dir, plan, datalists, sources, made_from, with_taps)
    _barrier(world)
    todo = _entries_to_encode(cache_dir, plan, datalists, with_taps)
    _barrier(world)  # every rank has listed what is missing before any rank writes
    share = todo[rank::world]
    if world > 1:
        logger.info(
            "precompute: rank %d of %d encodes %d of the %d missing entries", rank, world, len(share), len(todo)
        )
    if share:
        encoder = build_sam(sam_variant, sam_checkpoint).image_encoder.to(device).eval()
        _encode(
            encoder,
            share,
            cache_dir,
            "+".join(splits),
            spec.image_size,
            len(names),
            ignore_index,
            seed,
            batch_size,
            num_workers,
            device,
            taps,
            augmentation_draws,
            encoding,
        )
        del encoder
    _barrier(world)  # every entry is written
    if rank == 0:
        for split in splits:
            for version in plan[split]:
                _write_index(
                    cache_dir,
                    split,
                    version,
                    datalists[split],
                    sources,
                    spec.image_size,
                    spec.grid_size,
                    len(names),
                    with_taps,
                )
        manifest["complete"] = True
        atomic_write_json(manifest_path, manifest, indent=1, newline=False)
    _barrier(world)  # no rank reads the cache before it is complete
    logger.info("precompute: cache complete at %s", cache_dir)
    return manifest


# ------------------------------------------------------------------------------------- precompute's steps
def _cache_to_extend(cache_dir: str, identity: dict, seed: int, augmentation_draws: str) -> dict:
    """The manifest of the cache already at ``cache_dir`` ({} when none, or when it holds no entry yet: a
    precompute that stopped before encoding anything, e.g. on a corrupt SAM file, binds the folder to nothing),
    which precompute extends. The dataset may have moved or been copied since: entries are checked by content.

    Raises:
        StaleCacheError: that cache is of another format, encoder or input, augmentation seed or augmentation
            draws (nothing is overwritten).
    """
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return {}
    with open(manifest_path) as handle:
        existing = json.load(handle)
    what_to_do = "nothing was overwritten: choose a new cache_dir or delete that folder, then run precompute again."
    check_format(existing, cache_dir, what_to_do)
    if not holds_entries(cache_dir):
        if existing.get("identity") != identity:
            logger.info(
                "precompute: %s holds no entry yet (an earlier precompute stopped before encoding any): "
                "it is made for this encoder",
                cache_dir,
            )
        return {}
    if existing.get("identity") != identity:
        raise StaleCacheError(
            f"{cache_dir} holds embeddings of another encoder or input "
            f"({identity_diff(existing.get('identity'), identity)}); {what_to_do}"
        )
    if existing.get("augmentation_seed", seed) != seed:
        raise StaleCacheError(
            f"{cache_dir} holds augmentations drawn with seed {existing['augmentation_seed']}, not {seed}; {what_to_do}"
        )
    # caches made before the draws were recorded applied every version's transform every time; versions
    # 1..VERSIONS_PER_GROUP (flips only) are drawn the same way under either draws
    found_draws = existing.get("augmentation_draws", "always-on (a cache of bundle 0.3 or older)")
    if found_draws != augmentation_draws and any(
        max(v) > VERSIONS_PER_GROUP for v in existing.get("splits", {}).values()
    ):
        raise StaleCacheError(
            f"{cache_dir} holds augmentations with augmentation_draws {found_draws!r}, not "
            f"{augmentation_draws!r}; {what_to_do}"
        )
    return existing


def _encoding_to_write(existing: dict, requested: str | None, cache_dir: str) -> str:
    """The encoding of the embeddings to write (:mod:`.encoding`): an existing cache's own, else ``requested``
    or the default.

    Raises:
        StaleCacheError: ``requested`` is not the encoding of the entries already in the cache.
    """
    if requested is not None:
        check_embedding_encoding(requested)
    if not existing:
        return requested or DEFAULT_EMBEDDING_ENCODING
    found = manifest_encoding(existing)
    if requested is not None and requested != found:
        raise StaleCacheError(
            f"{cache_dir} holds embeddings stored as {found}, not {requested}; nothing was overwritten: choose a new "
            f"cache_dir for a {requested} cache (or leave embedding_encoding unset to extend this one as {found})."
        )
    return found


def _version_plan(
    splits: Sequence[str], augmented_splits: Sequence[str] | None, augmentation_versions: int
) -> dict[str, list[int]]:
    """split -> the augmentation versions to encode: 0..``augmentation_versions`` for the augmented splits
    (default: ``training`` and ``*_training``), 0 for the others."""
    if augmented_splits is None:
        augmented_splits = [s for s in splits if s == "training" or s.endswith("_training")]
    unknown = sorted(set(augmented_splits) - set(splits))
    if unknown:
        raise ValueError(f"augmented_splits {unknown} are not among the splits to precompute {list(splits)}")
    return {split: list(range(augmentation_versions + 1)) if split in augmented_splits else [0] for split in splits}


def _entries_to_encode(
    cache_dir: str, plan: dict[str, list[int]], datalists: dict[str, list[dict]], with_taps: bool
) -> list[tuple[dict, int]]:
    """The unique (datalist item, version) pairs whose entry files are missing, in plan order (entries are
    shared by splits: a frame already encoded for another split or by an earlier run is not listed)."""
    todo, listed = [], set()
    for split, versions in plan.items():
        for version in versions:
            pending = [
                item
                for item in datalists[split]
                if not all(os.path.isfile(p) for p in entry_paths(cache_dir, version, item["key"], with_taps))
            ]
            if len(pending) < len(datalists[split]):
                logger.info(
                    "precompute %s v%02d: %d of %d frames already encoded (shared with other splits or an earlier run)",
                    split,
                    version,
                    len(datalists[split]) - len(pending),
                    len(datalists[split]),
                )
            for item in pending:
                if (version, item["key"]) not in listed:
                    listed.add((version, item["key"]))
                    todo.append((item, version))
    return todo


def _recorded_sources(cache_dir: str, version: int, made_from: str | None) -> dict[str, list[dict]]:
    """key -> the sources (normalised records, :func:`~.sources.normalised_sources`) that the indexes of
    ANY split of ``version`` record for it (entries are shared by splits)."""
    recorded: dict[str, list[dict]] = {}
    for index_file in sorted(glob.glob(os.path.join(cache_dir, "index", f"*_v{version:02d}.json"))):
        with open(index_file) as handle:
            for entry in json.load(handle)["entries"]:
                recorded.setdefault(entry["key"], []).append(normalised_sources(entry["sources"], made_from))
    return recorded


def _source_records(
    cache_dir: str, dataset_dir: str, datalists: dict[str, list[dict]], made_from: str | None
) -> dict[str, dict]:
    """key -> ``{"image": record, "label": record}`` (:func:`~.sources.source_record`) of every frame to
    precompute: each file's bytes are hashed once, or not at all where an index records its path, size and mtime."""
    known: dict[str, list[dict]] = {}
    for index_file in glob.glob(os.path.join(cache_dir, "index", "*.json")):
        with open(index_file) as handle:
            for entry in json.load(handle)["entries"]:
                for record in normalised_sources(entry["sources"], made_from).values():
                    known.setdefault(record["path"], []).append(record)
    records: dict[str, dict] = {}
    for datalist in datalists.values():
        for item in datalist:
            if item["key"] not in records:
                records[item["key"]] = {
                    kind: source_record(item[kind], dataset_dir, known.get(relative_path(item[kind], dataset_dir), ()))
                    for kind in SOURCE_NAMES
                }
    return records


def _source_change(recorded: dict, current: dict, key: str) -> list[tuple[str, str]]:
    """(kind, "label a/b.png changed") for each source of ``current`` that is not the one of ``recorded``."""
    changes = []
    for kind, name in SOURCE_NAMES.items():
        if not same_source(recorded[kind], current[kind]):
            was = recorded[kind]["path"]
            changes.append(
                (
                    kind,
                    f"{name} {was} changed"
                    if was == current[kind]["path"]
                    else f"{name} of {key} is now {current[kind]['path']} (was {was})",
                )
            )
    return changes


def _drop_entries_of_changed_sources(
    cache_dir: str,
    plan: dict[str, list[int]],
    datalists: dict[str, list[dict]],
    sources: dict[str, dict],
    made_from: str | None,
    with_taps: bool = False,
) -> None:
    """Delete cached entries whose frame or label map changed (by content) since they were encoded, so they are
    redone; one line per changed file says so.

    Entries are shared by splits, so the sources recorded by the index of ANY split of the version count: a split
    precomputed for the first time must not pick up an entry encoded from an older frame. An entry no index
    records (a precompute killed before its indexes) was encoded from the current files and is kept.
    """
    changes: dict[tuple[str, str], int] = {}
    for version in sorted({v for versions in plan.values() for v in versions}):
        recorded = _recorded_sources(cache_dir, version, made_from)
        keys = {item["key"] for split, versions in plan.items() if version in versions for item in datalists[split]}
        for key in sorted(keys):
            seen = recorded.get(key, [])
            if not seen or any(not _source_change(r, sources[key], key) for r in seen):
                continue
            for change in _source_change(seen[-1], sources[key], key):
                changes[change] = changes.get(change, 0) + 1
            for path in entry_paths(cache_dir, version, key, with_taps):
                if os.path.isfile(path):
                    os.remove(path)
    log_changes(changes)


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, array)

    atomic_write(path, write)


def _save_png(path: str, array: np.ndarray) -> None:
    atomic_write(path, Image.fromarray(array).save, keep_suffix=True)


@torch.no_grad()
def _encode(
    encoder,
    todo,
    cache_dir,
    split,
    image_size,
    num_classes,
    ignore_index,
    seed,
    batch_size,
    num_workers,
    device,
    taps=None,
    draws="original",
    encoding=DEFAULT_EMBEDDING_ENCODING,
):
    """Encode the (frame, version) pairs of ``todo``, storing the embeddings in ``encoding``; with ``taps`` also
    the tapped tokens and the frame."""
    loader = DataLoader(
        _FrameVersionDataset(todo, num_classes, ignore_index, seed, draws),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    done = 0
    for batch in loader:
        sizes = {tuple(batch["image"].shape[-2:])}
        sam_input = frames_to_sam_input(batch["image"].to(device), image_size)
        embeddings, tapped = frozen_encoder_forward(encoder, sam_input, taps or ())
        tapped = torch.stack(tapped, dim=1).half().cpu().numpy() if taps else None  # (B, n_taps, h, w, C_vit)
        embeddings = embeddings.float().cpu().numpy()
        for row, index in enumerate(batch["index"].tolist()):
            item, version = todo[index]
            paths = entry_paths(cache_dir, version, item["key"], taps is not None)
            os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
            _save_png(paths[1], batch["label"][row].numpy())
            if tapped is not None:
                _save_npy(paths[2], tapped[row])
                _save_png(paths[3], batch["image"][row].permute(1, 2, 0).numpy())
            _save_npy(
                paths[0], encode_embedding(embeddings[row], encoding)
            )  # the embedding last: it marks the entry done
        done += len(batch["index"])
        logger.info("precompute %s: %d/%d (frame size %s)", split, done, len(todo), sizes.pop())


def _write_index(
    cache_dir, split, version, datalist, sources, image_size, grid_size, num_classes, with_taps=False
) -> None:
    """Write the index of one split and version: per frame its entry files, classes and ``sources`` (key ->
    records of :func:`~.sources.source_record`)."""
    entries = []
    for item in datalist:
        paths = entry_paths(cache_dir, version, item["key"], with_taps)
        embedding_path, label_path = paths[:2]
        label = np.asarray(Image.open(label_path))
        present = [c for c in range(1, num_classes + 1) if (label == c).any()]
        grid_present = []
        if present:
            masks = torch.from_numpy(np.stack([label == c for c in present]))
            on_grid = masks_to_embedding_grid(masks, image_size, (grid_size, grid_size)).flatten(1).any(1)
            grid_present = [c for c, on in zip(present, on_grid.tolist()) if on]
        extra = (
            {"taps": os.path.relpath(paths[2], cache_dir), "frame": os.path.relpath(paths[3], cache_dir)}
            if with_taps
            else {}
        )
        entries.append(
            {
                "key": item["key"],
                "embedding": os.path.relpath(embedding_path, cache_dir),
                "label": os.path.relpath(label_path, cache_dir),
                **extra,
                "classes": present,
                "grid_classes": grid_present,
                "frame_size": list(label.shape),
                "sources": sources[item["key"]],
            }
        )
    atomic_write_json(
        index_path(cache_dir, split, version),
        {"split": split, "version": version, "entries": entries},
        indent=1,
        newline=False,
    )
