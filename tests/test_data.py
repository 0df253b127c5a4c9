"""Tests of the data modules: dataset layout and checks, demo data, augmentation versions."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.data import frame_files
from scripts.data.augmentation import (
    MAX_ROTATION_DEGREES,
    NUM_VERSIONS,
    SCALE_RANGE,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    augment_frame,
    augmentation_rng,
    resize_class_masks,
    version_for_epoch,
)
from scripts.data.demo import ensure_demo_dataset, make_demo_dataset
from scripts.data.frame_files import check_dataset, read_frame, read_label_map, write_sample
from scripts.data.layout import (
    DatasetError,
    class_names,
    load_datalist,
    read_dataset_description,
    write_dataset_description,
)

FRAME_SIZE = (48, 64)
NUM_CLASSES = 7
DEMO_KWARGS = dict(
    frame_size=FRAME_SIZE, num_classes=NUM_CLASSES, train_sequences=2, val_sequences=1, frames_per_sequence=8, seed=3
)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo") / "dataset"
    make_demo_dataset(str(out_dir), **DEMO_KWARGS)
    return out_dir


def _small_dataset(dataset_dir: Path, num_frames: int = 3, frame_size=(16, 20), num_classes: int = 3) -> dict:
    """A tiny hand-made dataset in the layout; returns its description."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(num_frames):
        image = rng.integers(0, 256, size=(*frame_size, 3), dtype=np.uint8)
        label = rng.integers(0, num_classes + 1, size=frame_size).astype(np.uint8)
        entries.append(write_sample(dataset_dir, "seq_a", f"{index:03d}", image, label, num_classes))
    description = {
        "name": "tiny",
        "description": "test",
        "classes": {str(k): f"tool {k}" for k in range(1, num_classes + 1)},
        "ignore_index": 255,
        "frame_size": list(frame_size),
        "training": entries[:-1],
        "validation": entries[-1:],
    }
    write_dataset_description(dataset_dir, description)
    return description


# ------------------------------------------------------------------------------------------------
# layout: description and datalists
# ------------------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as error:
        read_dataset_description(missing)
    assert str(missing) in str(error.value) and "prepare_custom" in str(error.value)


