"""Tests of the embedding cache: precompute, identity and staleness checks, resume, datasets."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_CACHE_VERSIONS, SMALL_DEMO
from PIL import Image

from scripts.data.augmentation import version_for_epoch
from scripts.data.frame_files import read_frame, read_label_map
from scripts.data.layout import DatasetError, load_datalist
from scripts.embedding_cache import (
    MANIFEST_NAME,
    EmbeddingCache,
    StaleCacheError,
    cache_identity,
    cache_problems,
    decode_embedding,
    precompute_embeddings,
)
from scripts.embedding_cache.encoding import TILE_GRID, code_step
from scripts.sam.backbone import build_sam, save_random_sam_checkpoint
from scripts.sam.checkpoint import file_md5
from scripts.sam.geometry import frames_to_sam_input, masks_to_embedding_grid
from scripts.surgical_sam.batches import PromptedSampleBatch
from scripts.surgical_sam.datasets import CachedFrameDataset, CachedPromptDataset

NUM_CLASSES = 7  # the demo's EndoVis2018 classes
GRID = (16, 16)  # the tiny variant's embedding grid
EMBED_DIM = 256
PRECOMPUTE = "monai.bundle run precompute"


def identity(checkpoint: str, variant: str = "tiny") -> dict:
    return cache_identity(variant, checkpoint)


def cache_files(cache_dir: str, pattern: str = "**/*.npy") -> dict[str, int]:
    """relative path -> mtime_ns of the matching files."""
    return {
        os.path.relpath(p, cache_dir): os.stat(p).st_mtime_ns
        for p in glob.glob(os.path.join(cache_dir, pattern), recursive=True)
    }


@pytest.fixture
def cache(small_cache_dir, small_sam_checkpoint) -> EmbeddingCache:
    return EmbeddingCache(small_cache_dir, identity(small_sam_checkpoint))


@pytest.fixture
def private_validation_cache(tmp_path, small_demo_dir, small_sam_checkpoint):
    """(dataset_dir, cache_dir) of a private copy of the demo data and a validation-only cache of it,
    for tests that change source files."""
    dataset_dir = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, dataset_dir)
    cache_dir = str(tmp_path / "cache")
    precompute_embeddings(dataset_dir, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    return dataset_dir, cache_dir


# ------------------------------------------------------------------------------------------ precompute
def test_manifest_identity(small_cache_dir, small_sam_checkpoint):
    with open(os.path.join(small_cache_dir, MANIFEST_NAME)) as handle:
        manifest = json.load(handle)
    found = manifest["identity"]
    assert found["sam_variant"] == "tiny"
    assert found["sam_checkpoint_md5"] == file_md5(small_sam_checkpoint)
    assert found["image_size"] == 256
    assert found["grid_size"] == [16, 16]
    assert found["dtype"] == "float16"
    assert found == identity(small_sam_checkpoint)
    assert manifest["complete"] is True
    assert manifest["splits"] == {"training": list(range(SMALL_CACHE_VERSIONS + 1)), "validation": [0]}


def test_versions_per_split(cache, small_cache_dir):
    assert cache.versions("training") == list(range(SMALL_CACHE_VERSIONS + 1))
    assert cache.versions("validation") == [0]
    frames_per_split = {
        "training": SMALL_DEMO["train_sequences"] * SMALL_DEMO["frames_per_sequence"],
        "validation": SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"],
    }
    for split, versions in (("training", range(SMALL_CACHE_VERSIONS + 1)), ("validation", [0])):
        for version in versions:
            files = {os.path.join(small_cache_dir, e["embedding"]) for e in cache.entries(split, version)}
            assert all(os.path.isfile(f) for f in files)
            assert len(files) == frames_per_split[split], (split, version)
            assert len(cache.entries(split, version)) == frames_per_split[split]
    assert not any("validation" in path for path in cache_files(small_cache_dir))  # entries have no split
    with pytest.raises(StaleCacheError, match="no version 1"):
        cache.entries("validation", 1)


def test_entries_are_8bit_embeddings_and_labels(cache, small_cache_dir):
    """A new cache stores uint8 codes (d, h, w) with a float32 scale and offset per channel's tile (the default)."""
    with open(os.path.join(small_cache_dir, MANIFEST_NAME)) as handle:
        assert json.load(handle)["embedding_encoding"] == "uint8"
    for split, version in (("training", 0), ("training", SMALL_CACHE_VERSIONS), ("validation", 0)):
        for entry in cache.entries(split, version):
            stored = np.load(os.path.join(small_cache_dir, entry["embedding"]))
            assert stored.dtype.names == ("codes", "scale", "offset")
            assert stored["codes"].dtype == np.uint8 and stored["codes"].shape == (EMBED_DIM, *GRID)
            assert stored["scale"].shape == stored["offset"].shape == (EMBED_DIM, *TILE_GRID)
            assert np.isfinite(stored["scale"]).all() and np.isfinite(stored["offset"]).all()
            label = np.asarray(Image.open(os.path.join(small_cache_dir, entry["label"])))
            assert label.shape == tuple(SMALL_DEMO["frame_size"]) == tuple(entry["frame_size"])
            assert entry["classes"] == [c for c in range(1, NUM_CLASSES + 1) if (label == c).any()]
            assert set(entry["grid_classes"]) <= set(entry["classes"])


