"""Fast tests of the command-line tool (scripts.cli) and the benchmark (scripts.benchmark).

The demo command trains a model and has its own slow test; it is not run here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import cli
from scripts.benchmark import format_benchmark_table, run_benchmark


def write_png(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rows, dtype=np.uint8), mode="L").save(path)


def test_make_demo_data_writes_dataset(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    summary = cli.make_demo_data(out_dir=str(out_dir), frame_size="32,40", num_classes=3, seed=1)
    description = json.loads((out_dir / "dataset.json").read_text())
    assert description["frame_size"] == [32, 40]
    assert list(description["classes"].values()) == summary["classes"] == [
        "Bipolar Forceps", "Prograsp Forceps", "Large Needle Driver"
    ]
    assert summary["frames"] == {"training": 96, "validation": 48}
    assert (out_dir / "preview.png").is_file()
    printed = capsys.readouterr().out
    assert "training" in printed and "preview.png" in printed
    # a second run into the same folder needs --overwrite, and says so
    with pytest.raises(SystemExit, match="overwrite"):
        cli.make_demo_data(out_dir=str(out_dir), frame_size=(32, 40), num_classes=3)


def test_score_crafted_case(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    # frame a: class 1 I=2, U=6 -> 1/3; class 2 exact (1.0): Challenge IoU (1/3 + 1) / 2
    write_png(gt / "seq_1" / "a.png", [[1, 1, 0, 0], [1, 1, 2, 2]])
    write_png(pred / "seq_1" / "a.png", [[1, 1, 1, 1], [0, 0, 2, 2]])
    # frame b: no instrument in the GT, the prediction has class 1: IoU entry 0 (auto), no Challenge entry
    write_png(gt / "seq_1" / "b.png", [[0, 0, 0, 0], [0, 0, 0, 0]])
    write_png(pred / "seq_1" / "b.png", [[0, 1, 0, 0], [0, 0, 0, 0]])
    output = tmp_path / "out" / "metrics.json"

    result = cli.score(pred_dir=str(pred), gt_dir=str(gt), class_names="bipolar,prograsp,needle",
                       protocol="auto", output_file=str(output))
    written = json.loads(output.read_text())
    assert written["protocol"] == "auto"
    assert written["challenge_iou"] == pytest.approx(100 * 2 / 3)
    assert written["iou"] == pytest.approx(100 * (2 / 3 + 0.0) / 2)
    assert written["class_iou"]["bipolar"] == pytest.approx(100 * (1 / 3 + 0.0) / 2)
    assert written["class_iou"]["prograsp"] == pytest.approx(100.0)
    assert written["class_iou"]["needle"] is None or math.isnan(written["class_iou"]["needle"])
    assert written["miou"] == pytest.approx(100 * (2 + 2 + 0) / (6 + 2 + 1))
    assert result["challenge_iou"] == pytest.approx(100 * 2 / 3)
    assert "metrics written to" in capsys.readouterr().out

    # oracle: frame b has no entry, so IoU equals Challenge IoU; names read from a dataset.json
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({
        "classes": {"1": "bipolar", "2": "prograsp", "3": "needle"}, "ignore_index": 255,
        "training": [{"image": "images/x.png", "label": "labels/x.png"}],
    }))
    oracle = cli.score(pred_dir=str(pred), gt_dir=str(gt), dataset_dir=str(dataset), protocol="oracle",
                       output_file=None)
    assert oracle["iou"] == pytest.approx(100 * 2 / 3) and oracle["challenge_iou"] == pytest.approx(100 * 2 / 3)


def test_score_user_errors(tmp_path):
    gt = tmp_path / "gt"
    write_png(gt / "a.png", [[0, 1]])
    with pytest.raises(SystemExit, match="pred_dir .*not found"):
        cli.score(pred_dir=str(tmp_path / "nope"), gt_dir=str(gt), class_names="a")
    with pytest.raises(SystemExit, match="class names are needed"):
        cli.score(pred_dir=str(gt), gt_dir=str(gt))
    with pytest.raises(SystemExit, match="protocol"):
        cli.score(pred_dir=str(gt), gt_dir=str(gt), class_names="a", protocol="both")


def test_main_runs_a_command(tmp_path, capsys):
    path = tmp_path / "sam_tiny.pth"
    cli.main(["make_sam_checkpoint", "--variant", "tiny", "--path", str(path)])
    assert path.is_file()
    assert "tests and the demo only" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="overwrite"):
        cli.main(["make_sam_checkpoint", "--path", str(path)])
    with pytest.raises(SystemExit, match="official"):
        cli.make_sam_checkpoint(path=str(tmp_path / "sam_vit_b_01ec64.pth"), variant="vit_b")


def test_run_benchmark_tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids thread contention on a busy machine
    try:
        result = run_benchmark(batch_size=2, num_classes=3, num_tokens=2, frame_size=(64, 80), steps=1,
                               encoder_frames=1, inference_frames=1, device="cpu", sam_variant="tiny")
    finally:
        torch.set_num_threads(threads)
    assert result["settings"]["embedding_shape"] == [256, 16, 16]
    for path in ("batched", "loop"):
        assert result["train"][path]["samples_per_s"] > 0
    assert result["train"]["speedup"] > 0
    # same weights and data: the batched call and the original's loop give the same loss
    assert result["train"]["warmup_loss_difference"] < 1e-4
    assert result["inference_cached"]["frames_per_s"] > 0
    assert result["inference_cached"]["logits_shape"] == [1, 3, 64, 80]
    assert result["inference_encoder"]["frames_per_s"] > 0
    assert all(v > 0 for v in result["memory"]["peak_rss_mb"].values())
    assert result["cache"]["embedding_npy_bytes"] == 256 * 16 * 16 * 2 + 128
    assert result["cache"]["label_png_bytes"] > 0
    distill = result["distill"]
    assert distill["sam_variant"] == "tiny" and distill["taps"] == [1, 2] and distill["frame_size"] == [64, 80]
    assert distill["raw_frames"]["samples_per_s"] > 0 and distill["tap_cache"]["samples_per_s"] > 0
    assert distill["cache"]["array_bytes_per_entry"] == 256 * 16 * 16 * 2 + 2 * 16 * 16 * 96 * 2
    assert distill["cache"]["npy_bytes_per_entry"] == distill["cache"]["array_bytes_per_entry"] + 2 * 128
    table = format_benchmark_table(result)
    assert "speed-up" in table and "label PNG" in table and "tap cache" in table
