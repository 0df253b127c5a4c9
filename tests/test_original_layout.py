"""Reading the original SurgicalSAM code's processed layout as an embedding cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.data.original_layout import (
    OriginalLayoutError,
    OriginalLayoutReader,
    check_original_layout_inputs,
)
from scripts.surgical_sam.datasets import CachedFrameDataset, CachedPromptDataset

NAMES = ["Bipolar Forceps", "Prograsp Forceps", "Large Needle Driver"]
GRID, DIM, FRAME = 16, 256, (64, 80)  # the tiny SAM variant: 16x16 grid of d = 256, on 64x80 frames


def box(top, bottom, left, right):
    mask = np.zeros(FRAME, dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


#: masks of each frame: {class: mask}; frame "00002" has no instrument.
FRAMES = {"00000": {1: box(0, 32, 0, 40), 2: box(40, 64, 40, 80)}, "00001": {3: box(8, 48, 16, 56)}, "00002": {}}


def write_frame(
    folder, sequence, frame, masks, seed, features_dir="sam_features_h", dtype=np.float32, shape=(GRID, GRID, DIM)
):
    rng = np.random.default_rng(seed)
    for sub in ("images", "binary_annotations", features_dir):
        os.makedirs(os.path.join(folder, sub, sequence), exist_ok=True)
    np.save(os.path.join(folder, features_dir, sequence, f"{frame}.npy"), rng.standard_normal(shape).astype(dtype))
    Image.fromarray(np.zeros((*FRAME, 3), dtype=np.uint8)).save(
        os.path.join(folder, "images", sequence, f"{frame}.png")
    )
    for class_id, mask in masks.items():
        Image.fromarray(mask).save(os.path.join(folder, "binary_annotations", sequence, f"{frame}_class{class_id}.png"))


def make_2018(root, versions=2, train_sequences=("seq1", "seq3"), val_sequences=("seq2",)):
    base = os.path.join(root, "endovis_2018")
    for version in range(versions + 1):
        for s, sequence in enumerate(train_sequences):
            for f, (frame, masks) in enumerate(FRAMES.items()):
                write_frame(os.path.join(base, "train", str(version)), sequence, frame, masks, seed=[version, s, f])
    for s, sequence in enumerate(val_sequences):
        for f, (frame, masks) in enumerate(FRAMES.items()):
            write_frame(os.path.join(base, "val"), sequence, frame, masks, seed=[99, s, f])
    return base


def make_2017(root, versions=1):
    base = os.path.join(root, "endovis_2017")
    for version in range(versions + 1):
        for k in range(1, 9):
            write_frame(os.path.join(base, str(version)), f"seq{k}", "frame000", FRAMES["00000"], seed=[version, k])
    return base


@pytest.fixture
def endovis_2018(tmp_path):
    return make_2018(str(tmp_path))


def reader_for(root, **kwargs):
    return OriginalLayoutReader(root, NAMES, sam_variant="tiny", **{"augmentation_versions": 2, **kwargs})


def test_entries_labels_and_transposed_features(endovis_2018):
    reader = reader_for(endovis_2018)
    assert reader.versions("training") == [0, 1, 2] and reader.versions("validation") == [0]
    entries = reader.entries("training", 1)
    assert [e["key"] for e in entries] == [f"{s}/{f}" for s in ("seq1", "seq3") for f in FRAMES]
    first = entries[0]
    assert first["classes"] == [1, 2] and first["grid_classes"] == [1, 2] and first["frame_size"] == list(FRAME)
    embedding, label = reader.load(first)
    stored = np.load(os.path.join(endovis_2018, "train", "1", "sam_features_h", "seq1", "00000.npy"))
    assert embedding.shape == (DIM, GRID, GRID) and embedding.dtype == torch.float32
    # (h, w, d) in the file -> (d, h, w): channel 5 at cell (3, 7) is stored[3, 7, 5]
    assert embedding[5, 3, 7] == torch.tensor(stored[3, 7, 5])
    expected = np.zeros(FRAME, dtype=np.int64)
    expected[0:32, 0:40] = 1
    expected[40:64, 40:80] = 2
    np.testing.assert_array_equal(label.numpy(), expected)
    empty = entries[2]  # no mask: no class, size from the image
    assert empty["classes"] == [] and empty["frame_size"] == list(FRAME)
    assert reader.load(empty)[1].sum() == 0
    assert [e["key"] for e in reader.entries("validation")] == [f"seq2/{f}" for f in FRAMES]
    assert reader.frame_size == list(FRAME)


def test_training_samples_keep_each_class_own_mask(tmp_path):
    """The original trains class c on its own binary mask: where two class masks overlap, each sample's
    target keeps the shared pixels (a label map would have to give them to one class or to neither)."""
    base = os.path.join(str(tmp_path), "endovis_2018")
    one, three = box(0, 32, 0, 40), box(16, 48, 20, 60)  # 16 x 20 pixels on in both
    for version in range(3):
        write_frame(os.path.join(base, "train", str(version)), "seq1", "00000", {1: one, 3: three}, seed=version)
    reader = reader_for(base)
    entry = reader.entries("training", 0)[0]
    assert entry["classes"] == [1, 3] and entry["grid_classes"] == [1, 3]
    _, mask = reader.load_class_mask(entry, 3)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(three > 0))
    _, absent = reader.load_class_mask(entry, 2)
    assert absent.shape == FRAME and not absent.any()
    dataset = CachedPromptDataset(reader, "training", num_classes=3)
    items = {int(dataset[i]["class_id"]): dataset[i] for i in range(len(dataset))}
    assert set(items) == {1, 3}
    for class_id, mask in ((1, one), (3, three)):
        assert torch.equal(items[class_id]["mask"][0], torch.from_numpy(mask > 0))
        assert items[class_id]["mask"].sum() == (mask > 0).sum()  # the 320 shared pixels included
    # the shared block is in both targets, not ignored in both
    assert items[1]["mask"][0, 16:32, 20:40].all() and items[3]["mask"][0, 16:32, 20:40].all()


def test_overlapping_masks_are_ignored_in_the_validation_label_map(tmp_path, caplog):
    folder = os.path.join(str(tmp_path), "endovis_2018", "val")
    write_frame(folder, "seq2", "00000", {1: box(0, 32, 0, 40), 3: box(16, 48, 20, 60)}, seed=0)
    reader = reader_for(os.path.join(str(tmp_path), "endovis_2018"))
    with caplog.at_level(logging.WARNING):
        _, label = reader.load(reader.entries("validation")[0])
    assert "320 pixels on in several class masks" in caplog.text
    assert (label[16:32, 20:40] == 255).all()  # on in both masks
    assert (label[0:16, 0:40] == 1).all() and (label[32:48, 20:60] == 3).all() and (label[16:32, 0:20] == 1).all()
    assert int((label == 255).sum()) == 16 * 20


def test_datasets_read_the_layout_unchanged(endovis_2018):
    reader = reader_for(endovis_2018)
    dataset = CachedPromptDataset(reader, "training", num_classes=3)
    # epoch 0 -> version 0: frames 00000 (classes 1, 2) and 00001 (class 3) of two sequences
    assert len(dataset) == 2 * 3 and dataset.version == 0
    item = dataset[0]
    assert item["image_embeddings"].shape == (DIM, GRID, GRID) and int(item["class_id"]) == 1
    assert item["mask"].shape == (1, *FRAME) and item["mask"].sum() == 32 * 40
    assert item["grid_mask"].shape == (GRID, GRID) and item["grid_mask"].any()
    dataset.set_epoch(1)  # odd epoch: version int((1 % 80 + 1) / 2) = 1
    assert dataset.version == 1
    version1 = dataset[0]["image_embeddings"]
    assert not torch.equal(version1, item["image_embeddings"])
    frames = CachedFrameDataset(reader, "validation")
    assert len(frames) == 3 and frames[0]["label"].shape == (1, *FRAME) and frames[0]["key"] == "seq2/00000"


def test_endovis_2017_folds(tmp_path):
    root = make_2017(str(tmp_path))
    reader = reader_for(root, fold=1, augmentation_versions=1)
    assert [e["key"] for e in reader.entries("validation")] == ["seq2/frame000", "seq5/frame000"]
    assert [e["key"] for e in reader.entries("fold1_training", 1)] == [f"seq{k}/frame000" for k in (1, 3, 4, 6, 7, 8)]
    assert [e["key"] for e in reader.entries("fold3_validation")] == ["seq6/frame000", "seq7/frame000"]
    assert reader.versions("fold0_training") == [0, 1]
    with pytest.raises(OriginalLayoutError, match="fold must be one of"):
        reader_for(root, fold=4)


def test_endovis_2017_versions_under_train(tmp_path):
    base = os.path.join(str(tmp_path), "endovis_2017")
    for k in range(1, 9):
        write_frame(os.path.join(base, "train", "0"), f"seq{k}", "frame000", FRAMES["00001"], seed=k)
    reader = reader_for(base, fold=0, augmentation_versions=0)
    assert [e["key"] for e in reader.entries("validation")] == ["seq1/frame000", "seq3/frame000"]


# ------------------------------------------------------------------------------------------------ errors
def test_missing_folders(tmp_path, endovis_2018):
    with pytest.raises(OriginalLayoutError, match="no folder .*data_root"):
        reader_for(str(tmp_path / "nothing" / "endovis_2018"))
    with pytest.raises(OriginalLayoutError, match="layout must be one of"):
        reader_for(endovis_2018, layout="endovis_2019")
    reader = reader_for(endovis_2018, augmentation_versions=3)  # version 3 was never prepared
    with pytest.raises(OriginalLayoutError, match="lacks 2 folder.*train/3/sam_features_h.*augmentation_versions"):
        reader.check(["training", "validation"])
    with pytest.raises(OriginalLayoutError, match="no split 'fold0_training'.*train_split"):
        reader.versions("fold0_training")


@pytest.mark.parametrize("damage", ["shape", "dtype", "mask_without_features", "class_out_of_range", "bad_name"])
def test_bad_files_are_named(tmp_path, damage):
    folder = os.path.join(str(tmp_path), "endovis_2018", "val")
    write_frame(folder, "seq2", "00000", FRAMES["00000"], seed=0)
    if damage == "shape":
        write_frame(folder, "seq2", "00000", FRAMES["00000"], seed=0, shape=(DIM, GRID, GRID))
        expected = r"00000.npy holds float32 \(256, 16, 16\), expected float32 \(16, 16, 256\)"
    elif damage == "dtype":
        write_frame(folder, "seq2", "00000", FRAMES["00000"], seed=0, dtype=np.float16)
        expected = r"holds float16 .*expected float32"
    elif damage == "mask_without_features":
        write_frame(folder, "seq2", "00001", FRAMES["00001"], seed=1)
        os.remove(os.path.join(folder, "sam_features_h", "seq2", "00001.npy"))
        expected = r"1 frame\(s\) have masks but no features file.*00001_class\*.png"
    elif damage == "class_out_of_range":
        Image.fromarray(box(0, 8, 0, 8)).save(os.path.join(folder, "binary_annotations", "seq2", "00000_class9.png"))
        expected = r"class 9 is outside 1..3"
    else:
        Image.fromarray(box(0, 8, 0, 8)).save(os.path.join(folder, "binary_annotations", "seq2", "00000_mask.png"))
        expected = r"not named <frame>_class<c>.png.*00000_mask.png"
    reader = reader_for(os.path.join(str(tmp_path), "endovis_2018"))
    with pytest.raises(OriginalLayoutError, match=expected):
        reader.entries("validation")


def test_check_inputs_names_every_problem(tmp_path, endovis_2018):
    reader = reader_for(endovis_2018)
    check_original_layout_inputs(reader, ["training", "validation"], "tiny", None, frame_size=FRAME)
    with pytest.raises(FileNotFoundError) as error:
        check_original_layout_inputs(
            reader,
            ["validation"],
            "tiny",
            str(tmp_path / "sam.pth"),
            model_file=str(tmp_path / "model.pt"),
            frame_size=(1024, 1280),
        )
    message = str(error.value)
    assert "frame size: the 'validation' frames are [64, 80] but frame_size is [1024, 1280]" in message
    assert "sam.pth not found" in message and "model.pt not found" in message
    assert "convert_original_checkpoint" in message
