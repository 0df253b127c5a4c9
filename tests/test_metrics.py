"""Tests of scripts.evaluation.metrics against the EndoVis/ISINet protocol, on tiny hand-made frames."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from scripts.evaluation.label_map import merge_class_masks
from scripts.evaluation.metrics import EndoVisMetric, endovis_metrics, frame_statistics, score_label_map_folders
from scripts.evaluation.report import format_metric, format_metrics_table

NUM_CLASSES = 4
CLASS_NAMES = ["bipolar", "prograsp", "needle", "never_seen"]


def label_map(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# Four 2x3 frames (prediction, ground truth), C = 4; class 4 never appears.
# A: empty prediction, GT has classes 1 and 2          -> IoU 0, Ch 0, cls1 += 0, cls2 += 0
# B: prediction of class 3 on an instrument-free frame -> IoU 0 (I=0, U=2), no Ch, cls3 += 0
# C: class 1 half right + a false-positive class 2     -> im = [1/2, 0], ch = [1/2]
# D: class 2 with I = 2, U = 3                          -> im = ch = [2/3]
FRAMES = {
    "A": (label_map([[0, 0, 0], [0, 0, 0]]), label_map([[1, 1, 0], [2, 0, 0]])),
    "B": (label_map([[3, 3, 0], [0, 0, 0]]), label_map([[0, 0, 0], [0, 0, 0]])),
    "C": (label_map([[1, 0, 0], [2, 2, 0]]), label_map([[1, 1, 0], [0, 0, 0]])),
    "D": (label_map([[2, 2, 0], [0, 0, 0]]), label_map([[2, 2, 2], [0, 0, 0]])),
}
ORACLE_ENTRIES = [True, False, True, True]  # B has no GT instrument: no prompt, no entry


def expected_auto() -> dict:
    class_iou = {
        "bipolar": 100 * (0 + 0.5) / 2,  # A, C
        "prograsp": 100 * (0 + 0 + 2 / 3) / 3,  # A, C (false positive), D
        "needle": 0.0,  # B (false positive on an instrument-free frame)
        "never_seen": None,
    }
    return {
        "iou": 100 * (0 + 0 + 0.25 + 2 / 3) / 4,
        "challenge_iou": 100 * (0 + 0.5 + 2 / 3) / 3,  # B is not in the Challenge list
        "class_iou": class_iou,
        "mc_iou": (class_iou["bipolar"] + class_iou["prograsp"] + 0.0) / 3,  # class 4 has no entry
        "miou": 100 * (0 + 1 + 2) / (2 + 4 + 3),  # cumulative I / U over B, C, D
        "num_frames": 4,
    }


def expected_oracle() -> dict:
    class_iou = {"bipolar": 25.0, "prograsp": 100 * (2 / 3) / 3, "needle": None, "never_seen": None}
    return {
        "iou": 100 * (0 + 0.25 + 2 / 3) / 3,
        "challenge_iou": 100 * (0 + 0.5 + 2 / 3) / 3,
        "class_iou": class_iou,
        "mc_iou": (class_iou["bipolar"] + class_iou["prograsp"]) / 2,
        "miou": 100 * 3 / 7,
        "num_frames": 3,
    }


def assert_metrics_equal(result: dict, expected: dict) -> None:
    assert set(expected) <= set(result)
    for key in ("iou", "challenge_iou", "mc_iou", "miou"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12), key
    assert result["num_frames"] == expected["num_frames"]
    assert result["class_iou"].keys() == expected["class_iou"].keys()
    for name, value in expected["class_iou"].items():
        if value is None:
            assert result["class_iou"][name] is None, name
        else:
            assert result["class_iou"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def all_frame_statistics() -> list[torch.Tensor]:
    return [frame_statistics(pred, gt, NUM_CLASSES) for pred, gt in FRAMES.values()]


# --------------------------------------------------------------------------- merge


def test_merge_resolves_overlaps_by_quality():
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)
    masks[0, :, :2] = True  # class 1, low quality
    masks[1, :, 1:] = True  # class 2, high quality: wins column 1
    masks[2, 0, 0] = True  # class 3, middle quality: beats class 1 at (0, 0)
    merged = merge_class_masks(masks, torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.9, 0.5]))
    assert merged.dtype == torch.long
    assert merged.tolist() == [[3, 2, 2], [1, 2, 2]]


def test_merge_ties_are_stable_and_empty_input_gives_zeros():
    masks = torch.ones(2, 2, 2, dtype=torch.bool)
    # Equal quality: the stable sort keeps the input order, so the later mask is written last.
    assert merge_class_masks(masks, torch.tensor([4, 2]), torch.tensor([0.5, 0.5])).unique().tolist() == [2]
    empty = merge_class_masks(torch.zeros(0, 3, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (3, 5) and not empty.any()


# --------------------------------------------------------------------------- per frame statistics


def test_frame_statistics_columns():
    pred, gt = FRAMES["C"]
    stats = frame_statistics(pred, gt, NUM_CLASSES)
    assert stats.shape == (NUM_CLASSES, 4) and stats.dtype == torch.float64
    assert stats.tolist() == [[1, 2, 1, 1], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_frame_statistics_excludes_ignored_pixels():
    gt = label_map([[1, 255], [255, 0]])
    pred = label_map([[1, 1], [2, 0]])  # class 1 and 2 spill only onto ignored pixels
    stats = frame_statistics(pred, gt, NUM_CLASSES, ignore_index=255)
    assert stats[0].tolist() == [1, 1, 1, 1]
    assert stats[1].tolist() == [0, 0, 0, 0]
    assert endovis_metrics([stats], CLASS_NAMES)["iou"] == pytest.approx(100.0)
    # A prediction lying only on ignored pixels is no instrument pixel at all.
    only_ignored = frame_statistics(label_map([[0, 3], [0, 0]]), label_map([[2, 255], [0, 0]]), NUM_CLASSES)
    result = endovis_metrics([only_ignored], CLASS_NAMES)
    assert result["iou"] == 0.0 and result["challenge_iou"] == 0.0 and result["miou"] != result["miou"]  # nan


def test_frame_statistics_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="ground truth"):
        frame_statistics(label_map([[0]]), label_map([[NUM_CLASSES + 1]]), NUM_CLASSES)
    with pytest.raises(ValueError, match="prediction"):
        frame_statistics(label_map([[7]]), label_map([[0]]), NUM_CLASSES)
    with pytest.raises(ValueError):
        frame_statistics(label_map([[0, 0]]), label_map([[0]]), NUM_CLASSES)


# --------------------------------------------------------------------------- protocol


def test_endovis_metrics_auto_protocol_hand_computed():
    assert_metrics_equal(endovis_metrics(all_frame_statistics(), CLASS_NAMES), expected_auto())


def test_endovis_metrics_oracle_protocol_skips_frames_without_entry():
    stats = torch.stack(all_frame_statistics())
    result = endovis_metrics(stats, CLASS_NAMES, torch.tensor(ORACLE_ENTRIES))
    assert_metrics_equal(result, expected_oracle())


def test_false_positive_class_lowers_iou_but_not_challenge_iou():
    result = endovis_metrics([frame_statistics(*FRAMES["C"], NUM_CLASSES)], CLASS_NAMES)
    assert result["iou"] == pytest.approx(25.0)
    assert result["challenge_iou"] == pytest.approx(50.0)
    assert result["class_iou"]["prograsp"] == 0.0


def test_empty_prediction_on_empty_frame_contributes_nothing_and_empty_lists_are_nan():
    empty = frame_statistics(label_map([[0, 0]]), label_map([[0, 0]]), NUM_CLASSES)
    result = endovis_metrics([empty], CLASS_NAMES)
    assert result["num_frames"] == 1
    for key in ("iou", "challenge_iou", "mc_iou", "miou"):
        assert math.isnan(result[key])
    assert all(value is None for value in result["class_iou"].values())
    nothing = endovis_metrics([], CLASS_NAMES)
    assert nothing["num_frames"] == 0 and math.isnan(nothing["challenge_iou"])


# --------------------------------------------------------------------------- ignite metric


def batches() -> list[tuple]:
    """Frames A, B in a (B, 1, H, W) batch with every entry, then C, D with has_entry given."""
    preds, gts = zip(*FRAMES.values())
    return [
        (torch.stack(preds[:2])[:, None], torch.stack(gts[:2])[:, None], None),
        (torch.stack(preds[2:]), torch.stack(gts[2:]), torch.tensor([True, True])),
    ]


def test_ignite_metric_matches_function_and_sets_key_metric():
    engine = Engine(lambda engine, batch: batch)
    metric = EndoVisMetric(NUM_CLASSES, CLASS_NAMES)
    metric.attach(engine, "challenge_iou")
    state = engine.run(batches(), max_epochs=1)
    expected = endovis_metrics(all_frame_statistics(), CLASS_NAMES)
    assert isinstance(state.metrics["challenge_iou"], float)
    assert state.metrics["challenge_iou"] == pytest.approx(expected["challenge_iou"])
    for key, value in expected.items():
        assert state.metrics[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert_metrics_equal(metric.compute(), expected_auto())


def test_ignite_metric_oracle_entries_and_other_name():
    engine = Engine(lambda engine, batch: batch)
    EndoVisMetric(NUM_CLASSES, output_transform=lambda output: (output[0], output[1], output[2])).attach(
        engine, "endovis"
    )
    preds, gts = zip(*FRAMES.values())
    data = [(torch.stack(preds), torch.stack(gts), torch.tensor(ORACLE_ENTRIES))]
    state = engine.run(data, max_epochs=1)
    assert isinstance(state.metrics["endovis"], dict)
    assert state.metrics["iou"] == pytest.approx(expected_oracle()["iou"])
    assert list(state.metrics["class_iou"]) == [f"class_{i}" for i in range(1, NUM_CLASSES + 1)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(local_rank: int, output_file: str) -> None:
    import ignite.distributed as idist

    preds, gts = zip(*FRAMES.values())
    metric = EndoVisMetric(NUM_CLASSES, CLASS_NAMES)
    # Uneven shards: rank 0 gets three frames, rank 1 one.
    shard = slice(0, 3) if idist.get_rank() == 0 else slice(3, 4)
    metric.update((torch.stack(preds[shard]), torch.stack(gts[shard]), None))
    result = metric.compute()
    if idist.get_rank() == 0:
        with open(output_file, "w") as handle:
            json.dump(result, handle)


def test_ignite_metric_gathers_across_processes(tmp_path):
    import ignite.distributed as idist

    output_file = tmp_path / "result.json"
    with idist.Parallel(
        backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=_free_port()
    ) as parallel:
        parallel.run(_distributed_worker, str(output_file))
    assert_metrics_equal(json.loads(output_file.read_text()), expected_auto())


# --------------------------------------------------------------------------- folders


def save_png(path, array, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if mode == "P":
        image = Image.fromarray(array.astype(np.uint8)).convert("P")  # L -> P keeps the values as indices
        image.putpalette([value for index in range(256) for value in (index, index * 37 % 256, 255 - index)])
    elif mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16))
    else:
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    image.save(path)


def write_folders(tmp_path, missing: str | None = None):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    modes = {"A": "L", "B": "P", "C": "I;16", "D": "L"}
    for name, (pred, gt) in FRAMES.items():
        relative = f"seq_1/{name}.png" if name in "AB" else f"seq_2/{name}.png"
        save_png(gt_dir / relative, gt.numpy(), modes[name])
        if name != missing:
            save_png(pred_dir / relative, pred.numpy(), modes[name])
    return pred_dir, gt_dir


@pytest.mark.parametrize("protocol", ["auto", "oracle"])
def test_score_label_map_folders(tmp_path, protocol):
    pred_dir, gt_dir = write_folders(tmp_path)
    output_file = tmp_path / "out" / "scores.json"
    result = score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES, protocol=protocol, output_file=output_file)
    expected = expected_auto() if protocol == "auto" else expected_oracle()
    assert_metrics_equal(result, expected)
    assert result["missing_predictions"] == []
    written = json.loads(output_file.read_text())
    assert written["protocol"] == protocol and written["class_names"] == CLASS_NAMES
    assert written["challenge_iou"] == pytest.approx(expected["challenge_iou"])
    assert written["class_iou"]["never_seen"] is None


def test_score_label_map_folders_missing_prediction_is_empty(tmp_path):
    # Frame A already has an empty prediction: removing its file must not change anything.
    pred_dir, gt_dir = write_folders(tmp_path, missing="A")
    result = score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES)
    assert result["missing_predictions"] == ["seq_1/A.png"]
    assert_metrics_equal(result, expected_auto())


def test_score_label_map_folders_errors(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path)
    with pytest.raises(ValueError, match="protocol"):
        score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES, protocol="bogus")

    save_png(pred_dir / "seq_3" / "extra.png", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="seq_3/extra.png"):
        score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES)
    (pred_dir / "seq_3" / "extra.png").unlink()

    save_png(pred_dir / "seq_2" / "D.png", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="D.png"):
        score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES)
    save_png(pred_dir / "seq_2" / "D.png", FRAMES["D"][0].numpy())

    save_png(gt_dir / "seq_2" / "C.png", np.array([[1, 9, 255], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"C\.png.*\[9\]"):
        score_label_map_folders(pred_dir, gt_dir, CLASS_NAMES)


# ------------------------------------------------------------------------------------------ report tables
def test_format_metrics_table_nan_and_none():
    table = format_metrics_table(
        {
            "protocol": "oracle",
            "challenge_iou": 12.345,
            "iou": float("nan"),
            "mc_iou": None,
            "class_iou": {"Bipolar Forceps": float("nan"), "Clip Applier": 7.0},
            "num_frames": 3,
        }
    )
    lines = table.splitlines()
    assert lines[0].startswith("protocol: oracle") and "frames: 3" in lines[0]
    assert "12.35" in table
    assert [line for line in lines if "iou" in line and "n/a" in line and "challenge" not in line]
    assert any("Bipolar Forceps" in line and "n/a" in line for line in lines)
    assert any("Clip Applier" in line and "7.00" in line for line in lines)
    assert "nan" not in table.lower().replace("n/a", "")
    assert format_metrics_table({})  # no metrics at all: still a table


def test_format_metric_is_one_rule_for_tables_and_summaries():
    assert (
        format_metric(12.345) == " 12.35"
        and format_metric(None) == "   n/a"
        and format_metric(float("nan")) == "   n/a"
    )
    assert format_metric(12.345, 0, 1) == "12.3" and format_metric(None, 0, 1) == "n/a"  # the demo's summary line