def test_version0_label_equals_source(cache, small_cache_dir, small_demo_dir):
    for split in ("training", "validation"):
        sources = {item["key"]: item for item in load_datalist(small_demo_dir, split)}
        entries = cache.entries(split, 0)
        assert sorted(e["key"] for e in entries) == sorted(sources)
        for entry in entries:
            cached = np.asarray(Image.open(os.path.join(small_cache_dir, entry["label"])))
            source = read_label_map(sources[entry["key"]]["label"], NUM_CLASSES)
            np.testing.assert_array_equal(cached, source)


def test_augmented_versions_differ_from_original(cache, small_cache_dir):
    """Versions 1..K are real augmentations: some frame's label or embedding differs from version 0."""
    originals = {e["key"]: e for e in cache.entries("training", 0)}
    changed = 0
    for entry in cache.entries("training", 1):
        a = np.asarray(Image.open(os.path.join(small_cache_dir, entry["label"])))
        b = np.asarray(Image.open(os.path.join(small_cache_dir, originals[entry["key"]]["label"])))
        changed += int(not np.array_equal(a, b))
    assert changed > 0


def test_stored_embedding_equals_encoder_output(cache, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    encoder = build_sam("tiny", small_sam_checkpoint).image_encoder.eval()
    items = load_datalist(small_demo_dir, "validation")[:2]
    frames = torch.stack([torch.from_numpy(read_frame(item["image"])).permute(2, 0, 1) for item in items])
    with torch.no_grad():
        expected = encoder(frames_to_sam_input(frames, 256)).numpy()
    by_key = {e["key"]: e for e in cache.entries("validation", 0)}
    for row, item in enumerate(items):
        stored = np.load(os.path.join(small_cache_dir, by_key[item["key"]]["embedding"]))
        # within half a code step of each channel's tile, and a float32 rounding of the tile's range
        half_step = code_step(stored) / 2
        error = np.abs(decode_embedding(stored) - expected[row])
        assert (error <= half_step * (1 + 1e-4) + 1e-6).all(), float((error - half_step).max())


# -------------------------------------------------------------------------------------- staleness
def test_other_checkpoint_is_stale(tmp_path, small_cache_dir):
    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), variant="tiny", seed=1)
    with pytest.raises(StaleCacheError) as error:
        EmbeddingCache(small_cache_dir, identity(other))
    message = str(error.value)
    assert "sam_checkpoint_md5" in message
    assert PRECOMPUTE in message
    assert "sam_variant" not in message  # only the differing field is named


def test_other_variant_is_stale(small_cache_dir, small_sam_checkpoint):
    with pytest.raises(StaleCacheError) as error:
        EmbeddingCache(small_cache_dir, identity(small_sam_checkpoint, variant="vit_b"))
    message = str(error.value)
    assert "sam_variant" in message and "'tiny'" in message and "'vit_b'" in message
    assert "image_size" in message
    assert PRECOMPUTE in message


def test_precompute_never_overwrites_another_identity(tmp_path, small_cache_dir, small_demo_dir):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)
    with open(os.path.join(cache_dir, MANIFEST_NAME), "rb") as handle:
        manifest_before = handle.read()
    files_before = cache_files(cache_dir, "**/*")
    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), variant="tiny", seed=1)
    with pytest.raises(StaleCacheError, match="sam_checkpoint_md5") as error:
        precompute_embeddings(small_demo_dir, cache_dir, "tiny", other, augmentation_versions=SMALL_CACHE_VERSIONS)
    assert "nothing was overwritten" in str(error.value)
    with open(os.path.join(cache_dir, MANIFEST_NAME), "rb") as handle:
        assert handle.read() == manifest_before
    assert cache_files(cache_dir, "**/*") == files_before


def test_precompute_never_mixes_in_another_dataset(tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    """Same encoder, other dataset folder: an old entry (same key) of a frame whose bytes differ there is not taken
    as this dataset's (it is encoded again, in every version); those of identical files are kept."""
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)
    other_data = str(tmp_path / "other_data")
    shutil.copytree(small_demo_dir, other_data)
    item = load_datalist(other_data, "training")[2]
    Image.fromarray(255 - read_frame(item["image"])).save(item["image"])
    before = cache_files(cache_dir)
    precompute_embeddings(
        other_data, cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=SMALL_CACHE_VERSIONS, seed=666
    )
    after = cache_files(cache_dir)
    assert {k for k in after if after[k] != before[k]} == {
        os.path.join("entries", f"v{v:02d}", item["key"] + ".npy") for v in range(SMALL_CACHE_VERSIONS + 1)
    }
    EmbeddingCache(cache_dir, identity(small_sam_checkpoint), dataset_dir=other_data).entries("training", 1)
    with pytest.raises(StaleCacheError, match="changed or vanished"):  # made for other_data now
        EmbeddingCache(cache_dir, identity(small_sam_checkpoint), dataset_dir=small_demo_dir).entries("training", 1)
    files_before = cache_files(cache_dir, "**/*")
    with pytest.raises(StaleCacheError, match="seed"):
        precompute_embeddings(
            other_data, cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=SMALL_CACHE_VERSIONS, seed=1
        )
    assert cache_files(cache_dir, "**/*") == files_before