def test_description_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        read_dataset_description(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset_description(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DatasetError, match="no 'classes'"):
        read_dataset_description(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": {"1": "a", "3": "c"}}))
    with pytest.raises(DatasetError, match="1..C without gaps"):
        read_dataset_description(tmp_path)


def test_description_round_trip_and_class_names(tmp_path):
    description = _small_dataset(tmp_path)
    read = read_dataset_description(tmp_path)
    assert read == description
    assert class_names(read) == ["tool 1", "tool 2", "tool 3"]


def test_load_datalist(tmp_path):
    _small_dataset(tmp_path)
    datalist = load_datalist(tmp_path, "training")
    assert len(datalist) == 2
    assert [item["key"] for item in datalist] == ["seq_a/000", "seq_a/001"]
    for item in datalist:
        assert os.path.isabs(item["image"]) and os.path.isfile(item["image"]) and os.path.isfile(item["label"])


def test_unknown_and_empty_split(tmp_path):
    description = _small_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"no split 'test'.*\['training', 'validation'\]"):
        load_datalist(tmp_path, "test")
    description["validation"] = []
    write_dataset_description(tmp_path, description)
    with pytest.raises(DatasetError, match="'validation'.*is empty"):
        load_datalist(tmp_path, "validation")


def test_missing_files_named(tmp_path):
    _small_dataset(tmp_path)
    gone = tmp_path / "images" / "seq_a" / "001.png"
    gone.unlink()
    with pytest.raises(DatasetError, match="do not exist") as error:
        load_datalist(tmp_path, "training")
    assert str(gone) in str(error.value)


def test_many_missing_files_are_abbreviated(tmp_path):
    description = _small_dataset(tmp_path)
    description["training"] = [{"image": f"images/s/{i}.png", "label": f"labels/s/{i}.png"} for i in range(20)]
    write_dataset_description(tmp_path, description)
    with pytest.raises(DatasetError, match="and 30 more"):
        load_datalist(tmp_path, "training")


# ------------------------------------------------------------------------------------------------
# layout: frames and label maps
# ------------------------------------------------------------------------------------------------


def test_corrupt_png(tmp_path):
    description = _small_dataset(tmp_path)
    corrupt = tmp_path / description["training"][0]["image"]
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    with pytest.raises(DatasetError, match="corrupt") as error:
        read_frame(corrupt)
    assert str(corrupt) in str(error.value)
    with pytest.raises(DatasetError, match="cannot be used") as error:
        check_dataset(tmp_path)
    assert "000.png" in str(error.value)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(DatasetError, match="notes.png"):
        read_frame(not_an_image)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_frames_converted_to_rgb(tmp_path, caplog, mode):
    rgb = np.random.default_rng(1).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path = tmp_path / f"frame_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    frame_files._warned_frame_modes.discard(mode)
    with caplog.at_level(logging.WARNING, logger=frame_files.__name__):
        frame = read_frame(path)
    assert frame.shape == (10, 12, 3) and frame.dtype == np.uint8
    assert str(path) in caplog.text
    if mode in ("L", "LA"):
        assert np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 0], frame[..., 2])
        assert np.array_equal(frame[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    if mode == "RGBA":
        assert np.array_equal(frame, rgb)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=frame_files.__name__):
        read_frame(path)
    assert caplog.text == ""  # warned once per mode


def test_16_bit_frame_rejected(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(path)
    with pytest.raises(DatasetError, match="8-bit RGB"):
        read_frame(path)


def test_label_map_reading(tmp_path):
    path = tmp_path / "label.png"
    values = np.array([[0, 1, 2], [3, 255, 0]], dtype=np.uint8)
    Image.fromarray(values, mode="L").save(path)
    label = read_label_map(path, num_classes=3)
    assert label.dtype == np.uint8 and np.array_equal(label, values)
    with pytest.raises(DatasetError, match=r"values \[3\] outside") as error:
        read_label_map(path, num_classes=2)
    assert str(path) in str(error.value)
    with pytest.raises(DatasetError, match=r"values \[255\]"):
        read_label_map(path, num_classes=3, ignore_index=254)


def test_rgb_label_map_rejected(tmp_path):
    path = tmp_path / "colour_mask.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match="single-channel class ids") as error:
        read_label_map(path, num_classes=3)
    assert "preparation step" in str(error.value) and str(path) in str(error.value)


def test_check_dataset_label_values_outside_class_table(tmp_path):
    description = _small_dataset(tmp_path)
    bad = tmp_path / description["validation"][0]["label"]
    Image.fromarray(np.full((16, 20), 9, dtype=np.uint8), mode="L").save(bad)
    with pytest.raises(DatasetError, match=r"values \[9\] outside") as error:
        check_dataset(tmp_path)
    assert str(bad) in str(error.value)


def test_check_dataset_mixed_frame_sizes(tmp_path):
    description = _small_dataset(tmp_path, num_frames=4)
    rng = np.random.default_rng(2)
    entry = write_sample(
        tmp_path,
        "seq_b",
        "000",
        rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
        np.zeros((20, 24), dtype=np.uint8),
        3,
    )
    description["training"].append(entry)
    write_dataset_description(tmp_path, description)
    with pytest.raises(DatasetError, match="2 different sizes") as error:
        check_dataset(tmp_path)
    message = str(error.value)
    assert "16x20: 4 frame(s)" in message and "20x24: 1 frame(s)" in message
    assert "seq_b" in message and "resize or crop" in message


def test_check_dataset_frame_label_size_mismatch(tmp_path):
    description = _small_dataset(tmp_path)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8), mode="L").save(tmp_path / description["training"][0]["label"])
    with pytest.raises(DatasetError, match="differ in size from their frame"):
        check_dataset(tmp_path)


