"""Distillation-SAM's datasets: frames and label maps, or the tap cache; the tap blocks and the tap cache's folder.

Distillation-SAM's adapter sees the image and the SAM encoder's intermediate tokens ("taps"). Without
a cache, training reads frames and label maps from a prepared dataset (``dataset.json``, see
``scripts.data.layout``) and runs the frozen encoder in every step (:class:`FrameLabelDataset`). With the
tap cache (``cache_taps: true``; ``scripts.embedding_cache`` with ``taps=``), the encoder's
embedding and taps of each (frame, augmentation version) are read from disk with the augmented frame
(:class:`CachedTapDataset`), and the encoder does not run. :func:`distillation_dataset` picks one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.augmentation import augment_frame, version_for_epoch
from ..data.frame_files import read_frame, read_label_map
from ..data.layout import DEFAULT_IGNORE_INDEX, load_datalist
from ..embedding_cache import EmbeddingCache

__all__ = [
    "FrameLabelDataset",
    "CachedTapDataset",
    "distillation_dataset",
    "tap_blocks",
    "tap_cache_folder",
    "used_tap_cache_dir",
    "tap_cache_identity",
    "prepare_tap_cache",
    "TRAIN_CONFIG_FILES",
]
#: keys of the cached encoder outputs a batch may carry; passed to ``DistillationSAM.forward``.
CACHED_KEYS = ("embedding", "taps")


def tap_blocks(sam_variant: str, taps=None, num_taps: int = 3) -> list[int]:
    """The 1-based ViT blocks a ``DistillationSAM`` with these settings taps (``taps`` None: evenly spaced)."""
    from ..sam.backbone import get_variant
    from .adapter import default_tap_blocks

    if taps is None:
        return list(default_tap_blocks(get_variant(sam_variant).encoder_depth, num_taps))
    return [int(k) for k in taps]


def tap_cache_folder(root: str, sam_variant: str, tap_blocks: Sequence[int]) -> str:
    """Folder of the tap cache of these taps under ``root``: ``<root>/<variant>_taps<k1>-<k2>-...``, so caches of
    other taps or another encoder never share a folder."""
    return os.path.join(root, f"{sam_variant}_taps" + "-".join(str(int(k)) for k in tap_blocks))


class FrameLabelDataset(Dataset):
    """Frames and label maps of one split: ``image`` (3, H, W) float32 0..255, ``label`` (1, H, W) long, ``key``.

    Training augmentation follows the SurgicalSAM recipe's versions (``scripts.data.augmentation``):
    epoch e uses version ``version_for_epoch(e, augmentation_versions)`` for every frame, drawn per frame
    on the fly. ``set_epoch`` is called by ``scripts.engine.handlers.AugmentationVersionHandler``.

    Args:
        dataset_dir: prepared dataset folder.
        split: ``training`` / ``validation`` / ...
        num_classes: C (label values must be 0..C or ``ignore_index``).
        augmentation_versions: 0 = no augmentation (validation).
        seed: augmentation seed.
        ignore_index: label value of unlabelled pixels.
    """

    def __init__(
        self,
        dataset_dir: str,
        split: str,
        num_classes: int,
        augmentation_versions: int = 0,
        seed: int = 666,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
    ) -> None:
        self.datalist = load_datalist(dataset_dir, split)
        self.num_classes, self.augmentation_versions = num_classes, augmentation_versions
        self.seed, self.ignore_index = seed, ignore_index
        self.version = 0

    def set_epoch(self, epoch: int) -> None:
        self.version = version_for_epoch(epoch, self.augmentation_versions)

    def __len__(self) -> int:
        return len(self.datalist)

    def __getitem__(self, index: int) -> dict:
        entry = self.datalist[index]
        image = read_frame(entry["image"])
        label = read_label_map(entry["label"], self.num_classes, self.ignore_index)
        if self.version:
            image, label = augment_frame(image, label, self.version, entry["key"], self.seed, self.ignore_index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "label": torch.from_numpy(label.astype(np.int64))[None],
            "key": entry["key"],
        }


class CachedTapDataset(Dataset):
    """Frames of one split from a tap cache: ``image`` (3, H, W) float32 0..255 (the augmented frame), ``label``
    (1, H, W) long, ``embedding`` (d, h, w) float32, ``taps`` (n_taps, h, w, C_vit) float32, ``key``.

    The training split follows the same augmentation schedule as :class:`FrameLabelDataset`
    (``version_for_epoch`` over the versions the cache holds; ``set_epoch`` each epoch); other splits
    read version 0.

    Args:
        cache: an :class:`~scripts.embedding_cache.EmbeddingCache` whose identity has taps.
        split: ``training`` / ``validation`` / ...
        num_classes: C; must equal the cached dataset's.
    """

    def __init__(self, cache: EmbeddingCache, split: str, num_classes: int | None = None) -> None:
        if "taps" not in cache.manifest["identity"]:
            raise ValueError(
                f"{cache.cache_dir} is an embedding cache without encoder taps; Distillation-SAM needs "
                f"a tap cache (python -m monai.bundle run precompute --config_file {TRAIN_CONFIG_FILES} ...)"
            )
        if num_classes is not None and num_classes != len(cache.class_names):
            raise ValueError(
                f"num_classes={num_classes} but the cached dataset has {len(cache.class_names)} classes "
                f"({cache.class_names})"
            )
        self.cache, self.split = cache, split
        self.num_versions = max(cache.versions(split))
        self.set_epoch(0)
        if not self.entries:
            raise ValueError(f"the {split!r} split of {cache.cache_dir} is empty")

    def set_epoch(self, epoch: int) -> None:
        self.version = version_for_epoch(epoch, self.num_versions)
        self.entries = self.cache.entries(self.split, self.version)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        embedding, label = self.cache.load(entry)
        taps, image = self.cache.load_taps(entry)
        return {"image": image, "label": label[None], "embedding": embedding, "taps": taps, "key": entry["key"]}


def distillation_dataset(
    dataset_dir: str,
    split: str,
    num_classes: int,
    augmentation_versions: int = 0,
    seed: int = 666,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    tap_cache_dir: str | None = None,
    tap_cache_identity: dict | None = None,
) -> Dataset:
    """:class:`CachedTapDataset` of ``tap_cache_dir`` (checked against ``tap_cache_identity``: a cache of
    another encoder, checkpoint, taps or input size raises ``StaleCacheError``), or, when it is None,
    :class:`FrameLabelDataset` of ``dataset_dir`` (augmentation on the fly, encoder in every step)."""
    if tap_cache_dir is None:
        return FrameLabelDataset(dataset_dir, split, num_classes, augmentation_versions, seed, ignore_index)
    if tap_cache_identity is None:
        raise ValueError("tap_cache_identity is needed with tap_cache_dir (cache_identity(variant, checkpoint, taps))")
    return CachedTapDataset(EmbeddingCache(tap_cache_dir, tap_cache_identity), split, num_classes)


#: The --config_file of Distillation-SAM's training (train.yaml with train_distill.yaml merged on top), as the
#: input checks' messages name it.
TRAIN_CONFIG_FILES = "\"['bundle/configs/train.yaml','bundle/configs/train_distill.yaml']\""


def used_tap_cache_dir(cache_taps: bool, tap_cache_dir: str) -> str | None:
    """The tap cache folder a run reads: ``tap_cache_dir`` with ``cache_taps``, None without (raw frames, the
    encoder in every step)."""
    return tap_cache_dir if cache_taps else None


def tap_cache_identity(
    cache_taps: bool, sam_variant: str, sam_checkpoint: str | None, tap_blocks: Sequence[int]
) -> dict | None:
    """The identity the tap cache is checked against with ``cache_taps`` (``cache_identity`` with the taps), None
    without: a run on raw frames does not fingerprint the SAM checkpoint."""
    from ..embedding_cache import cache_identity

    return cache_identity(sam_variant, sam_checkpoint, tap_blocks) if cache_taps else None


def prepare_tap_cache(cache_taps: bool, precompute) -> dict | None:
    """The demo's first-use step (demo_distill.yaml's ``prepare_cache``): ``precompute()`` (train.yaml's
    ``cache_precompute``, a partial that makes what is missing) with ``cache_taps``; nothing without, as a run
    on raw frames reads no cache. Returns the cache's manifest or None."""
    return precompute() if cache_taps else None