def test_precompute_refuses_a_cache_of_other_augmentation_draws(
    tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint
):
    """The draws (original probabilities or always-on) are recorded; a cache of other draws, or one of a bundle
    that did not record them (always-on), is not extended with entries of the new draws once it holds versions
    past the flips-only ones (1..10), which both draw alike."""
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)
    manifest_path = os.path.join(cache_dir, "manifest.json")

    def edit_manifest(change):
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        change(manifest)
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle)

    with open(manifest_path) as handle:
        assert json.load(handle)["augmentation_draws"] == "original"
    # versions 0..2 only (flips): always-on and original draws are the same, the cache is extended
    precompute_embeddings(
        small_demo_dir,
        cache_dir,
        "tiny",
        small_sam_checkpoint,
        augmentation_versions=SMALL_CACHE_VERSIONS,
        seed=666,
        augmentation_draws="always",
    )
    edit_manifest(lambda m: m.update(augmentation_draws="original"))
    # a manifest listing version 11 (scale and crop): the draws differ there
    edit_manifest(lambda m: m["splits"]["training"].append(11))
    files_before = cache_files(cache_dir, "**/*")
    with pytest.raises(StaleCacheError, match="augmentation_draws 'original', not 'always'"):
        precompute_embeddings(
            small_demo_dir,
            cache_dir,
            "tiny",
            small_sam_checkpoint,
            augmentation_versions=SMALL_CACHE_VERSIONS,
            seed=666,
            augmentation_draws="always",
        )
    assert cache_files(cache_dir, "**/*") == files_before
    edit_manifest(lambda m: m.pop("augmentation_draws"))
    files_before = cache_files(cache_dir, "**/*")
    with pytest.raises(StaleCacheError, match="bundle 0.3 or older"):
        precompute_embeddings(
            small_demo_dir,
            cache_dir,
            "tiny",
            small_sam_checkpoint,
            augmentation_versions=SMALL_CACHE_VERSIONS,
            seed=666,
        )
    assert cache_files(cache_dir, "**/*") == files_before
    with pytest.raises(ValueError, match="augmentation_draws"):
        precompute_embeddings(small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, augmentation_draws="often")


def test_precompute_again_re_encodes_changed_frames(tmp_path, small_demo_dir, small_sam_checkpoint):
    data = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, data)
    cache_dir = str(tmp_path / "cache")
    precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    item = load_datalist(data, "validation")[0]
    image = read_frame(item["image"])
    Image.fromarray(255 - image).save(item["image"])  # the frame changes after it was encoded
    stale = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    with pytest.raises(StaleCacheError):
        stale.entries("validation")
    before = cache_files(cache_dir)
    precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    after = cache_files(cache_dir)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {os.path.join("entries", "v00", item["key"] + ".npy")}
    cache = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    entry = next(e for e in cache.entries("validation") if e["key"] == item["key"])
    embedding, _ = cache.load(entry)
    encoder = build_sam("tiny", small_sam_checkpoint).image_encoder
    with torch.no_grad():
        expected = encoder(frames_to_sam_input(torch.from_numpy(255 - image).permute(2, 0, 1)[None].float(), 256))
    # the cache encodes through the fast forward, equal to this one to float32 rounding (1e-4 of the embedding's
    # scale, tests/test_sam_fast_encoder.py), and stores 8-bit codes: within half a step of each channel's tile
    half_step = torch.from_numpy(code_step(np.load(os.path.join(cache_dir, entry["embedding"])))) / 2
    scale = expected.abs().max().item()
    assert ((embedding - expected[0]).abs() <= half_step + 1e-4 * scale).all()