def test_check_dataset_summary(tmp_path):
    _small_dataset(tmp_path)
    summary = check_dataset(tmp_path)
    assert summary["frames"] == {"training": 2, "validation": 1}
    assert summary["frame_size"] == [16, 20]
    assert set(summary["pixels_per_class"]["training"]) == {"tool 1", "tool 2", "tool 3"}
    assert all(count == 2 for count in summary["frames_per_class"]["training"].values())


# ------------------------------------------------------------------------------------------------
# demo data
# ------------------------------------------------------------------------------------------------


def test_demo_layout_and_check(demo_dir):
    description = read_dataset_description(demo_dir)
    assert class_names(description)[:2] == ["Bipolar Forceps", "Prograsp Forceps"]
    assert len(description["classes"]) == NUM_CLASSES and description["frame_size"] == list(FRAME_SIZE)
    assert description["generator"]["seed"] == 3 and "version" in description["generator"]
    assert (demo_dir / "preview.png").is_file()
    summary = check_dataset(demo_dir)
    assert summary["frames"] == {"training": 16, "validation": 8}
    assert summary["frame_size"] == list(FRAME_SIZE)
    assert all(count > 0 for count in summary["frames_per_class"]["training"].values()), summary
    keys = [item["key"] for split in ("training", "validation") for item in load_datalist(demo_dir, split)]
    assert len(keys) == len(set(keys))


def test_demo_frames_and_binary_annotations(demo_dir):
    instruments_per_frame = []
    for item in load_datalist(demo_dir, "training"):
        label = read_label_map(item["label"], NUM_CLASSES)
        present = [c for c in range(1, NUM_CLASSES + 1) if (label == c).any()]
        instruments_per_frame.append(len(present))
        binary_dir = demo_dir / "binary_annotations" / item["sequence"]
        written = sorted(int(p.stem.split("_class")[1]) for p in binary_dir.glob(f"{item['frame']}_class*.png"))
        assert written == present
        for class_id in present:
            mask = np.asarray(Image.open(binary_dir / f"{item['frame']}_class{class_id}.png"))
            assert np.array_equal(mask, np.where(label == class_id, 255, 0))
        for class_id in present:  # instruments are reasonably large
            assert (label == class_id).mean() > 0.005
    assert 0 in instruments_per_frame  # a few frames without instruments
    assert (
        max(instruments_per_frame) <= 3 and sum(n > 0 for n in instruments_per_frame) > len(instruments_per_frame) // 2
    )


def test_demo_is_deterministic(demo_dir, tmp_path):
    again = tmp_path / "again"
    make_demo_dataset(str(again), **DEMO_KWARGS)
    assert _files(again) == _files(demo_dir)
    other = tmp_path / "other_seed"
    make_demo_dataset(str(other), **{**DEMO_KWARGS, "seed": 4})
    assert (other / "images/seq_1/00004.png").read_bytes() != (demo_dir / "images/seq_1/00004.png").read_bytes()


def test_demo_many_classes_named_generically(tmp_path):
    make_demo_dataset(
        str(tmp_path / "d"),
        frame_size=(32, 40),
        num_classes=9,
        train_sequences=3,
        val_sequences=1,
        frames_per_sequence=3,
    )
    description = read_dataset_description(tmp_path / "d")
    assert class_names(description) == [f"class_{k}" for k in range(1, 10)]
    assert check_dataset(tmp_path / "d")["frame_size"] == [32, 40]


