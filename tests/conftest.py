"""Shared fixtures and helpers. Keep this minimal: a helper only one test module uses stays in that module."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture
def tiny_sam_checkpoint(tmp_path):
    """Path of a seeded random-weight SAM checkpoint of the 'tiny' variant (seed 0)."""
    from scripts.sam.backbone import save_random_sam_checkpoint

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
    from scripts.sam.backbone import save_random_sam_checkpoint

    return save_random_sam_checkpoint(str(tmp_path_factory.mktemp("sam") / "sam_tiny.pth"), variant="tiny", seed=0)


@pytest.fixture(scope="session")
def small_cache_dir(tmp_path_factory, small_demo_dir, small_sam_checkpoint):
    """Embedding cache of ``small_demo_dir`` by ``small_sam_checkpoint`` (training versions 0..2). Read-only:
    tests that change it work on a copy (``shutil.copytree``; the index keeps pointing at the sources)."""
    from scripts.embedding_cache import precompute_embeddings

    cache_dir = str(tmp_path_factory.mktemp("small_cache") / "tiny")
    precompute_embeddings(
        small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=SMALL_CACHE_VERSIONS, seed=666
    )
    return cache_dir


@pytest.fixture
def prepared(tmp_path, small_demo_dir, small_cache_dir, small_sam_checkpoint):
    """The small demo with a private copy of the shared cache (a run's initialize re-checks and may rewrite its
    index) and a run folder ``out_dir`` under ``tmp_path``."""
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache_dir, cache_dir)
    return {
        "dataset_dir": small_demo_dir,
        "cache_dir": cache_dir,
        "sam_checkpoint": small_sam_checkpoint,
        "out_dir": tmp_path / "run",
    }


def bundle_copy_ignore(bundle_root: str):
    """``shutil.copytree`` ignore for copying the bundle without its generated data, eval output and weights.

    Only the TOP-LEVEL data/ and eval/ folders are left out: ``ignore_patterns("data")`` would also drop
    bundle/scripts/data, and the copy would then import that package from wherever else ``scripts`` is
    found (another checkout's root or a PYTHONPATH), testing other code than this one.
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


# ------------------------------------------------------------------------------ bundle workflows
BUNDLE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")
_METADATA = os.path.join(BUNDLE_CONFIGS, "metadata.json")
#: The bundle's metadata.json, or None where the checkout has none.
META_FILE = _METADATA if os.path.isfile(_METADATA) else None


@pytest.fixture
def restore_root_logging():
    """ConfigWorkflow applies the bundle's logging.conf to the root logger: undo it after the test.

    A module whose every test needs it says ``pytestmark = pytest.mark.usefixtures("restore_root_logging")``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def allowed_missing() -> set[str]:
    """Properties check_properties may report: without a metadata.json the meta properties (version,
    monai_version, ...) are missing by definition."""
    from monai.bundle.properties import MetaProperties

    return set() if META_FILE else {k for k, v in MetaProperties.items() if v.get("required")}


def checked_workflow(config_files, workflow_type: str, **overrides):
    """A ConfigWorkflow of ``config_files`` (the bundle's metadata, no logging file, ``overrides``),
    initialised, after asserting that check_properties finds every required ``workflow_type`` property."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=list(config_files), workflow_type=workflow_type, meta_file=META_FILE, logging_file=None, **overrides
    )
    workflow.initialize()
    missing = workflow.check_properties()
    assert not (set(missing or []) - allowed_missing()), f"missing or wrong {workflow_type} properties: {missing}"
    return workflow


def use_float64_dense_pe(model) -> None:
    """For float64 runs of a SurgicalSAM: segment-anything makes the dense positional encoding's grid in
    float32; give the model that same constant in float64."""
    layer = model.prompt_encoder.pe_layer
    gaussian = layer.positional_encoding_gaussian_matrix
    layer.positional_encoding_gaussian_matrix = gaussian.float()
    dense_pe = model.prompt_encoder.get_dense_pe().double()
    layer.positional_encoding_gaussian_matrix = gaussian
    model.prompt_encoder.get_dense_pe = lambda: dense_pe