@pytest.mark.parametrize("change", ["rewrite_label", "touch_label", "touch_frame", "delete_frame"])
def test_changed_source_is_stale(private_validation_cache, small_sam_checkpoint, change):
    """Other bytes (or no file) make an entry stale; a new mtime over the same bytes does not."""
    dataset_dir, cache_dir = private_validation_cache
    item = load_datalist(dataset_dir, "validation")[1]
    EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")  # fresh: fine
    if change == "rewrite_label":  # other content (and so another size and mtime)
        label = read_label_map(item["label"], NUM_CLASSES)
        label[:8] = 0
        label[-8:, -8:] = 1
        Image.fromarray(label, mode="L").save(item["label"])
    elif change == "touch_label":  # same content, new mtime and size (re-encoded)
        stat = os.stat(item["label"])
        Image.open(item["label"]).save(item["label"], compress_level=0)
        os.utime(item["label"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert os.stat(item["label"]).st_size != stat.st_size
    elif change == "touch_frame":  # same bytes, only the mtime changes: still fresh (entries are checked by content)
        stat = os.stat(item["image"])
        os.utime(item["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert len(EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")) == 4
        return
    else:
        os.remove(item["image"])
    cache = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    with pytest.raises(StaleCacheError) as error:
        cache.entries("validation")
    message = str(error.value)
    assert "changed or vanished" in message
    assert os.path.basename(item["image"] if "frame" in change else item["label"]) in message
    assert PRECOMPUTE in message


def mark_incomplete(cache_dir):
    """What a precompute killed mid-way leaves: a manifest with complete = false."""
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["complete"] = False
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)


def test_incomplete_manifest(tmp_path, small_cache_dir, small_sam_checkpoint):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)
    mark_incomplete(cache_dir)
    with pytest.raises(StaleCacheError, match="interrupted") as error:
        EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    assert PRECOMPUTE in str(error.value)


def test_missing_cache_dir(tmp_path, small_sam_checkpoint):
    missing = str(tmp_path / "no_cache")
    with pytest.raises(FileNotFoundError) as error:
        EmbeddingCache(missing, identity(small_sam_checkpoint))
    assert missing in str(error.value) and PRECOMPUTE in str(error.value)


# ------------------------------------------------------------------------------------------------- resume
def test_resume_recomputes_only_missing_entries(tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)  # copy2: mtimes kept
    reference = {k: np.load(os.path.join(small_cache_dir, k)) for k in cache_files(small_cache_dir)}
    before = cache_files(cache_dir)
    deleted = sorted(before)[::5][:3]
    assert len(deleted) == 3
    for relative in deleted:
        os.remove(os.path.join(cache_dir, relative))
    mark_incomplete(cache_dir)

    result = precompute_embeddings(
        small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=SMALL_CACHE_VERSIONS, seed=666
    )
    assert result["complete"] is True
    after = cache_files(cache_dir)
    assert set(after) == set(before)
    for relative, mtime in after.items():
        if relative in deleted:
            np.testing.assert_array_equal(np.load(os.path.join(cache_dir, relative)), reference[relative])
        else:
            assert mtime == before[relative], f"{relative} was recomputed"
    assert not glob.glob(os.path.join(cache_dir, "**", "*.tmp*"), recursive=True)
    cache = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    assert len(cache.entries("training", SMALL_CACHE_VERSIONS)) == 8


# ---------------------------------------------------------------------------------------------- datasets
def test_prompt_dataset_one_sample_per_present_class(cache):
    dataset = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES)
    entries = cache.entries("training", 0)
    expected = [(i, c) for i, e in enumerate(entries) for c in e["grid_classes"]]
    assert dataset.version == 0
    assert dataset.samples == expected
    assert len(dataset) == len(expected) > 0


def test_prompt_dataset_items(cache):
    dataset = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES)
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        entry_index, class_id = dataset.samples[index]
        assert item["image_embeddings"].shape == (EMBED_DIM, *GRID)
        assert item["image_embeddings"].dtype == torch.float16  # as stored: the batch widens it
        assert item["mask"].shape == (1, *SMALL_DEMO["frame_size"])
        assert item["mask"].dtype == torch.bool
        assert item["grid_mask"].shape == GRID and item["grid_mask"].dtype == torch.bool
        assert item["grid_mask"].any()  # a present class is on the grid
        assert int(item["class_id"]) == class_id and item["class_id"].dtype == torch.long
        embedding, label = cache.load(dataset.entries[entry_index])
        assert torch.equal(item["mask"][0], label == class_id)
        assert torch.equal(item["image_embeddings"], embedding.half())  # the decoded codes, compact
        assert torch.equal(
            item["grid_mask"],
            masks_to_embedding_grid((label == class_id)[None].float(), cache.image_size, cache.grid_size)[0],
        )
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image_embeddings"].shape == (4, EMBED_DIM, *GRID)
    assert batch["class_id"].shape == (4,)
    # PromptedSampleBatch widens once, after the move: what the loss and the network take
    inputs, targets, _, kwargs = PromptedSampleBatch()(batch, torch.device("cpu"))
    assert inputs.dtype == torch.float32 and torch.equal(inputs, batch["image_embeddings"].float())
    assert targets["mask"].dtype == torch.float32 and torch.equal(targets["mask"], batch["mask"].float())
    assert targets["grid_mask"].dtype == torch.bool and torch.equal(kwargs["class_ids"], batch["class_id"])


