"""Tests of the preparation commands (scripts.data.prepare and their surgical-sam entry points).

Every raw folder is fabricated in tmp_path in the real format (EndoVis sizes are the real ones: a
few frames only) and the prepared outputs are checked pixel for pixel against hand-built arrays.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_custom_raw, write_image
from PIL import Image

from scripts import cli
from scripts.data.frame_files import check_dataset
from scripts.data.layout import DatasetError, load_datalist, read_dataset_description
from scripts.data.prepare import cholecseg8k as cholec
from scripts.data.prepare import common, output_folder
from scripts.data.prepare.cholecseg8k import prepare_cholecseg8k
from scripts.data.prepare.custom import prepare_custom
from scripts.data.prepare.endovis2017 import fold_splits, instrument_type, prepare_endovis2017
from scripts.data.prepare.endovis2018 import prepare_endovis2018
from scripts.embedding_cache import EmbeddingCache, StaleCacheError, cache_identity, precompute_embeddings


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, mtime_ns) of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def summary_of(out_dir: Path) -> dict:
    return json.loads((out_dir / output_folder.SUMMARY_FILE).read_text())


def skipped_reasons(summary: dict) -> dict[str, str]:
    return {item["file"]: item["reason"] for item in summary["skipped"]}


# ================================================================================= EndoVis2017
RAW_2017 = (1080, 1920)


@functools.lru_cache(maxsize=None)
def raw_frame_2017(number: int) -> np.ndarray:
    """A raw 1080x1920 frame that differs at every pixel of the crop window (read-only: cached)."""
    rows, cols = np.mgrid[: RAW_2017[0], : RAW_2017[1]]
    return np.stack([rows % 251, cols % 253, np.full(RAW_2017, number * 20)], axis=-1).astype(np.uint8)


def box(rows, cols, value) -> np.ndarray:
    mask = np.zeros(RAW_2017, dtype=np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


@pytest.fixture(scope="module")
def endovis2017(tmp_path_factory):
    """Raw EndoVis2017 (8 datasets, frame000 each, two bad frame001), its expected label maps, the prepared dir."""
    raw = tmp_path_factory.mktemp("raw2017")
    expected = {}

    def dataset(number, masks, frames=("frame000.png",)):
        folder = raw / f"instrument_dataset_{number}"
        (folder / "ground_truth").mkdir(parents=True)
        for name in frames:
            write_image(folder / "left_frames" / name, raw_frame_2017(number))
        for folder_name, per_frame in masks.items():
            for name, mask in per_frame.items():
                write_image(folder / "ground_truth" / folder_name / name, mask)

    # 1: prograsp (parts 10/20/30, plus a part above the crop) over a Maryland bipolar: 50x50 overlap
    prograsp = box((100, 200), (400, 500), 10) + box((100, 200), (500, 550), 20) + box((100, 200), (550, 600), 30)
    prograsp += box((0, 20), (400, 600), 10)
    bipolar = box((150, 250), (550, 700), 30)
    dataset(
        1,
        {
            "Right_Prograsp_Forceps_labels": {"frame000.png": prograsp},
            "Maryland_Bipolar_Forceps_labels": {"frame000.png": bipolar},
        },
    )
    full = np.zeros(RAW_2017, np.uint8)
    full[bipolar > 0] = 1
    full[prograsp > 0] = 2  # "Right_..." sorts after "Maryland_...": the later folder wins
    expected["seq_1"] = full
    # 2: a needle driver and a folder of no known type (ignored, 10x20 pixels)
    dataset(
        2,
        {
            "Left_Large_Needle_Driver_labels": {"frame000.png": box((500, 600), (1000, 1100), 20)},
            "Mystery_Tool_labels": {"frame000.png": box((700, 710), (700, 720), 10)},
        },
    )
    full = box((500, 600), (1000, 1100), 3)
    full[700:710, 700:720] = 255
    expected["seq_2"] = full
    # 3: 'Other' at the bottom edge (rows 1040:1052 survive the crop); 'Other' masks are not part-coded
    dataset(
        3,
        {
            "Other_labels": {
                "frame000.png": box((1040, 1080), (0, 1920), 10),
                "frame001.png": box((30, 40), (330, 340), 255),
            }
        },
        frames=("frame000.png", "frame001.png"),
    )
    expected["seq_3"] = box((1040, 1080), (0, 1920), 7)
    expected["seq_3/frame001"] = box((30, 40), (330, 340), 7)
    # 4: vessel sealer; frame001 is 1080x1900
    dataset(
        4,
        {
            "Vessel_Sealer_labels": {
                "frame000.png": box((300, 400), (300, 400), 10),
                "frame001.png": box((300, 400), (300, 400), 10),
            }
        },
    )
    write_image(raw / "instrument_dataset_4" / "left_frames" / "frame001.png", raw_frame_2017(4)[:, :1900])
    expected["seq_4"] = box((300, 400), (300, 400), 4)
    # 5: a retractor; frame001's (part-coded) mask holds 40
    dataset(
        5,
        {
            "Grasping_Retractor_labels": {
                "frame000.png": box((800, 900), (1500, 1700), 20),
                "frame001.png": box((10, 20), (10, 20), 40),
            }
        },
        frames=("frame000.png", "frame001.png"),
    )
    expected["seq_5"] = box((800, 900), (1500, 1700), 5)
    dataset(6, {"Monopolar_Curved_Scissors_labels": {"frame000.png": box((28, 29), (320, 321), 30)}})
    expected["seq_6"] = box((28, 29), (320, 321), 6)
    dataset(7, {})  # no instrument
    expected["seq_7"] = np.zeros(RAW_2017, np.uint8)
    dataset(8, {"Bipolar_Forceps_labels": {"frame000.png": box((600, 650), (600, 650), 10)}})
    expected["seq_8"] = box((600, 650), (600, 650), 1)
    # 9: a test dataset without ground truth: reported, not read
    write_image(raw / "instrument_dataset_9" / "left_frames" / "frame000.png", np.zeros((2, 2, 3)))

    out = tmp_path_factory.mktemp("out2017") / "endovis2017"
    summary = prepare_endovis2017(str(raw), str(out), progress=False)
    return raw, out, expected, summary


def test_endovis2017_crop_and_type_merge(endovis2017):
    raw, out, expected, _ = endovis2017
    for number in range(1, 9):
        sequence = f"seq_{number}"
        image = read(out / "images" / sequence / "frame000.png")
        assert image.shape == (1024, 1280, 3)
        np.testing.assert_array_equal(image, raw_frame_2017(number)[28:1052, 320:1600])
        label = read(out / "labels" / sequence / "frame000.png")
        np.testing.assert_array_equal(label, expected[sequence][28:1052, 320:1600])
    np.testing.assert_array_equal(
        read(out / "labels" / "seq_3" / "frame001.png"), expected["seq_3/frame001"][28:1052, 320:1600]
    )
    label = read(out / "labels" / "seq_6" / "frame000.png")
    assert label[0, 0] == 6 and label.sum() == 6  # raw pixel (28, 320) is the crop's corner
    binary = read(out / "binary_annotations" / "seq_1" / "frame000_class2.png")
    np.testing.assert_array_equal(binary, (expected["seq_1"][28:1052, 320:1600] == 2) * 255)
    assert sorted(p.name for p in (out / "binary_annotations" / "seq_1").iterdir()) == [
        "frame000_class1.png",
        "frame000_class2.png",
    ]
    assert not (out / "images" / "seq_5" / "frame001.png").exists()
    check_dataset(out)  # training / validation (= fold 0) hold every frame


def test_endovis2017_folds_and_description(endovis2017):
    _, out, _, _ = endovis2017
    description = read_dataset_description(out)
    assert set(fold_splits()) == {f"fold{i}_{s}" for i in range(4) for s in ("training", "validation")} | {
        "training",
        "validation",
    }
    assert set(fold_splits()) <= set(description)
    assert description["classes"] == {
        "1": "Bipolar Forceps",
        "2": "Prograsp Forceps",
        "3": "Large Needle Driver",
        "4": "Vessel Sealer",
        "5": "Grasping Retractor",
        "6": "Monopolar Curved Scissors",
        "7": "Other",
    }
    assert description["frame_size"] == [1024, 1280] and description["ignore_index"] == 255
    folds = {0: [1, 3], 1: [2, 5], 2: [4, 8], 3: [6, 7]}
    for fold, validation in folds.items():
        sequences = lambda split: sorted({entry["sequence"] for entry in description[split]})  # noqa: E731
        assert sequences(f"fold{fold}_validation") == [f"seq_{n}" for n in validation]
        assert sequences(f"fold{fold}_training") == [f"seq_{n}" for n in range(1, 9) if n not in validation]
    assert description["training"] == description["fold0_training"]
    assert description["validation"] == description["fold0_validation"]
    assert [e["frame"] for e in description["validation"]] == ["frame000", "frame000", "frame001"]
    assert description["validation"][0] == {
        "image": "images/seq_1/frame000.png",
        "label": "labels/seq_1/frame000.png",
        "sequence": "seq_1",
        "frame": "frame000",
    }


def test_endovis2017_summary(endovis2017):
    raw, out, _, summary = endovis2017
    written = summary_of(out)
    assert {k: v for k, v in summary.items() if k not in ("written", "reused")} == written
    assert written["frames"] == 9 and summary["written"] == 9
    assert written["frames_per_split"]["fold0_validation"] == 3 and written["frames_per_split"]["fold0_training"] == 6
    assert written["frames_per_class"] == {
        "Bipolar Forceps": 2,
        "Prograsp Forceps": 1,
        "Large Needle Driver": 1,
        "Vessel Sealer": 1,
        "Grasping Retractor": 1,
        "Monopolar Curved Scissors": 1,
        "Other": 2,
    }
    assert written["pixels_per_class"]["Other"] == 12 * 1280 + 100
    assert written["pixels_per_class"]["Large Needle Driver"] == 100 * 100
    assert written["pixels_per_class"]["Prograsp Forceps"] == 100 * 200  # the rows above the crop are gone
    assert written["ignored_pixels"] == 200
    assert written["notes"] == {
        "frames with overlaps": 1,
        "overlap pixels": 2500,
        "pixels of unknown instrument folders": 200,
    }
    reasons = skipped_reasons(written)
    assert (
        "unknown instrument folder"
        in reasons[os.path.join("instrument_dataset_2", "ground_truth", "Mystery_Tool_labels")]
    )
    bad_mask = [r for f, r in reasons.items() if f.endswith(os.path.join("Grasping_Retractor_labels", "frame001.png"))]
    assert bad_mask and "unexpected mask values [40]" in bad_mask[0]
    wrong_size = [
        r for f, r in reasons.items() if f.endswith(os.path.join("instrument_dataset_4", "left_frames", "frame001.png"))
    ]
    assert wrong_size and "1080x1900" in wrong_size[0]
    assert reasons[str(raw / "instrument_dataset_9")] == "no ground_truth folder"
    assert len(reasons) == 4


def test_endovis2017_rerun_rewrites_nothing(endovis2017):
    raw, out, _, _ = endovis2017
    before = files_of(out)
    again = prepare_endovis2017(str(raw), str(out), progress=False)
    assert again["written"] == 0 and again["reused"] == 9
    assert files_of(out) == before


@pytest.mark.parametrize(
    "name", ["Left_Prograsp_Forceps_labels", "Right_Prograsp_Forceps_labels", "Prograsp_Forceps_labels"]
)
def test_endovis2017_left_right_names(name):
    assert instrument_type(name) == 2
    assert instrument_type("Maryland_Bipolar_Forceps_labels") == 1
    assert instrument_type("Bipolar_Forceps_labels") == 1
    assert instrument_type("Suction_labels") is None


def test_endovis2017_bad_raw_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist(.|\n)*Expected layout(.|\n)*instrument_dataset_K"):
        prepare_endovis2017(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no instrument_dataset_K folder(.|\n)*left_frames/frameNNN.png"):
        prepare_endovis2017(str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "flat" / "instrument_dataset_1" / "frames").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no left_frames"):
        prepare_endovis2017(str(tmp_path / "flat"), str(tmp_path / "out"))
    write_image(tmp_path / "test_set" / "instrument_dataset_9" / "left_frames" / "frame000.png", np.zeros((2, 2, 3)))
    with pytest.raises(DatasetError, match="has a ground_truth folder(.|\n)*Expected layout"):
        prepare_endovis2017(str(tmp_path / "test_set"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ================================================================================= EndoVis2018
SIZE_2018 = (1024, 1280)


def frame_2018(value: int) -> np.ndarray:
    frame = np.zeros((*SIZE_2018, 3), np.uint8)
    frame[..., 0] = value
    frame[::7, ::5, 1] = 200
    return frame


def mask_2018(rows, cols, value=1) -> np.ndarray:
    mask = np.zeros(SIZE_2018, np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


def test_endovis2018_isinet_instance_masks(tmp_path):
    raw = tmp_path / "raw"
    release = raw / "miccai_challenge_2018_release_1"
    # seq_1 (training), 2018 numbering: bipolar 0/1 mask, then a scissors 0/255 mask with a prefix overlapping it
    for frame in ("frame000", "frame001"):
        write_image(release / "seq_1" / "left_frames" / f"{frame}.png", frame_2018(10))
    labels = release / "seq_1" / "instrument_labels"
    write_image(labels / "frame000_class1_inst0.png", mask_2018((0, 100), (0, 100), 1))
    write_image(labels / "seq1_frame000_class4_inst1.png", mask_2018((50, 150), (50, 150), 255))
    write_image(labels / "frame009_class2_inst0.png", mask_2018((0, 10), (0, 10), 1))  # no such frame
    # seq_2 (validation), ISINet's 2017-compatible numbering: 6 scissors -> 4, 8 suction -> 6, 5 -> not in 2018
    write_image(raw / "seq_2" / "left_frames" / "frame000.png", frame_2018(20))
    labels17 = raw / "seq_2" / "instrument_labels_2017"
    rgb_mask = np.zeros((*SIZE_2018, 3), np.uint8)
    rgb_mask[200:300, 200:300, 1] = 255
    write_image(labels17 / "frame000_class6_inst0.png", rgb_mask)
    write_image(labels17 / "frame000_class8_inst0.png", mask_2018((400, 410), (0, 1280), 1))
    write_image(labels17 / "frame000_class5_inst0.png", mask_2018((500, 502), (0, 100), 1))
    # seq_3 (training): a mask with a value that is neither 1 nor 255
    write_image(raw / "seq_3" / "left_frames" / "frame000.png", frame_2018(30))
    write_image(raw / "seq_3" / "instrument_labels" / "frame000_class2_inst0.png", mask_2018((0, 5), (0, 5), 7))
    # seq_17 has no split; seq_16 (training) has no labels
    write_image(raw / "seq_17" / "left_frames" / "frame000.png", frame_2018(40))
    (raw / "seq_17" / "instrument_labels").mkdir()
    write_image(raw / "seq_16" / "left_frames" / "frame000.png", frame_2018(40))

    out = tmp_path / "out"
    summary = prepare_endovis2018(str(raw), str(out), progress=False)
    expected = np.zeros(SIZE_2018, np.uint8)
    expected[0:100, 0:100] = 1
    expected[50:150, 50:150] = 4
    np.testing.assert_array_equal(read(out / "labels" / "seq_1" / "frame000.png"), expected)
    np.testing.assert_array_equal(read(out / "labels" / "seq_1" / "frame001.png"), np.zeros(SIZE_2018))
    np.testing.assert_array_equal(read(out / "images" / "seq_1" / "frame000.png"), frame_2018(10))
    expected = np.zeros(SIZE_2018, np.uint8)
    expected[200:300, 200:300] = 4
    expected[400:410, :] = 6
    expected[500:502, 0:100] = 255
    np.testing.assert_array_equal(read(out / "labels" / "seq_2" / "frame000.png"), expected)

    description = read_dataset_description(out)
    assert list(description["classes"].values()) == [
        "Bipolar Forceps",
        "Prograsp Forceps",
        "Large Needle Driver",
        "Monopolar Curved Scissors",
        "Ultrasound Probe",
        "Suction Instrument",
        "Clip Applier",
    ]
    assert [e["frame"] for e in description["training"]] == ["frame000", "frame001"]
    assert [e["sequence"] for e in description["validation"]] == ["seq_2"]
    assert summary["sequences"] == {"training": ["seq_1"], "validation": ["seq_2"]}
    assert summary["notes"] == {
        "frames with overlaps": 1,
        "overlap pixels": 50 * 50,
        "pixels of instances outside the class table": 200,
    }
    # seq_1 (it wins its overlap) and seq_2
    assert summary["pixels_per_class"]["Monopolar Curved Scissors"] == 100 * 100 + 100 * 100
    reasons = skipped_reasons(summary)
    assert any("instance mask of no frame" in r for f, r in reasons.items() if f.endswith("frame009_class2_inst0.png"))
    assert any("class 5 (2017 numbering)" in r for f, r in reasons.items() if f.endswith("frame000_class5_inst0.png"))
    assert any("unexpected mask values [7]" in r for f, r in reasons.items() if "seq_3" in f)
    assert reasons["seq_17/frame000"] == "sequence seq_17 is in no split"
    assert "no instrument_labels/ folder" in reasons[str(raw / "seq_16")]


def test_endovis2018_label_maps(tmp_path):
    raw, labels = tmp_path / "raw", tmp_path / "labels"
    for sequence, value in (("seq_1", 1), ("seq_5", 2)):
        for frame in ("frame000", "frame001"):
            write_image(raw / sequence / "left_frames" / f"{frame}.png", frame_2018(value))
    type_map = mask_2018((10, 20), (30, 40), 7)
    type_map[0, 0] = 255
    write_image(labels / "seq_1" / "frame000.png", type_map)
    write_image(labels / "seq_1" / "frame001.png", mask_2018((0, 1), (0, 1), 9))  # 9 is no class
    write_image(labels / "seq_5" / "frame000.png", mask_2018((0, 1), (0, 2), 5))  # seq_5 frame001 has no label
    write_image(raw / "seq_9" / "left_frames" / "frame000.png", frame_2018(3))  # an empty labels folder
    (labels / "seq_9").mkdir()
    write_image(raw / "seq_12" / "left_frames" / "frame000.png", frame_2018(3))  # no labels folder at all
    out = tmp_path / "out"
    summary = prepare_endovis2018(str(raw), str(out), labels_dir=str(labels), progress=False)
    np.testing.assert_array_equal(read(out / "labels" / "seq_1" / "frame000.png"), type_map)
    assert summary["frames_per_split"] == {"training": 1, "validation": 1}
    assert summary["ignored_pixels"] == 1 and summary["pixels_per_class"]["Clip Applier"] == 100
    reasons = skipped_reasons(summary)
    assert "unexpected label values [9]" in reasons[str(labels / "seq_1" / "frame001.png")]
    assert "missing" in reasons[str(labels / "seq_5" / "frame001.png")]
    assert "missing" in reasons[str(labels / "seq_9" / "frame000.png")]
    assert "no labels for seq_12" in reasons[str(raw / "seq_12")]
    assert len(reasons) == 4


def test_endovis2018_bad_raw_folders(tmp_path):
    (tmp_path / "raw" / "seq_1" / "left_frames").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no left_frames(.|\n)*Expected layout"):
        prepare_endovis2018(str(tmp_path / "raw"), str(tmp_path / "out"))
    write_image(tmp_path / "raw" / "seq_1" / "left_frames" / "frame000.png", np.zeros((4, 4, 3)))
    with pytest.raises(DatasetError, match="no sequence .* has labels .*no instrument_labels/ folder"):
        prepare_endovis2018(str(tmp_path / "raw"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="holds no seq_N folder"):
        prepare_endovis2018(str(tmp_path / "raw" / "seq_1"), str(tmp_path / "out"))


# ================================================================================= CholecSeg8k
TABLE = {colour: label for label, (colour, _) in enumerate(cholec.COLOUR_TABLE)}


def colour_frame(seed: int, shape=(6, 8)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame, its colour mask (white 1-pixel edge, a stray white pixel, one unknown colour) and expected labels."""
    rng = np.random.default_rng(seed)
    colours = np.array([c for c, _ in cholec.COLOUR_TABLE], np.uint8)
    labels = rng.integers(0, 13, size=shape).astype(np.uint8)
    mask = colours[labels]
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255
    labels[0, :] = labels[-1, :] = labels[:, 0] = labels[:, -1] = 255
    mask[2, 3] = 255
    labels[2, 3] = 255
    mask[3, 4] = (1, 2, 3)
    labels[3, 4] = 255
    frame = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    return frame, mask, labels


