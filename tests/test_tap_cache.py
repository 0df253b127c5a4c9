"""Tests of Distillation-SAM's tap cache (scripts.embedding_cache with taps=): round trip against the
live encoder, identity refusal, stale sources, the disk-space check, and the workflow option cache_taps."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_DEMO
from monai.bundle import ConfigWorkflow
from PIL import Image

import scripts.embedding_cache.disk_use as cache_disk_use
from scripts.data.augmentation import augment_frame
from scripts.data.frame_files import read_frame, read_label_map
from scripts.data.layout import load_datalist
from scripts.distillation_sam.batches import DistillationBatch
from scripts.distillation_sam.datasets import CachedTapDataset, FrameLabelDataset, distillation_dataset
from scripts.distillation_sam.network import DistillationSAM
from scripts.embedding_cache import (
    MANIFEST_NAME,
    CacheSpaceError,
    EmbeddingCache,
    StaleCacheError,
    cache_identity,
    check_disk_space,
    entry_bytes,
    precompute_embeddings,
)
from scripts.embedding_cache.encoding import TILE_GRID, code_step
from scripts.sam.backbone import build_sam, get_variant, tapped_encoder_forward
from scripts.sam.geometry import frames_to_sam_input

TAPS = (1, 2)  # the tiny SAM's default taps
VERSIONS = 1  # training versions 0..1
TINY = get_variant("tiny")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundle", "configs")


@pytest.fixture(scope="module")
def tap_cache_dir(tmp_path_factory, small_demo_dir, small_sam_checkpoint):
    """Tap cache of the small demo data (training versions 0..1, validation 0). Read-only."""
    cache_dir = str(tmp_path_factory.mktemp("tap_cache") / "tiny_taps1-2")
    precompute_embeddings(
        small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=VERSIONS, seed=666, taps=TAPS
    )
    return cache_dir


def test_identity_and_entry_bytes(tap_cache_dir, small_sam_checkpoint):
    with open(os.path.join(tap_cache_dir, MANIFEST_NAME)) as handle:
        manifest = json.load(handle)
    identity = manifest["identity"]
    assert identity == cache_identity("tiny", small_sam_checkpoint, TAPS)
    assert identity["taps"] == [1, 2] and identity["tap_dim"] == TINY.encoder_embed_dim
    assert identity["dtype"] == "float16" and identity["image_size"] == TINY.image_size
    # the SurgicalSAM identity is unchanged by the tap option
    assert "taps" not in cache_identity("tiny", small_sam_checkpoint)
    # the embedding as uint8 codes with a float32 scale and offset per channel and tile (the default), taps float16
    tiles = TILE_GRID[0] * TILE_GRID[1]
    assert entry_bytes(identity) == 256 * 16 * 16 + 2 * 256 * tiles * 4 + 2 * 16 * 16 * 96 * 2
    assert entry_bytes(identity, "float16") == 256 * 16 * 16 * 2 + 2 * 16 * 16 * 96 * 2
    entry = EmbeddingCache(tap_cache_dir, identity).entries("training", 1)[0]
    taps_file = os.path.join(tap_cache_dir, entry["taps"])
    assert np.load(taps_file).dtype == np.float16 and np.load(taps_file).shape == (2, 16, 16, 96)
    with pytest.raises(ValueError, match=r"taps must be 1-based blocks in 1..2"):
        cache_identity("tiny", small_sam_checkpoint, (3,))


@pytest.mark.parametrize("version", [0, 1])
def test_cached_taps_equal_live_encoder(tap_cache_dir, small_demo_dir, small_sam_checkpoint, version):
    cache = EmbeddingCache(tap_cache_dir, cache_identity("tiny", small_sam_checkpoint, TAPS))
    encoder = build_sam("tiny", small_sam_checkpoint).image_encoder.eval()
    sources = {item["key"]: item for item in load_datalist(small_demo_dir, "training")}
    for entry in cache.entries("training", version)[:3]:
        embedding, label = cache.load(entry)
        taps, frame = cache.load_taps(entry)
        item = sources[entry["key"]]
        image, expected_label = augment_frame(
            read_frame(item["image"]), read_label_map(item["label"], 7), version, entry["key"], seed=666
        )
        assert torch.equal(frame, torch.from_numpy(image.transpose(2, 0, 1).copy()).float())  # lossless frame
        assert torch.equal(label, torch.from_numpy(expected_label.astype(np.int64)))
        with torch.no_grad():
            sam_input = frames_to_sam_input(frame[None], TINY.image_size)
            live_embedding, live_taps = tapped_encoder_forward(encoder, sam_input, TAPS)
        # the embedding as 8-bit codes: within half a step of each channel's tile (and the fast encoder's rounding)
        half_step = torch.from_numpy(code_step(np.load(os.path.join(tap_cache_dir, entry["embedding"])))) / 2
        assert ((embedding - live_embedding[0]).abs() <= half_step + 1e-4).all()
        torch.testing.assert_close(taps, torch.stack(live_taps, 1)[0], rtol=1e-3, atol=1e-2)


def test_network_on_cached_taps_matches_live(tap_cache_dir, small_sam_checkpoint):
    cache = EmbeddingCache(tap_cache_dir, cache_identity("tiny", small_sam_checkpoint, TAPS))
    dataset = CachedTapDataset(cache, "validation", num_classes=7)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = DistillationSAM(
        7,
        SMALL_DEMO["frame_size"],
        sam_variant="tiny",
        sam_checkpoint=small_sam_checkpoint,
        pvt={"embed_dims": (32, 64, 160, 256)},
        pvt_input_size=128,
    ).eval()
    frames, label, args, kwargs = DistillationBatch()(batch)
    assert set(kwargs) == {"embedding", "taps", "label"} and kwargs["taps"].shape == (2, 2, 16, 16, 96) and not args
    with torch.no_grad():
        cached = model(frames, **kwargs)
        live = model(frames, label=label)
    torch.testing.assert_close(cached["semantic_low_res"], live["semantic_low_res"], rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(cached["teacher_mask_tokens"], live["teacher_mask_tokens"], rtol=1e-2, atol=5e-2)
    with pytest.raises(ValueError, match="both the cached embedding and the cached taps"):
        model(frames, embedding=kwargs["embedding"])
    with pytest.raises(ValueError, match="cached taps"):
        model(frames, embedding=kwargs["embedding"], taps=kwargs["taps"][:, :1])


def test_other_taps_or_encoder_refused(tmp_path, tap_cache_dir, small_demo_dir, small_sam_checkpoint, small_cache_dir):
    with pytest.raises(StaleCacheError, match=r"taps: cache \[1, 2\] vs run \[2\].*precompute"):
        EmbeddingCache(tap_cache_dir, cache_identity("tiny", small_sam_checkpoint, (2,)))
    other = save_other_checkpoint(tmp_path)
    with pytest.raises(StaleCacheError, match="sam_checkpoint_md5"):
        EmbeddingCache(tap_cache_dir, cache_identity("tiny", other, TAPS))
    with pytest.raises(StaleCacheError, match="taps: cache None"):  # a SurgicalSAM cache is no tap cache
        distillation_dataset(
            small_demo_dir,
            "training",
            7,
            tap_cache_dir=small_cache_dir,
            tap_cache_identity=cache_identity("tiny", small_sam_checkpoint, TAPS),
        )
    copy = str(tmp_path / "copy")
    shutil.copytree(tap_cache_dir, copy)
    before = sorted(os.listdir(copy))
    with pytest.raises(StaleCacheError, match="nothing was overwritten"):
        precompute_embeddings(small_demo_dir, copy, "tiny", small_sam_checkpoint, taps=(2,))
    assert sorted(os.listdir(copy)) == before


def save_other_checkpoint(tmp_path) -> str:
    from scripts.sam.backbone import save_random_sam_checkpoint

    return save_random_sam_checkpoint(str(tmp_path / "other.pth"), variant="tiny", seed=1)


def test_changed_source_is_stale(tmp_path, small_demo_dir, small_sam_checkpoint):
    dataset_dir = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, dataset_dir)
    cache_dir = str(tmp_path / "cache")
    precompute_embeddings(dataset_dir, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",), taps=TAPS)
    identity = cache_identity("tiny", small_sam_checkpoint, TAPS)
    assert len(CachedTapDataset(EmbeddingCache(cache_dir, identity), "validation")) == 4
    frame = load_datalist(dataset_dir, "validation")[0]["image"]
    Image.fromarray(255 - read_frame(frame)).save(frame)
    with pytest.raises(StaleCacheError, match="changed or vanished.*precompute"):
        CachedTapDataset(EmbeddingCache(cache_dir, identity), "validation")


def test_disk_space_refused_before_writing(tmp_path, monkeypatch, small_demo_dir, small_sam_checkpoint):
    with pytest.raises(CacheSpaceError, match="needs about .* GiB .* free; nothing was written"):
        check_disk_space(str(tmp_path / "new" / "cache"), 2**62, "the tap cache")
    free = shutil.disk_usage(tmp_path).free

    class Usage:
        def __init__(self, free_bytes):
            self.free = free_bytes

    monkeypatch.setattr(cache_disk_use.shutil, "disk_usage", lambda path: Usage(10_000))
    cache_dir = tmp_path / "cache"
    with pytest.raises(CacheSpaceError, match="cache_taps: false"):
        precompute_embeddings(
            small_demo_dir, str(cache_dir), "tiny", small_sam_checkpoint, splits=("validation",), taps=TAPS
        )
    assert not any(name.endswith(".npy") for _, _, names in os.walk(cache_dir) for name in names)
    assert free > 0


def test_cache_taps_workflow_option(tmp_path, tap_cache_dir, small_demo_dir, small_sam_checkpoint):
    common = {
        "dataset_dir": str(small_demo_dir),
        "sam_checkpoint": str(small_sam_checkpoint),
        "output_dir": str(tmp_path / "eval"),
        "ckpt_dir": str(tmp_path / "models"),
        "frame_size": list(SMALL_DEMO["frame_size"]),
        "augmentation_versions": VERSIONS,
        "demo_data": {k: SMALL_DEMO[k] for k in ("train_sequences", "val_sequences", "frames_per_sequence")},
    }
    files = [os.path.join(CONFIGS, f"{name}.yaml") for name in ("train", "train_distill", "demo", "demo_distill")]
    for cache_taps, kind in ((True, CachedTapDataset), (False, FrameLabelDataset)):
        workflow = ConfigWorkflow(
            config_file=files,
            workflow_type="train",
            logging_file=None,
            meta_file=None,
            tap_cache_dir=tap_cache_dir,
            cache_taps=cache_taps,
            **common,
        )
        workflow.initialize()  # the cache exists: initialize only checks it
        assert isinstance(workflow.train_dataset, kind)
        assert isinstance(workflow.parser.get_parsed_content("validate#dataset"), kind)
        if cache_taps:
            sample = workflow.train_dataset[0]
            assert sample["taps"].shape == (2, 16, 16, 96) and sample["embedding"].shape == (256, 16, 16)