def test_ensure_demo_dataset(tmp_path):
    out_dir = tmp_path / "demo"
    kwargs = {**DEMO_KWARGS, "frames_per_sequence": 2}
    ensure_demo_dataset(str(out_dir), **kwargs)
    description_file = out_dir / "dataset.json"
    stamp = description_file.stat().st_mtime_ns
    ensure_demo_dataset(str(out_dir), **kwargs)
    assert description_file.stat().st_mtime_ns == stamp  # same parameters: kept
    with pytest.raises(DatasetError, match="overwrite=True"):
        make_demo_dataset(str(out_dir), **kwargs)
    ensure_demo_dataset(str(out_dir), **{**kwargs, "frames_per_sequence": 3})  # other parameters: regenerated
    assert len(load_datalist(out_dir, "training")) == 6
    assert not (out_dir / "images/seq_1/00003.png").exists()
    (out_dir / "my_notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="my_notes.txt"):
        ensure_demo_dataset(str(out_dir), **kwargs)


def test_ensure_demo_dataset_refuses_real_dataset(tmp_path):
    _small_dataset(tmp_path)
    with pytest.raises(DatasetError, match="did not make"):
        ensure_demo_dataset(str(tmp_path), **DEMO_KWARGS)
    assert read_dataset_description(tmp_path)["name"] == "tiny"


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------


def _frame_and_label(seed: int = 0, size=(24, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(size, dtype=np.uint8)
    label[2:10, 3:20] = 1
    label[12:22, 18:30] = 4
    label[14:18, 2:8] = 255
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return image, label


def test_version_0_is_identity_copy():
    image, label = _frame_and_label()
    out_image, out_label = augment_frame(image, label, 0, "s/0")
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)
    assert out_image is not image and out_label is not label


@pytest.mark.parametrize("version", [1, 10, 11, 20, 21, 30, 31, 40])
def test_augmentation_deterministic_and_label_values_kept(version):
    image, label = _frame_and_label()
    first = augment_frame(image, label, version, "seq_1/00007")
    second = augment_frame(image, label, version, "seq_1/00007")
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    out_image, out_label = first
    assert out_image.shape == image.shape and out_image.dtype == np.uint8
    assert out_label.shape == label.shape and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {0}
    other_seed = augment_frame(image, label, version, "seq_1/00007", seed=1)
    assert augmentation_rng("seq_1/00007", version, 1).random() != augmentation_rng("seq_1/00007", version).random()
    assert other_seed[0].shape == image.shape


@pytest.mark.parametrize("version", [5, 15, 25])
def test_augmentation_moves_image_and_label_together(version):
    label = np.zeros((40, 48), dtype=np.uint8)
    label[5:20, 6:30] = 2
    label[24:36, 20:44] = 5
    image = np.repeat((label * 40)[..., None], 3, axis=2)  # the image shows the label
    for key in ("a/0", "a/1", "a/2"):
        out_image, out_label = augment_frame(image, label, version, key)
        # away from label edges (which bilinear interpolation blends) the image still shows the label
        padded = np.pad(out_label, 1, mode="edge")
        interior = np.ones_like(out_label, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                interior &= padded[dy : dy + out_label.shape[0], dx : dx + out_label.shape[1]] == out_label
        agreement = np.abs(out_image[..., 0].astype(int) - out_label.astype(int) * 40) <= 20
        assert interior.mean() > 0.8 and agreement[interior].mean() > 0.99


def test_flip_versions_give_flipped_copies_per_frame():
    image, label = _frame_and_label()
    flips = []
    for index in range(20):
        out_image, out_label = augment_frame(image, label, 1, f"seq_1/{index:05d}")
        candidates = {
            (h, v): (np.flip(np.flip(image, 1) if h else image, 0) if v else (np.flip(image, 1) if h else image))
            for h in (False, True)
            for v in (False, True)
        }
        matches = [flip for flip, candidate in candidates.items() if np.array_equal(out_image, candidate)]
        assert len(matches) == 1
        horizontal, vertical = matches[0]
        expected_label = np.flip(label, 1) if horizontal else label
        expected_label = np.flip(expected_label, 0) if vertical else expected_label
        assert np.array_equal(out_label, expected_label)
        flips.append(matches[0])
    assert len({h for h, _ in flips}) == 2 and len({v for _, v in flips}) == 2  # not one global transform


def test_colour_jitter_changes_colours_not_geometry():
    image, label = _frame_and_label()
    changed = 0
    for index in range(6):
        out_image, out_label = augment_frame(image, label, 35, f"s/{index}", draws="always")
        assert any(
            np.array_equal(out_label, candidate)
            for candidate in (label, label[::-1], label[:, ::-1], label[::-1, ::-1])
        )
        changed += not any(
            np.array_equal(out_image, candidate)
            for candidate in (image, image[::-1], image[:, ::-1], image[::-1, ::-1])
        )
    assert changed == 6


def _flipped_copies(array: np.ndarray) -> list[np.ndarray]:
    return [array, array[::-1], array[:, ::-1], array[::-1, ::-1]]


def _replayed_draws(key: str, version: int, draws: str, frame_hw) -> bool | None:
    """Whether the version's own transform changes the frame, from the draws replayed in the original's
    order (scale gate, scale, crop top, crop left; h-flip, v-flip; rotation gate, angle, non-zero gate;
    colour gate); None for a rotation too small to be sure it moves a pixel."""
    rng = augmentation_rng(key, version)
    always = draws == "always"
    if 11 <= version <= 20:
        if not (always or rng.random() < 0.5):
            return False
        scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * rng.random()
        return int(frame_hw[0] * scale) > frame_hw[0] or int(frame_hw[1] * scale) > frame_hw[1]
    rng.random(), rng.random()  # the flips
    if not (always or rng.random() < 0.5):
        return False
    if 21 <= version <= 30:
        degrees = MAX_ROTATION_DEGREES * rng.random()
        kept = always or rng.random() < 0.5
        return None if kept and degrees < 1 else kept
    return True


@pytest.mark.parametrize("draws", ["original", "always"])
@pytest.mark.parametrize(("version", "original_rate"), [(15, 0.5), (25, 0.25), (35, 0.5)])
def test_augmentation_draws_follow_the_original_probabilities(draws, version, original_rate):
    # A transform other than a flip shows as an image that is none of the frame's four flipped copies.
    image, label = _frame_and_label(size=(96, 128))
    changed = []
    for index in range(160):
        key = f"seq_2/{index:05d}"
        out_image, _ = augment_frame(image, label, version, key, draws=draws)
        changed.append(not any(np.array_equal(out_image, c) for c in _flipped_copies(image)))
        replayed = _replayed_draws(key, version, draws, image.shape[:2])
        assert replayed is None or changed[-1] == replayed, key
    rate = np.mean(changed)
    if draws == "always":
        assert rate > 0.9  # every draw applies it (scales below 1 + 1/96 leave a 96x128 frame as it is)
    else:
        assert abs(rate - original_rate) < 0.12  # 160 draws: about 3 standard deviations
    with pytest.raises(ValueError, match="augmentation_draws"):
        augment_frame(image, label, version, "s/0", draws="sometimes")


def test_scaled_masks_equal_pils_resize_of_each_class_mask():
    # The original resizes each class's 0/1 uint8 mask with PIL (torchvision's Resize on a PIL image).
    rng = np.random.default_rng(4)
    label = np.zeros((40, 52), dtype=np.uint8)
    label[3:17, 5:30] = 1
    label[20:23, 2:50] = 3
    label[30:38, 40:48] = 255
    label[rng.integers(0, 40, 60), rng.integers(0, 52, 60)] = 6  # fragments
    for size in ((42, 54), (45, 58), (47, 62)):
        out = resize_class_masks(torch.from_numpy(label[None]).float(), size)[0].numpy()
        expected = {
            value: np.asarray(Image.fromarray((label == value).astype(np.uint8)).resize(size[::-1], Image.BILINEAR))
            == 1
            for value in (1, 3, 6, 255)
        }
        claims = sum(mask.astype(int) for mask in expected.values())
        for value, mask in expected.items():
            # where PIL's rounding leaves two class masks on (ties), the label map holds one of them
            assert np.array_equal((out == value) & (claims == 1), mask & (claims == 1)), (size, value)
            assert not ((out == value) & ~mask).any()
        assert np.array_equal(out != 0, claims > 0)
        assert (claims > 1).sum() <= 0.01 * (claims > 0).sum()


def test_rotation_is_counter_clockwise_nearest_as_pil():
    image, label = _frame_and_label(size=(96, 128))
    label[40:60, 70:90] = 2
    found = 0
    for index in range(40):
        key = f"r/{index}"
        rng = augmentation_rng(key, 25)
        horizontal, vertical = rng.random() < 0.5, rng.random() < 0.5
        if not rng.random() < 0.5:
            continue
        degrees = MAX_ROTATION_DEGREES * rng.random()
        if not rng.random() < 0.5 or degrees < 2:
            continue
        flipped_image, flipped_label = image, label
        if horizontal:
            flipped_image, flipped_label = flipped_image[:, ::-1], flipped_label[:, ::-1]
        if vertical:
            flipped_image, flipped_label = flipped_image[::-1], flipped_label[::-1]
        out_image, out_label = augment_frame(image, label, 25, key)
        pil_image = np.asarray(Image.fromarray(np.ascontiguousarray(flipped_image)).rotate(degrees, Image.NEAREST))
        pil_label = np.asarray(Image.fromarray(np.ascontiguousarray(flipped_label)).rotate(degrees, Image.NEAREST))
        assert (out_image == pil_image).all(-1).mean() > 0.99  # sampling ties pick another neighbour
        assert (out_label == pil_label).mean() > 0.99
        found += 1
    assert found >= 3


def test_colour_adjustments_equal_pils_image_enhance():
    # torchvision's ColorJitter on a PIL image (the original's) is PIL's ImageEnhance, in uint8 arithmetic.
    from PIL import ImageEnhance

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    ours, pil = image.transpose(2, 0, 1).astype(np.float64), Image.fromarray(image)
    for adjust, enhancer, factor in (
        (adjust_contrast, ImageEnhance.Contrast, 1.31),
        (adjust_brightness, ImageEnhance.Brightness, 0.77),
        (adjust_saturation, ImageEnhance.Color, 1.18),
        (adjust_brightness, ImageEnhance.Brightness, 1.4),
    ):
        ours, pil = adjust(ours, factor), enhancer(pil).enhance(factor)
        assert np.array_equal(ours.transpose(1, 2, 0), np.asarray(pil))
    assert np.array_equal(adjust_brightness(ours, 1.0), ours)
    flat = adjust_contrast(ours, 0.0)
    assert np.all(flat == flat.flat[0])  # contrast 0: the mean grey everywhere
    grey = adjust_saturation(ours, 0.0)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_invalid_versions():
    image, label = _frame_and_label()
    for version in (-1, NUM_VERSIONS + 1, 1.5):
        with pytest.raises(ValueError):
            augment_frame(image, label, version, "s/0")


def test_version_for_epoch():
    assert [version_for_epoch(e) for e in (0, 1, 2, 3, 5, 79, 80, 81, 159, 161)] == [0, 1, 0, 2, 3, 40, 0, 1, 40, 1]
    assert {version_for_epoch(e) for e in range(1, 80, 2)} == set(range(1, 41))
    assert all(version_for_epoch(e, num_versions=0) == 0 for e in range(10))
    assert [version_for_epoch(e, num_versions=2) for e in range(8)] == [0, 1, 0, 2, 0, 1, 0, 2]
    with pytest.raises(ValueError):
        version_for_epoch(-1)


@pytest.mark.parametrize("files", [("train", "demo"), ("train", "train_distill", "demo", "demo_distill")])
def test_the_generator_defaults_are_the_demo_set_so_make_demo_data_makes_what_the_demo_keeps(files):
    import inspect

    from monai.bundle import ConfigParser

    config = ConfigParser()  # each method's demo command, merged
    config.read_config(
        [str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / f"{name}.yaml") for name in files]
    )
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(make_demo_dataset).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert tuple(config["frame_size"]) == tuple(defaults["frame_size"])
    assert "demo_class_names(7)" in str(config["class_names"]) and defaults["num_classes"] == 7
    for key, value in config["demo_data"].items():
        assert defaults[key] == value, key
    assert inspect.signature(ensure_demo_dataset).parameters["train_sequences"].default == defaults["train_sequences"]
