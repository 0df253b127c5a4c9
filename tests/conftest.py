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


def bundle_run_command(run_id: str, config_file, **settings) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG_FILE --key value ...`` (this Python) as a list;
    ``config_file`` a path or a list of paths (written as MONAI reads a list)."""
    import sys

    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(config_file)]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    return command


# ------------------------------------------------------------------------------------ raw data for tests
def write_image(path, array) -> None:
    """Write ``array`` (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, as uint8, to the PNG ``path`` (folders made)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[2]]
    Image.fromarray(array, mode=mode).save(path, compress_level=1)  # fast: the raw files are fabricated


def make_custom_raw(root, sequences=("case_1", "case_2", "case_3"), size=(16, 20)):
    """Raw frames and grey label maps of two classes, one frame per sequence, under ``root`` (a Path), for
    ``prepare_custom``; returns its YAML config."""
    import numpy as np

    rng = np.random.default_rng(0)
    for index, sequence in enumerate(sequences):
        write_image(root / "frames" / sequence / "img_0.png", rng.integers(0, 256, (*size, 3)))
        labels = np.zeros(size, np.uint8)
        labels[: size[0] // 2, : size[1] // 2] = 1 + index % 2
        write_image(root / "labels" / sequence / "img_0.png", labels)
    config = root / "data.yaml"
    config.write_text(
        f"frames_dir: frames\nlabels_dir: labels\nclasses: {{1: Grasper, 2: Hook}}\n"
        f"validation_sequences: [{sequences[-1]}]\n"
    )
    return config


# ------------------------------------------------------------------------------------------ MONAI Label
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def monailabel_python() -> str:
    """The MONAI Label environment's python; fails (never skips silently) unless MONAILABEL_ABSENT=1."""
    path = os.environ.get("MONAILABEL_PYTHON") or os.path.join(REPO_ROOT, ".venv-monailabel", "bin", "python")
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    if os.environ.get("MONAILABEL_ABSENT") == "1":
        pytest.skip("MONAILABEL_ABSENT=1: MONAI Label deliberately not installed")
    pytest.fail(
        f"no MONAI Label environment at {path}: run tools/setup_monailabel.sh (or set MONAILABEL_PYTHON; "
        "MONAILABEL_ABSENT=1 skips these tests on purpose)"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_demo_dir, small_sam_checkpoint):
    """Studies (the small demo frames, flat), the tiny SAM and a random-but-seeded SurgicalSAM model.pt."""
    import glob

    import torch

    from scripts.surgical_sam.network import SurgicalSAM

    python = monailabel_python()
    root = tmp_path_factory.mktemp("monailabel")
    torch.manual_seed(1)
    model = str(root / "model0.pt")
    torch.save(SurgicalSAM(7, 2, SMALL_DEMO["frame_size"], "tiny", small_sam_checkpoint).state_dict(), model)
    frames = {}
    for path in sorted(glob.glob(os.path.join(small_demo_dir, "images", "*", "*.png"))):
        name = f"{os.path.basename(os.path.dirname(path)).replace('_', '')}_{os.path.basename(path)[:-4]}"
        frames[name] = (path, path.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep))
    return {"python": python, "root": root, "model": model, "sam": small_sam_checkpoint, "frames": frames}
