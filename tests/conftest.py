"""Shared fixtures. Keep this minimal: test modules own their helpers."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_sam_checkpoint(tmp_path):
    """Path of a seeded random-weight SAM checkpoint of the 'tiny' variant (seed 0)."""
    from scripts.networks.sam_backbone import save_random_sam_checkpoint

    return save_random_sam_checkpoint(str(tmp_path / "sam_tiny.pth"), variant="tiny", seed=0)


# ------------------------------------------------------------------------------ small demo + cache
#: The small demo data shared by the cache, engine and workflow tests (fast on CPU).
SMALL_DEMO = {"frame_size": (64, 80), "train_sequences": 2, "val_sequences": 1, "frames_per_sequence": 4}
#: Augmentation versions precomputed in the shared cache (training has versions 0..K).
SMALL_CACHE_VERSIONS = 2


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory):
    """A small demo dataset (64x80 frames, 2 training + 1 validation sequences of 4 frames). Read-only."""
    from scripts.data.demo import make_demo_dataset

    return make_demo_dataset(str(tmp_path_factory.mktemp("small_demo") / "data"), **SMALL_DEMO)


@pytest.fixture(scope="session")
def small_sam_checkpoint(tmp_path_factory):
    """A seeded (seed 0) random 'tiny' SAM checkpoint shared by the session. Read-only."""
    from scripts.networks.sam_backbone import save_random_sam_checkpoint

    return save_random_sam_checkpoint(str(tmp_path_factory.mktemp("sam") / "sam_tiny.pth"), variant="tiny", seed=0)


@pytest.fixture(scope="session")
def small_cache_dir(tmp_path_factory, small_demo_dir, small_sam_checkpoint):
    """Embedding cache of ``small_demo_dir`` by ``small_sam_checkpoint`` (training versions 0..2). Read-only:
    tests that change it work on a copy (``shutil.copytree``; the index keeps pointing at the sources)."""
    from scripts.data.embedding_cache import precompute_embeddings

    cache_dir = str(tmp_path_factory.mktemp("small_cache") / "tiny")
    precompute_embeddings(small_demo_dir, cache_dir, "tiny", small_sam_checkpoint,
                          augmentation_versions=SMALL_CACHE_VERSIONS, seed=666)
    return cache_dir


def bundle_copy_ignore(bundle_root: str):
    """``shutil.copytree`` ignore for copying the bundle without its generated data, eval output and weights.

    Only the TOP-LEVEL data/ and eval/ folders are left out: ``ignore_patterns("data")`` would also drop
    bundle/scripts/data, and the copy would then import that package from wherever else ``scripts`` is
    installed (an editable install of another checkout), testing other code than this one.
    """
    import os
    import shutil

    patterns = shutil.ignore_patterns("*.pt", "*.pth", "__pycache__")
    top = os.path.abspath(bundle_root)

    def ignore(folder, names):
        ignored = set(patterns(folder, names))
        if os.path.abspath(folder) == top:
            ignored |= {"data", "eval"} & set(names)
        return ignored

    return ignore