def test_prompt_dataset_set_epoch_switches_version(cache, small_cache_dir):
    dataset = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES)
    assert dataset.num_versions == SMALL_CACHE_VERSIONS
    for epoch in range(6):
        dataset.set_epoch(epoch)
        expected = version_for_epoch(epoch, SMALL_CACHE_VERSIONS)
        assert dataset.version == expected
        assert (expected == 0) == (epoch % 2 == 0)  # odd epochs use augmented versions
        assert dataset.entries == cache.entries("training", expected)
        assert all(f"v{expected:02d}" in e["embedding"] for e in dataset.entries)
        item = dataset[0]
        entry = dataset.entries[dataset.samples[0][0]]
        stored = np.load(os.path.join(small_cache_dir, entry["embedding"]))
        np.testing.assert_array_equal(item["image_embeddings"].numpy(), decode_embedding(stored).astype(np.float16))
    dataset.set_epoch(1)
    assert dataset.version == 1
    dataset.set_epoch(3)
    assert dataset.version == 2


def test_prompt_dataset_absent_prompts(cache):
    plain = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES)
    dataset = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES, absent_prompts_per_frame=1, seed=3)
    entries = cache.entries("training", 0)
    with_absent = [i for i, e in enumerate(entries) if len(e["classes"]) < NUM_CLASSES]
    assert with_absent  # the demo frames hold at most 3 of the 7 classes
    assert len(dataset) == len(plain) + len(with_absent)
    absent_samples = [(i, c) for i, c in dataset.samples if c not in entries[i]["classes"]]
    assert sorted(i for i, _ in absent_samples) == with_absent  # exactly one per such frame
    position = dataset.samples.index(absent_samples[0])
    item = dataset[position]
    assert item["mask"].sum() == 0 and not item["grid_mask"].any()
    assert 1 <= int(item["class_id"]) <= NUM_CLASSES
    # reproducible for a seed and epoch
    again = CachedPromptDataset(cache, "training", num_classes=NUM_CLASSES, absent_prompts_per_frame=1, seed=3)
    assert again.samples == dataset.samples


def test_prompt_dataset_rejects_wrong_num_classes(cache):
    with pytest.raises(ValueError, match="num_classes"):
        CachedPromptDataset(cache, "training", num_classes=3)


def test_frame_dataset_items(cache):
    dataset = CachedFrameDataset(cache, "validation")
    entries = cache.entries("validation", 0)
    assert len(dataset) == len(entries) == SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]
    item = dataset[0]
    assert item["image_embeddings"].shape == (EMBED_DIM, *GRID)
    assert item["image_embeddings"].dtype == torch.float32
    assert item["label"].shape == (1, *SMALL_DEMO["frame_size"])
    assert item["label"].dtype == torch.long
    assert item["key"] == entries[0]["key"]
    present = [c for c in range(1, NUM_CLASSES + 1) if (item["label"] == c).any()]
    assert present == entries[0]["classes"]


@pytest.mark.parametrize("damage", ["label_value", "mixed_size", "grey_frame"])
def test_precompute_checks_the_dataset_first(tmp_path, small_demo_dir, small_sam_checkpoint, damage):
    """Bad label values and mixed frame sizes are named before anything is written; grey frames are converted."""
    data = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, data)
    first = load_datalist(data, "training")[0]
    if damage == "label_value":
        label = np.array(Image.open(first["label"]))
        label[0, 0] = 9  # outside the 7-class table and not the ignore value
        Image.fromarray(label).save(first["label"])
    elif damage == "mixed_size":
        Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(first["image"])
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(first["label"])
    else:
        Image.fromarray(read_frame(first["image"])[..., 0]).save(first["image"])  # mode L
    cache_dir = str(tmp_path / "cache")
    if damage == "grey_frame":
        precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("training",))
        assert os.path.isfile(os.path.join(cache_dir, "manifest.json"))
        return
    with pytest.raises(DatasetError) as error:
        precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("training",))
    message = str(error.value)
    assert os.path.basename(first["label" if damage == "label_value" else "image"]) in message
    assert (
        ("9" in message)
        if damage == "label_value"
        else ("32x40" in message or "(32, 40)" in message or "32, 40" in message)
    )
    assert not glob.glob(os.path.join(cache_dir, "**", "*.npy"), recursive=True)


# ------------------------------------------------------------------------------- entries shared by splits
def add_fold_splits(dataset_dir: str) -> tuple[list[str], list[str]]:
    """Add ``fold1_training`` (validation + the first training sequence) and ``fold1_validation`` (the
    second training sequence) to dataset.json, as a cross-validation preparation does. -> their keys."""
    path = os.path.join(dataset_dir, "dataset.json")
    with open(path) as handle:
        description = json.load(handle)
    sequences = sorted({item["sequence"] for item in description["training"]})
    description["fold1_training"] = description["validation"] + [
        item for item in description["training"] if item["sequence"] == sequences[0]
    ]
    description["fold1_validation"] = [item for item in description["training"] if item["sequence"] == sequences[1]]
    with open(path, "w") as handle:
        json.dump(description, handle)
    return (
        [f"{i['sequence']}/{i['frame']}" for i in description["fold1_training"]],
        [f"{i['sequence']}/{i['frame']}" for i in description["fold1_validation"]],
    )


