"""Tests of a newcomer's path (issue: one source for dataset facts, no work lost to one bad file): re-running
a preparation over its embedding cache, dataset facts from dataset.json, partial EndoVis2017 downloads,
inference past unreadable frames, the bundle root of the configs run, one error for every bad input,
messages, the preparation's crop at inference, and the commands the docs give."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data.embedding_cache import EmbeddingCache, StaleCacheError, cache_identity, precompute_embeddings
from scripts.data.layout import DatasetError, load_datalist
from scripts.data.prepare.custom import prepare_custom

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"


def write_image(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(path)


def make_custom_raw(root: Path, sequences=("case_1", "case_2", "case_3"), size=(16, 20)) -> Path:
    """Raw frames and grey label maps of two classes, one frame per sequence; returns the YAML config."""
    rng = np.random.default_rng(0)
    for index, sequence in enumerate(sequences):
        write_image(root / "frames" / sequence / "img_0.png", rng.integers(0, 256, (*size, 3)))
        labels = np.zeros(size, np.uint8)
        labels[: size[0] // 2, : size[1] // 2] = 1 + index % 2
        write_image(root / "labels" / sequence / "img_0.png", labels)
    config = root / "data.yaml"
    config.write_text(f"frames_dir: frames\nlabels_dir: labels\nclasses: {{1: Grasper, 2: Hook}}\n"
                      f"validation_sequences: [{sequences[-1]}]\n")
    return config


def npy_stamps(cache_dir: str) -> dict[str, int]:
    return {os.path.relpath(p, cache_dir): os.stat(p).st_mtime_ns
            for p in glob.glob(os.path.join(cache_dir, "**", "*.npy"), recursive=True)}


# ------------------------------------------------------------------ item 2: preparing again over the cache
def test_preparation_runs_again_over_its_embedding_cache(tmp_path, small_sam_checkpoint):
    config = make_custom_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_custom(str(config), str(out), progress=False)
    cache_dir = str(out / "embedding_cache" / "tiny")  # train.yaml's default place
    precompute_embeddings(str(out), cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=1)
    before = npy_stamps(cache_dir)
    identity = cache_identity("tiny", small_sam_checkpoint)

    # unchanged raw data: the preparation runs (resume / refresh) and the cache stays valid
    summary = prepare_custom(str(config), str(out), progress=False)
    assert summary["written"] == 0
    cache = EmbeddingCache(cache_dir, identity)
    for split, versions in (("training", (0, 1)), ("validation", (0,))):
        for version in versions:
            cache.entries(split, version)
    assert npy_stamps(cache_dir) == before

    # one raw frame changed: exactly its entries are stale, and precompute re-encodes those alone
    frame = tmp_path / "raw" / "frames" / "case_1" / "img_0.png"
    write_image(frame, np.full((16, 20, 3), 7))
    summary = prepare_custom(str(config), str(out), progress=False)
    assert summary["written"] == 1
    with pytest.raises(StaleCacheError, match="case_1/img_0.png") as error:
        EmbeddingCache(cache_dir, identity).entries("training", 0)
    assert "1 source files changed" in str(error.value)
    precompute_embeddings(str(out), cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=1)
    after = npy_stamps(cache_dir)
    changed = sorted(key for key in after if after[key] != before.get(key))
    assert changed == [os.path.join("entries", f"v{v:02d}", "case_1", "img_0.npy") for v in (0, 1)]
    EmbeddingCache(cache_dir, identity).entries("training", 1)


def test_preparation_still_refuses_other_content_beside_a_cache(tmp_path, small_sam_checkpoint):
    config = make_custom_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_custom(str(config), str(out), progress=False)
    precompute_embeddings(str(out), str(out / "embedding_cache" / "tiny"), "tiny", small_sam_checkpoint)
    (out / "embedding_cache" / "notes.txt").write_text("mine")  # not a cache any more
    with pytest.raises(DatasetError, match="embedding_cache"):
        prepare_custom(str(config), str(out), progress=False)


# ------------------------------------------------------------------ item 7: every kind of bad input at once
def test_precompute_reports_every_kind_of_bad_label_at_once(tmp_path, small_demo_dir, small_sam_checkpoint):
    data = tmp_path / "data"
    shutil.copytree(small_demo_dir, data)
    items = load_datalist(str(data), "training")
    unknown, rgb, small = items[0], items[1], items[2]
    label = np.array(Image.open(unknown["label"]))
    label[0, 0] = 9  # outside the 7-class table
    Image.fromarray(label).save(unknown["label"])
    Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(rgb["label"])  # an RGB label map
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small["label"])  # another size than its frame
    cache_dir = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        precompute_embeddings(str(data), str(cache_dir), "tiny", small_sam_checkpoint, splits=("training",))
    message = str(error.value)
    assert "2 kind(s) of problem" in message
    assert "[9]" in message and unknown["label"] in message
    assert "'RGB'" in message and rgb["label"] in message
    assert "differ in size from their frame" in message and small["label"] in message
    assert not cache_dir.exists() or not glob.glob(str(cache_dir / "**" / "*.npy"), recursive=True)


# ------------------------------------------------------------------ item 8: messages in the bundle's words
@pytest.mark.parametrize("content", [b"\x80\x02random bytes that are no checkpoint" * 40, b"hello world\n" * 50])
def test_a_random_file_as_sam_checkpoint_gets_the_bundles_advice(tmp_path, content):
    from scripts.networks.sam_backbone import build_sam
    from scripts.networks.sam_prompting import load_sam_mask_decoder

    path = tmp_path / "not_sam.pth"
    path.write_bytes(content)
    for load in (lambda: build_sam("tiny", str(path)), lambda: load_sam_mask_decoder("tiny", str(path))):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert str(path) in message and "not a PyTorch weights file" in message
        assert "weights_only" not in message and "will likely succeed" not in message
        assert "--sam_checkpoint" in message


def test_a_cache_of_another_checkpoint_is_a_stale_cache(tmp_path, small_demo_dir, small_cache_dir):
    from scripts.engines import check_evaluation_inputs, check_training_inputs
    from scripts.networks.sam_backbone import save_random_sam_checkpoint

    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), "tiny", seed=1)
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    for check in (lambda: check_training_inputs(small_demo_dir, "tiny", other, small_cache_dir),
                  lambda: check_evaluation_inputs(small_demo_dir, "tiny", other, small_cache_dir, str(model))):
        with pytest.raises(StaleCacheError) as error:
            check()
        assert not isinstance(error.value, FileNotFoundError)
        message = str(error.value)
        assert "sam_checkpoint_md5" in message and "--cache_dir NEW_FOLDER" in message
        assert "monai.bundle run precompute" in message


# ------------------------------------------------------------------ item 6: bundle_root of the configs run
def test_bundle_root_is_the_bundle_whose_configs_run(tmp_path):
    """A second copy of the bundle run while ``scripts`` comes from the first (an editable install of another
    checkout, here PYTHONPATH): models, data and outputs are the second copy's."""
    import subprocess
    import sys

    from conftest import bundle_copy_ignore

    copy = tmp_path / "second_clone" / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=bundle_copy_ignore(str(BUNDLE)))
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}  # the first checkout's code comes first
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(copy / "configs" / "train.yaml"), "--dataset_dir", str(tmp_path / "no_data"),
               "--class_names", "['a']", "--frame_size", "[8, 8]"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot train" in output, output[-3000:]
    assert str(copy / "models" / "sam_vit_h_4b8939.pth") in output, output[-3000:]
    assert str(BUNDLE / "models" / "sam_vit_h_4b8939.pth") not in output
    assert "with the code (scripts/) of" in output  # the mix of two checkouts is said


def test_bundle_root_outside_a_workflow_is_the_code_folder():
    import scripts

    assert scripts.run_bundle_root() == scripts.BUNDLE_ROOT