def make_cholec_raw(
    raw: Path,
    clips=(("video01", "video01_00080"), ("video01", "video01_00160"), ("video12", "video12_15750")),
    frames_per_clip=2,
) -> dict:
    expected = {}
    seed = 0
    for video, clip in clips:
        for k in range(frames_per_clip):
            frame, mask, labels = colour_frame(seed)
            seed += 1
            index = 80 + k
            write_image(raw / video / clip / f"frame_{index}_endo.png", frame)
            write_image(raw / video / clip / f"frame_{index}_endo_color_mask.png", mask)
            write_image(raw / video / clip / f"frame_{index}_endo_mask.png", labels)  # not read
            expected[(clip, f"frame_{index}")] = (frame, labels)
    return expected


def test_cholecseg8k_colour_mapping_and_split(tmp_path):
    raw = tmp_path / "raw"
    expected = make_cholec_raw(raw)
    # an RGBA mask: the alpha is dropped
    frame, mask, labels = colour_frame(99)
    write_image(raw / "video12" / "video12_15750" / "frame_90_endo.png", frame)
    write_image(
        raw / "video12" / "video12_15750" / "frame_90_endo_color_mask.png",
        np.concatenate([mask, np.full((*mask.shape[:2], 1), 255, np.uint8)], axis=2),
    )
    expected[("video12_15750", "frame_90")] = (frame, labels)
    # a frame whose mask is missing and one whose mask is grey
    write_image(raw / "video01" / "video01_00160" / "frame_95_endo.png", frame)
    write_image(raw / "video01" / "video01_00160" / "frame_96_endo.png", frame)
    write_image(raw / "video01" / "video01_00160" / "frame_96_endo_color_mask.png", labels)

    out = tmp_path / "out"
    summary = prepare_cholecseg8k(str(raw), str(out), progress=False)
    for (clip, name), (frame, labels) in expected.items():
        np.testing.assert_array_equal(read(out / "images" / clip / f"{name}.png"), frame)
        np.testing.assert_array_equal(read(out / "labels" / clip / f"{name}.png"), labels)
    description = read_dataset_description(out)
    assert description["classes"]["1"] == "Abdominal Wall" and description["classes"]["12"] == "Liver Ligament"
    assert len(description["classes"]) == 12 and description["frame_size"] == [6, 8]
    # the overlay names the classes the preparation wrote: training with it passes the dataset-fact check
    from monai.bundle import ConfigParser

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")
    overlay = ConfigParser()
    overlay.read_config([os.path.join(configs, "train.yaml"), os.path.join(configs, "cholecseg8k.yaml")])
    assert overlay.get_parsed_content("class_names") == [description["classes"][str(i)] for i in range(1, 13)]
    assert summary["sequences"] == {"training": ["video01_00080", "video01_00160"], "validation": ["video12_15750"]}
    assert summary["frames_per_split"] == {"training": 4, "validation": 3}
    all_labels = np.stack([labels for _, labels in expected.values()])
    edge_and_stray = int(np.count_nonzero(all_labels == 255)) - len(expected)
    assert summary["notes"] == {
        "unknown colour 1,2,3 (pixels)": len(expected),
        "unknown colour 255,255,255 (pixels)": edge_and_stray,
    }
    assert summary["ignored_pixels"] == edge_and_stray + len(expected)
    assert summary["background_pixels"] == int(np.count_nonzero(all_labels == 0))
    assert summary["pixels_per_class"]["Liver"] == int(np.count_nonzero(all_labels == 2))
    assert summary["frames_per_class"]["Liver"] == int(sum((labels == 2).any() for labels in all_labels))
    reasons = skipped_reasons(summary)
    assert "missing" in reasons[str(raw / "video01" / "video01_00160" / "frame_95_endo_color_mask.png")]
    assert "mode 'L'" in reasons[str(raw / "video01" / "video01_00160" / "frame_96_endo_color_mask.png")]

    other = tmp_path / "other"
    summary = prepare_cholecseg8k(str(raw), str(other), val_videos=["1"], progress=False)
    assert summary["sequences"]["validation"] == ["video01_00080", "video01_00160"]
    with pytest.raises(DatasetError, match="video55 are not in --raw_dir"):
        prepare_cholecseg8k(str(raw), str(tmp_path / "third"), val_videos=["video55"])
    with pytest.raises(DatasetError, match="every video is a validation video"):
        prepare_cholecseg8k(str(raw), str(tmp_path / "third"), val_videos=["video01", "video12"])