def test_new_splits_reuse_the_entries_of_other_splits(tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    data = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, data)
    fold_training, fold_validation = add_fold_splits(data)
    cache_dir = str(tmp_path / "cache")
    precompute_embeddings(
        data,
        cache_dir,
        "tiny",
        small_sam_checkpoint,
        splits=("training", "validation"),
        augmentation_versions=1,
        seed=666,
    )
    before = cache_files(cache_dir)
    # training v0 + v1 (8 frames each) + validation v0 (4 frames): one file per (version, frame)
    assert len(before) == 8 + 8 + 4
    precompute_embeddings(
        data,
        cache_dir,
        "tiny",
        small_sam_checkpoint,
        splits=("fold1_training", "fold1_validation"),
        augmentation_versions=1,
        seed=666,
    )
    after = cache_files(cache_dir)
    # new: version 1 of the 4 former validation frames, now training frames; nothing else encoded again
    new = sorted(set(after) - set(before))
    assert new == sorted(
        os.path.join("entries", "v01", key + ".npy") for key in fold_training if key not in fold_training[4:]
    )
    assert all(after[k] == before[k] for k in before)
    cache = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    assert cache.versions("fold1_training") == [0, 1]  # *_training splits are augmented by default
    assert cache.versions("fold1_validation") == [0]
    assert cache.versions("training") == [0, 1] and cache.versions("validation") == [0]  # earlier splits kept
    assert [e["key"] for e in cache.entries("fold1_validation")] == fold_validation
    shared = {e["key"]: e for e in cache.entries("training")}
    for entry in cache.entries("fold1_validation"):
        assert entry["embedding"] == shared[entry["key"]]["embedding"]
    assert len(CachedFrameDataset(cache, "fold1_validation")) == 4


def test_new_split_does_not_reuse_an_entry_of_a_changed_frame(tmp_path, small_demo_dir, small_sam_checkpoint):
    data = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, data)
    add_fold_splits(data)
    cache_dir = str(tmp_path / "cache")
    precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    item = load_datalist(data, "validation")[0]
    Image.fromarray(255 - read_frame(item["image"])).save(item["image"])
    before = cache_files(cache_dir)
    precompute_embeddings(
        data, cache_dir, "tiny", small_sam_checkpoint, splits=("fold1_training",), augmented_splits=()
    )
    after = cache_files(cache_dir)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {os.path.join("entries", "v00", item["key"] + ".npy")}
    cache = EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    cache.entries("fold1_training")  # fresh
    with pytest.raises(StaleCacheError, match="changed or vanished"):
        cache.entries("validation")  # its index still records the old frame: precompute it again


def test_old_format_cache_is_stale(tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(small_cache_dir, cache_dir)
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["identity"]["format_version"] = 1
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(StaleCacheError, match="format 1 but this bundle reads format 2") as error:
        EmbeddingCache(cache_dir, identity(small_sam_checkpoint))
    assert PRECOMPUTE in str(error.value)
    with pytest.raises(StaleCacheError, match="format 1"):
        precompute_embeddings(small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))


def test_augmented_splits_must_be_precomputed(tmp_path, small_demo_dir, small_sam_checkpoint):
    with pytest.raises(ValueError, match="augmented_splits"):
        precompute_embeddings(
            small_demo_dir,
            str(tmp_path / "c"),
            "tiny",
            small_sam_checkpoint,
            splits=("validation",),
            augmented_splits=("training",),
        )


def test_cache_problems_is_the_check_the_cache_opens_with(tmp_path, small_cache_dir, small_sam_checkpoint):
    """One check: what cache_problems reports is what EmbeddingCache raises; every missing split is named."""
    good = identity(small_sam_checkpoint)
    assert cache_problems(small_cache_dir, good, ["training", "validation"]) == ([], [])
    missing, stale = cache_problems(small_cache_dir, good, ["fold2_training", "validation", "fold2_validation"])
    assert stale == [] and len(missing) == 2
    assert "no 'fold2_training' split" in missing[0] and "no 'fold2_validation' split" in missing[1]
    with pytest.raises(StaleCacheError) as error:
        EmbeddingCache(small_cache_dir, good).versions("fold2_training")
    assert str(error.value) == missing[0]
    other = identity(save_random_sam_checkpoint(str(tmp_path / "other.pth"), "tiny", seed=1))
    missing, stale = cache_problems(small_cache_dir, other)
    assert missing == [] and len(stale) == 1 and "sam_checkpoint_md5" in stale[0]
    with pytest.raises(StaleCacheError) as error:
        EmbeddingCache(small_cache_dir, other)
    assert str(error.value) == stale[0]
    absent = str(tmp_path / "none")
    missing, stale = cache_problems(absent, good)
    assert stale == [] and len(missing) == 1 and absent in missing[0]
    with pytest.raises(FileNotFoundError) as error:
        EmbeddingCache(absent, good)
    assert str(error.value) == missing[0]


