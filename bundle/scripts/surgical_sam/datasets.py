"""SurgicalSAM's datasets over the embedding cache (:mod:`scripts.embedding_cache`): the (frame, class)
prompt samples of an epoch, one sample's targets, and the whole-frame validation items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.augmentation import version_for_epoch
from ..embedding_cache import EmbeddingCache
from ..sam.geometry import masks_to_embedding_grid


def prompt_samples(
    frames: Sequence[dict], num_classes: int, absent_prompts_per_frame: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """The (frame index, class) training samples of one epoch.

    One sample per class of ``frame["grid_classes"]`` (present and still on the embedding grid), plus
    ``absent_prompts_per_frame`` classes drawn from those absent from ``frame["classes"]`` (empty target).
    """
    samples: list[tuple[int, int]] = []
    for index, frame in enumerate(frames):
        samples += [(index, c) for c in frame["grid_classes"]]
        absent = [c for c in range(1, num_classes + 1) if c not in frame["classes"]]
        if absent and absent_prompts_per_frame:
            chosen = rng.choice(absent, size=min(absent_prompts_per_frame, len(absent)), replace=False)
            samples += [(index, int(c)) for c in chosen]
    return samples


def prompt_sample(
    image_embeddings: torch.Tensor,
    label: torch.Tensor,
    class_id: int,
    image_size: int,
    grid_size: Sequence[int],
    class_mask: bool = False,
) -> dict:
    """One training item of a (frame, class) sample, what ``PromptedSampleBatch`` batches.

    Args:
        image_embeddings: (d, h, w) the frame's embeddings (any float dtype: kept as given).
        label: (H, W) the frame's label map (any integer dtype), or with ``class_mask=True`` the class's own
            binary mask.
        class_id: the prompted class, 1..C (a class absent from ``label`` gives an empty target).
        class_mask: ``label`` is already the class's binary mask (the original layout keeps one per class,
            and two classes' masks may overlap).

    Returns:
        ``image_embeddings`` (d, h, w) as given, ``mask`` (1, H, W) bool, ``grid_mask`` (h, w) bool,
        ``class_id`` () long. Compact on purpose: a batch of them is collated (copied) once and widened to
        float32 once, on the batch's device, by ``PromptedSampleBatch``.
    """
    on = (label != 0) if class_mask else (label == class_id)
    grid_mask = masks_to_embedding_grid(on[None], image_size, grid_size)[0]
    return {
        "image_embeddings": image_embeddings,
        "mask": on[None],
        "grid_mask": grid_mask,
        "class_id": torch.tensor(class_id),
    }


class CachedPromptDataset(Dataset):
    """Training samples from the cache: one (frame, class) pair per class present in the frame.

    The augmentation version follows the paper's schedule (:func:`version_for_epoch`): call
    :meth:`set_epoch` at the start of each epoch (the ``AugmentationVersionHandler`` does).
    ``absent_prompts_per_frame`` adds prompts for classes absent from the frame, with an empty
    target, so that the model learns to answer "none" (the automatic protocol); 0 is the paper's recipe.

    Items: ``image_embeddings`` (d, h, w), ``mask`` (1, H, W) float, ``grid_mask`` (h, w) bool,
    ``class_id`` () long in 1..C.
    """

    def __init__(
        self,
        cache: EmbeddingCache,
        split: str = "training",
        num_classes: int | None = None,
        absent_prompts_per_frame: int = 0,
        seed: int = 666,
    ) -> None:
        self.cache, self.split, self.seed = cache, split, seed
        self.num_classes = num_classes or len(cache.class_names)
        if self.num_classes != len(cache.class_names):
            raise ValueError(
                f"num_classes={self.num_classes} but the cached dataset has {len(cache.class_names)} classes "
                f"({cache.class_names})"
            )
        self.absent_prompts_per_frame = absent_prompts_per_frame
        self.num_versions = max(cache.versions(split))
        # any reader with this interface works: EmbeddingCache, original_layout.OriginalLayoutReader
        self.image_size, self.grid_size = cache.image_size, tuple(cache.grid_size)
        self.set_epoch(0)
        if not self.samples:
            raise ValueError(f"the {split!r} split of {cache.cache_dir} has no frame with an instrument to train on")

    def set_epoch(self, epoch: int) -> None:
        """Choose the version for this 0-based epoch and rebuild the sample list."""
        self.epoch = epoch
        self.version = version_for_epoch(epoch, self.num_versions)
        self.entries = self.cache.entries(self.split, self.version)
        self.samples = prompt_samples(
            self.entries, self.num_classes, self.absent_prompts_per_frame, np.random.default_rng([self.seed, epoch])
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        entry_index, class_id = self.samples[index]
        load_class_mask = getattr(self.cache, "load_class_mask", None)
        if load_class_mask is not None:  # a reader of one binary mask per class (original_layout)
            embedding, mask = load_class_mask(self.entries[entry_index], class_id)
            return prompt_sample(embedding, mask, class_id, self.image_size, self.grid_size, class_mask=True)
        embedding, label = self.cache.load(self.entries[entry_index], as_stored=True)
        return prompt_sample(embedding, label, class_id, self.image_size, self.grid_size)


class CachedFrameDataset(Dataset):
    """Whole frames from the cache, for validation: ``image_embeddings`` (d, h, w), ``label`` (1, H, W) long."""

    def __init__(self, cache: EmbeddingCache, split: str = "validation", version: int = 0) -> None:
        self.cache = cache
        self.entries = cache.entries(split, version)
        if not self.entries:
            raise ValueError(f"the {split!r} split of {cache.cache_dir} is empty")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        embedding, label = self.cache.load(self.entries[index])
        return {"image_embeddings": embedding, "label": label[None], "key": self.entries[index]["key"]}