def test_cholecseg8k_bad_raw_folders(tmp_path):
    (tmp_path / "raw" / "video01" / "video01_00080").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no frame_K_endo.png(.|\n)*frame_K_endo_color_mask.png"):
        prepare_cholecseg8k(str(tmp_path / "raw"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="holds no videoNN folder"):
        prepare_cholecseg8k(str(tmp_path / "raw" / "video01"), str(tmp_path / "out"))


# ================================================================================= idempotence, resume, out_dir
def test_rerun_keeps_files_and_redoes_changed_sources(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_cholec_raw(raw)
    first = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert first["written"] == 6
    before = files_of(out)
    second = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert (second["written"], second["reused"]) == (0, 6)
    assert files_of(out) == before
    # a changed source: only its frame is redone
    frame, mask, labels = colour_frame(123)
    mask[1:-1, 1:-1] = cholec.COLOUR_TABLE[5][0]  # all grasper inside the edge
    labels[1:-1, 1:-1] = 5
    write_image(raw / "video01" / "video01_00080" / "frame_80_endo_color_mask.png", mask)
    third = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert (third["written"], third["reused"]) == (1, 5)
    np.testing.assert_array_equal(read(out / "labels" / "video01_00080" / "frame_80.png"), labels)
    assert sorted(p.name for p in (out / "binary_annotations" / "video01_00080").glob("frame_80_*")) == [
        "frame_80_class5.png"
    ]  # masks of classes the frame lost are gone
    after = files_of(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed <= {
        "labels/video01_00080/frame_80.png",
        "binary_annotations/video01_00080/frame_80_class5.png",
        "dataset.json",
        output_folder.SUMMARY_FILE,
        output_folder.STATE_FILE,
    }
    # a source that disappears takes its outputs with it
    os.remove(raw / "video12" / "video12_15750" / "frame_81_endo.png")
    fourth = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert fourth["frames"] == 5 and not (out / "images" / "video12_15750" / "frame_81.png").exists()


def test_resume_after_interruption(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    make_cholec_raw(raw)
    clean = tmp_path / "clean"
    prepare_cholecseg8k(str(raw), str(clean), progress=False)

    monkeypatch.setattr(common, "STATE_SAVE_INTERVAL", 1)
    real_load, calls = cholec._load, []

    def interrupted(frame_path, mask_path):
        calls.append(frame_path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_load(frame_path, mask_path)

    monkeypatch.setattr(cholec, "_load", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert not (out / "dataset.json").exists()  # unfinished: no dataset.json
    assert len(json.loads((out / output_folder.STATE_FILE).read_text())["frames"]) == 3
    monkeypatch.setattr(cholec, "_load", real_load)
    resumed = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert (resumed["written"], resumed["reused"]) == (3, 3)
    clean_files = {k: v[0] for k, v in files_of(clean).items()}
    assert {k: v[0] for k, v in files_of(out).items()} == clean_files
    # a finished dataset whose re-run (for a changed source) is interrupted is marked unfinished again
    os.utime(raw / "video01" / "video01_00080" / "frame_80_endo.png", ns=(1, 1))
    os.utime(raw / "video12" / "video12_15750" / "frame_81_endo.png", ns=(1, 1))
    calls.clear()
    monkeypatch.setattr(cholec, "_load", interrupted)
    monkeypatch.setattr(common, "STATE_SAVE_INTERVAL", 25)
    calls.extend(["earlier"] * 2)  # so the 2nd changed frame is the 4th call, which raises
    with pytest.raises(KeyboardInterrupt):
        prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(cholec, "_load", real_load)
    again = prepare_cholecseg8k(str(raw), str(out), progress=False)
    assert (again["written"], again["reused"]) == (2, 4)  # the state was not saved: both are redone
    assert {k: v[0] for k, v in files_of(out).items() if k != output_folder.STATE_FILE} == {
        k: v for k, v in clean_files.items() if k != output_folder.STATE_FILE
    }


def test_out_dir_with_other_content_is_refused(tmp_path):
    raw = tmp_path / "raw"
    make_cholec_raw(raw)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="files this command did not make \\(notes.txt\\)"):
        prepare_cholecseg8k(str(raw), str(out))
    assert os.listdir(out) == ["notes.txt"]
    # a dataset made by hand (no preparation record) or by another command is left alone
    (out / "notes.txt").unlink()
    (out / "dataset.json").write_text("{}")
    with pytest.raises(DatasetError, match="without the record"):
        prepare_cholecseg8k(str(raw), str(out))
    (out / "dataset.json").unlink()
    prepare_cholecseg8k(str(raw), str(out), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("frames_dir: f\nlabels_dir: l\nclasses: {1: a}\n")
    with pytest.raises(DatasetError, match="prepared by 'prepare_cholecseg8k'"):
        prepare_custom(str(config), str(out))


# ================================================================================= custom
def make_custom(root: Path, sizes=((8, 10), (8, 10), (8, 10))) -> dict:
    expected = {}
    for index, size in enumerate(sizes):
        sequence = f"case_{index + 1}"
        frame = np.full((*size, 3), 40 * index, np.uint8)
        labels = np.zeros(size, np.uint8)
        labels[: size[0] // 2, : size[1] // 2] = 1 + index % 2
        labels[-1, -1] = 250
        write_image(root / "frames" / sequence / "img_0.png", frame)
        write_image(root / "labels" / sequence / "img_0.png", labels)
        expected[sequence] = (frame, labels)
    return expected


def test_custom_config(tmp_path):
    expected = make_custom(tmp_path)
    write_image(tmp_path / "frames" / "case_2" / "img_1.png", np.zeros((8, 10, 3)))
    write_image(tmp_path / "labels" / "case_2" / "img_1.png", np.full((8, 10), 3))  # 3 is no class
    config = tmp_path / "data.yaml"
    config.write_text(
        "frames_dir: frames\nlabels_dir: labels\nclasses: {1: grasper, 2: hook}\nignore_index: 250\n"
        "validation_sequences: [case_2]\nname: lab\n"
    )
    out = tmp_path / "out"
    summary = prepare_custom(str(config), str(out), progress=False)
    for sequence, (frame, labels) in expected.items():
        np.testing.assert_array_equal(read(out / "images" / sequence / "img_0.png"), frame)
        np.testing.assert_array_equal(read(out / "labels" / sequence / "img_0.png"), labels)
    description = read_dataset_description(out)
    assert description["name"] == "lab" and description["ignore_index"] == 250
    assert description["classes"] == {"1": "grasper", "2": "hook"}
    assert summary["sequences"] == {"training": ["case_1", "case_3"], "validation": ["case_2"]}
    assert summary["ignored_pixels"] == 3 and summary["frames_per_class"] == {"grasper": 2, "hook": 1}
    assert "unexpected label values [3]" in skipped_reasons(summary)[str(tmp_path / "labels" / "case_2" / "img_1.png")]


def test_custom_sizes_fraction_and_errors(tmp_path):
    make_custom(tmp_path, sizes=((8, 10), (8, 10), (6, 10), (8, 10)))
    config = tmp_path / "data.yaml"
    config.write_text("frames_dir: frames\nlabels_dir: labels\nclasses: {1: grasper, 2: hook}\nignore_index: 250\n")
    with pytest.raises(DatasetError, match="2 sizes \\(8x10: case_1.*; 6x10: .*case_3.*resize"):
        prepare_custom(str(config), str(tmp_path / "out"))
    config.write_text(config.read_text() + "resize: [4, 5]\nvalidation_fraction: 0.5\n")
    summary = prepare_custom(str(config), str(tmp_path / "out"), progress=False)
    assert summary["frame_size"] == [4, 5]
    assert summary["sequences"] == {"training": ["case_1", "case_2"], "validation": ["case_3", "case_4"]}
    label = read(tmp_path / "out" / "labels" / "case_1" / "img_0.png")
    assert set(np.unique(label).tolist()) <= {0, 1, 250}  # nearest neighbour: no blended ids
    np.testing.assert_array_equal(label[:2, :2], np.ones((2, 2)))
    write_image(tmp_path / "frames" / "case_1" / "img_0.jpg", np.zeros((8, 10, 3)))
    with pytest.raises(DatasetError, match="same output frame\\(s\\) case_1/img_0 "):
        prepare_custom(str(config), str(tmp_path / "out"))
    for text, message in (
        ("frames_dir: f\n", "lacks labels_dir, classes"),
        ("frames_dir: f\nlabels_dir: l\nclasses: {1: a}\ncolour: red\n", "unknown key"),
        ("frames_dir: nowhere\nlabels_dir: labels\nclasses: {1: a}\n", "does not exist"),
        ("frames_dir: frames\nlabels_dir: labels\nclasses: {1: a, 3: b}\n", "1..C without gaps"),
        ("frames_dir: frames\nlabels_dir: labels\nclasses: {1: a}\nresize: 5\n", "resize must be"),
    ):
        config.write_text(text)
        with pytest.raises(DatasetError, match=message):
            prepare_custom(str(config), str(tmp_path / f"out_{len(text)}"))


# ================================================================================= CLI
def test_cli_prepare_commands(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_cholec_raw(raw)
    summary = cli.prepare_cholecseg8k(raw_dir=str(raw), out_dir=str(tmp_path / "out"), val_videos="video01")
    assert summary["sequences"]["validation"] == ["video01_00080", "video01_00160"]
    printed = capsys.readouterr().out
    assert "prepare_cholecseg8k: 6 frames (6x8)" in printed and "preparation_summary.json" in printed
    assert "unknown colour 255,255,255" in printed
    with pytest.raises(SystemExit, match="did not make"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "x.txt").write_text("x")
        cli.prepare_cholecseg8k(raw_dir=str(raw), out_dir=str(tmp_path / "mine"))
    with pytest.raises(SystemExit, match="--raw_dir .*not found"):
        cli.prepare_endovis2017(raw_dir=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no instrument_dataset_K(.|\n)*Expected layout"):
        cli.prepare_endovis2017(raw_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="--numbering must be one of"):
        cli.prepare_endovis2018(raw_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "o"), numbering="2019")
    with pytest.raises(SystemExit, match="--out_dir is required"):
        cli.prepare_endovis2018(raw_dir=str(tmp_path / "empty"), out_dir="")
    make_custom(tmp_path / "lab")
    (tmp_path / "lab" / "c.yaml").write_text(
        "frames_dir: frames\nlabels_dir: labels\nclasses: {1: a, 2: b}\nignore_index: 250\n"
    )
    summary = cli.prepare_custom(config=str(tmp_path / "lab" / "c.yaml"), out_dir=str(tmp_path / "lab_out"))
    assert summary["frames_per_split"] == {"training": 2, "validation": 1}
    with pytest.raises(SystemExit, match="--config .* does not exist"):
        cli.prepare_custom(config=str(tmp_path / "none.yaml"), out_dir=str(tmp_path / "o"))
    for name in ("prepare_endovis2017", "prepare_endovis2018", "prepare_cholecseg8k", "prepare_custom"):
        assert cli.COMMANDS[name] is getattr(cli, name)


# ---------------------------------------------------------------- preparing again over an embedding cache
def npy_stamps(cache_dir: str) -> dict[str, int]:
    return {
        os.path.relpath(p, cache_dir): os.stat(p).st_mtime_ns
        for p in glob.glob(os.path.join(cache_dir, "**", "*.npy"), recursive=True)
    }


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


# ------------------------------------------------------------------ a partial EndoVis2017 download
def make_endovis2017_raw(raw: Path, numbers) -> None:
    """instrument_dataset_K (K in ``numbers``), one 1080x1920 frame each with a shaft of one instrument."""
    for number in numbers:
        folder = raw / f"instrument_dataset_{number}"
        frame = np.zeros((1080, 1920, 3), np.uint8)
        frame[..., 2] = number * 20
        (folder / "left_frames").mkdir(parents=True)
        Image.fromarray(frame).save(folder / "left_frames" / "frame000.png", compress_level=1)
        mask = np.zeros((1080, 1920), np.uint8)
        mask[300:400, 400:600] = 10
        (folder / "ground_truth" / "Bipolar_Forceps_labels").mkdir(parents=True)
        Image.fromarray(mask).save(
            folder / "ground_truth" / "Bipolar_Forceps_labels" / "frame000.png", compress_level=1
        )


def test_partial_endovis2017_download_is_prepared_with_the_folds_it_allows(tmp_path, capsys):
    from scripts.data.layout import available_splits, read_dataset_description
    from scripts.data.prepare.endovis2017 import prepare_endovis2017

    make_endovis2017_raw(tmp_path / "raw", (1, 2, 4))
    out = tmp_path / "endovis2017"
    summary = prepare_endovis2017(str(tmp_path / "raw"), str(out), progress=False)
    description = read_dataset_description(out)
    sequences = {split: sorted({e["sequence"] for e in description[split]}) for split in available_splits(description)}
    assert sequences == {
        "fold0_training": ["seq_2", "seq_4"],
        "fold0_validation": ["seq_1"],
        "fold1_training": ["seq_1", "seq_4"],
        "fold1_validation": ["seq_2"],
        "fold2_training": ["seq_1", "seq_2"],
        "fold2_validation": ["seq_4"],
        "training": ["seq_2", "seq_4"],
        "validation": ["seq_1"],
    }
    assert set(description["incomplete_folds"]) == {"fold0", "fold1", "fold2"}
    assert "instrument_dataset_3 (validation)" in description["incomplete_folds"]["fold0"]
    assert set(description["left_out_splits"]) == {"fold3_training", "fold3_validation"}
    assert "instrument_dataset_6, instrument_dataset_7" in description["left_out_splits"]["fold3_validation"]
    assert summary["incomplete_folds"] == description["incomplete_folds"]
    printed = capsys.readouterr().out
    assert "fold3_validation not written" in printed and "fold0 is incomplete" in printed
    with pytest.raises(DatasetError, match="could not make it: none of its validation datasets"):
        load_datalist(str(out), "fold3_validation")
    # the rest of the download arrives: the same command completes the folder
    make_endovis2017_raw(tmp_path / "raw", (3, 5, 6, 7, 8))
    summary = prepare_endovis2017(str(tmp_path / "raw"), str(out), progress=False)
    description = read_dataset_description(out)
    assert summary["written"] == 5 and summary["reused"] == 3
    assert "incomplete_folds" not in description and "left_out_splits" not in description
    assert len(description["fold3_validation"]) == 2


def test_endovis2017_download_without_a_whole_fold_is_refused_before_writing(tmp_path):
    from scripts.data.prepare.endovis2017 import prepare_endovis2017

    make_endovis2017_raw(tmp_path / "raw", (1,))
    with pytest.raises(DatasetError, match="no fold can be made") as error:
        prepare_endovis2017(str(tmp_path / "raw"), str(tmp_path / "out"), progress=False)
    assert "instrument_dataset_1 only" in str(error.value)
    assert not (tmp_path / "out").exists()