# ----------------------------------------------------------------- entries identified by what they hold
def prepared_with_cache(tmp_path, small_demo_dir, small_sam_checkpoint, splits=("validation",)) -> str:
    """A private copy of the demo data with its cache at train.yaml's default place (<data>/embedding_cache/tiny)."""
    data = str(tmp_path / "data")
    shutil.copytree(small_demo_dir, data)
    precompute_embeddings(
        data, os.path.join(data, "embedding_cache", "tiny"), "tiny", small_sam_checkpoint, splits=splits
    )
    return data


def test_moved_dataset_keeps_its_cache(tmp_path, caplog, small_demo_dir, small_sam_checkpoint):
    """`mv` of a prepared dataset: training reads the cache as it is, precompute encodes nothing again."""
    data = prepared_with_cache(tmp_path, small_demo_dir, small_sam_checkpoint)
    moved = str(tmp_path / "moved")
    shutil.move(data, moved)
    cache_dir = os.path.join(moved, "embedding_cache", "tiny")
    with caplog.at_level("INFO", logger="scripts.embedding_cache"):
        assert len(EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")) == 4
    assert f"dataset moved from {data}: cache kept" in caplog.text
    before = cache_files(cache_dir)
    caplog.clear()
    with caplog.at_level("INFO", logger="scripts.embedding_cache"):
        precompute_embeddings(moved, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    assert f"dataset moved from {data}: cache kept" in caplog.text
    assert cache_files(cache_dir) == before
    with open(os.path.join(cache_dir, MANIFEST_NAME)) as handle:
        assert json.load(handle)["dataset"]["dataset_dir"] == moved


def test_copied_dataset_re_encodes_the_file_edited_in_the_copy(tmp_path, caplog, small_demo_dir, small_sam_checkpoint):
    """`cp -r` (new mtimes) then a label edited in the copy: training refuses to use the old entry, naming the
    file; precompute re-encodes that entry alone, and says so in one line."""
    data = prepared_with_cache(tmp_path, small_demo_dir, small_sam_checkpoint)
    copy = str(tmp_path / "copy")
    shutil.copytree(data, copy, copy_function=shutil.copy)  # as cp -r: contents, not times
    cache_dir = os.path.join(copy, "embedding_cache", "tiny")
    EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")  # same contents: fresh
    item = load_datalist(copy, "validation")[1]
    label = read_label_map(item["label"], NUM_CLASSES)
    label[:8] = 0
    Image.fromarray(label, mode="L").save(item["label"])
    relative = os.path.relpath(item["label"], copy)
    with pytest.raises(StaleCacheError, match=f"label {relative} changed") as error:
        EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")
    assert PRECOMPUTE in str(error.value)
    before = cache_files(cache_dir, "**/*.*")
    with caplog.at_level("INFO", logger="scripts.embedding_cache"):
        precompute_embeddings(copy, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    assert f"dataset copied from {data}: cache kept" in caplog.text
    assert f"label {relative} changed: re-encoding 1 entry" in caplog.text
    after = cache_files(cache_dir, "**/*.*")
    entry_files = {k for k in after if k.startswith("entries")}
    assert {k for k in entry_files if after[k] != before.get(k)} == {
        os.path.join("entries", "v00", item["key"] + suffix) for suffix in (".npy", "_label.png")
    }
    entries = {e["key"]: e for e in EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")}
    _, cached_label = EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).load(entries[item["key"]])
    np.testing.assert_array_equal(cached_label.numpy(), label)
    # the original dataset and its cache are untouched and still fresh
    EmbeddingCache(os.path.join(data, "embedding_cache", "tiny"), identity(small_sam_checkpoint)).entries("validation")


def as_absolute_path_cache(cache_dir: str) -> None:
    """Rewrite a cache's indexes as bundles up to 0.6 wrote them: sources as [absolute path, size, mtime_ns]."""
    for index_path in glob.glob(os.path.join(cache_dir, "index", "*.json")):
        with open(index_path) as handle:
            index = json.load(handle)
        with open(os.path.join(cache_dir, MANIFEST_NAME)) as handle:
            root = json.load(handle)["dataset"]["dataset_dir"]
        for entry in index["entries"]:
            entry["sources"] = {
                kind: [os.path.join(root, source["path"]), source["size"], source["mtime_ns"]]
                for kind, source in entry["sources"].items()
            }
        with open(index_path, "w") as handle:
            json.dump(index, handle)


def test_cache_of_absolute_paths_keeps_loading_after_a_move(tmp_path, small_demo_dir, small_sam_checkpoint):
    """A cache of bundles up to 0.6 (absolute paths, size and mtime) still loads, also after `mv` of its dataset
    (sizes and times kept), and precompute records it by content without encoding anything again; after a copy
    (new times, no digest to compare) it is stale, and the message says why and what to run."""
    data = prepared_with_cache(tmp_path, small_demo_dir, small_sam_checkpoint)
    as_absolute_path_cache(os.path.join(data, "embedding_cache", "tiny"))
    copy = str(tmp_path / "copy")
    shutil.copytree(data, copy, copy_function=shutil.copy)
    assert (
        len(
            EmbeddingCache(os.path.join(data, "embedding_cache", "tiny"), identity(small_sam_checkpoint)).entries(
                "validation"
            )
        )
        == 4
    )
    moved = str(tmp_path / "moved")
    shutil.move(data, moved)
    cache_dir = os.path.join(moved, "embedding_cache", "tiny")
    assert len(EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")) == 4
    before = cache_files(cache_dir)
    precompute_embeddings(moved, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    assert cache_files(cache_dir) == before
    with open(os.path.join(cache_dir, "index", "validation_v00.json")) as handle:
        assert all(e["sources"]["label"]["blake2b"] for e in json.load(handle)["entries"])
    with pytest.raises(StaleCacheError, match="absolute paths.*run precompute"):
        EmbeddingCache(os.path.join(copy, "embedding_cache", "tiny"), identity(small_sam_checkpoint)).entries(
            "validation"
        )


# ------------------------------------------------------------------------------- failed precompute runs
def test_precompute_with_a_truncated_checkpoint_leaves_no_identity_behind(
    tmp_path, small_demo_dir, small_sam_checkpoint
):
    """A corrupt SAM file stops precompute with a message naming it; the right file is then accepted."""
    truncated = tmp_path / "sam_tiny.pth"
    data = open(small_sam_checkpoint, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=f"{truncated} could not be read.*make_sam_checkpoint"):
        precompute_embeddings(small_demo_dir, cache_dir, "tiny", str(truncated), splits=("validation",))
    missing, stale = cache_problems(cache_dir, identity(small_sam_checkpoint))
    assert stale == [] and "no embedding cache" in missing[0]
    precompute_embeddings(small_demo_dir, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    assert len(EmbeddingCache(cache_dir, identity(small_sam_checkpoint)).entries("validation")) == 4


def test_precompute_without_sam_checkpoint_says_how_to_get_one(tmp_path, small_demo_dir):
    missing = str(tmp_path / "sam_vit_b_01ec64.pth")
    with pytest.raises(FileNotFoundError) as error:
        precompute_embeddings(small_demo_dir, str(tmp_path / "cache"), "vit_b", missing, splits=("validation",))
    message = str(error.value)
    assert missing in message and "download" in message and "sam_vit_b_01ec64.pth" in message
    assert "surgical-sam make_sam_checkpoint --variant vit_b" in message
    assert not os.path.exists(tmp_path / "cache")


def test_disk_estimate_is_the_real_entry_size(tmp_path, caplog, small_sam_checkpoint):
    """The logged bytes per entry are those the entries take on disk (the tiny encoder's 256x16x16 embedding as
    uint8 codes with a scale and offset per channel and tile, and a label PNG), not raw label pixels: within 20 % at 480x640 frames."""
    from scripts.data.demo import make_demo_dataset

    data = make_demo_dataset(
        str(tmp_path / "data"), frame_size=(480, 640), train_sequences=1, val_sequences=1, frames_per_sequence=2
    )
    cache_dir = str(tmp_path / "cache")
    with caplog.at_level("INFO", logger="scripts.embedding_cache"):
        precompute_embeddings(data, cache_dir, "tiny", small_sam_checkpoint, splits=("validation",))
    estimate = int(re.search(r"(\d+) bytes per entry", caplog.text).group(1))
    written = [os.path.getsize(p) for p in glob.glob(os.path.join(cache_dir, "entries", "**", "*.*"), recursive=True)]
    real = sum(written) / 2  # two validation frames
    assert 0.8 * real <= estimate <= 1.2 * real, (estimate, real)


# -------------------------------------------------------------- bad labels and stale caches, said at once
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


def test_a_cache_of_another_checkpoint_is_a_stale_cache(tmp_path, small_demo_dir, small_cache_dir):
    from scripts.engine.checks import check_evaluation_inputs, check_training_inputs
    from scripts.sam.backbone import save_random_sam_checkpoint

    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), "tiny", seed=1)
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    for check in (
        lambda: check_training_inputs(small_demo_dir, "tiny", other, small_cache_dir),
        lambda: check_evaluation_inputs(small_demo_dir, "tiny", other, small_cache_dir, str(model)),
    ):
        with pytest.raises(StaleCacheError) as error:
            check()
        assert not isinstance(error.value, FileNotFoundError)
        message = str(error.value)
        assert "sam_checkpoint_md5" in message and "--cache_dir NEW_FOLDER" in message
        assert "monai.bundle run precompute" in message
