"""Fast tests of the command-line tool (scripts.cli) and the benchmark (scripts.measurement.benchmark).

The demo command trains a model and has its own slow test; it is not run here.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import use_float64_dense_pe
from PIL import Image

from scripts import BUNDLE_ROOT, cli
from scripts.embedding_cache.encoding import TILE_GRID
from scripts.measurement.benchmark import run_benchmark
from scripts.measurement.benchmark_report import format_benchmark_table


def write_png(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rows, dtype=np.uint8), mode="L").save(path)


def test_make_demo_data_writes_dataset(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    summary = cli.make_demo_data(out_dir=str(out_dir), frame_size="32,40", num_classes=3, seed=1)
    description = json.loads((out_dir / "dataset.json").read_text())
    assert description["frame_size"] == [32, 40]
    assert (
        list(description["classes"].values())
        == summary["classes"]
        == ["Bipolar Forceps", "Prograsp Forceps", "Large Needle Driver"]
    )
    assert summary["frames"] == {"training": 192, "validation": 48}  # the demo's 16 + 4 sequences of 12 frames
    assert (out_dir / "preview.png").is_file()
    printed = capsys.readouterr().out
    assert "training" in printed and "preview.png" in printed
    # a second run into the same folder needs --overwrite, and says so
    with pytest.raises(SystemExit, match="overwrite"):
        cli.make_demo_data(out_dir=str(out_dir), frame_size=(32, 40), num_classes=3)


def test_make_demo_data_refuses_a_users_frames_and_touches_nothing(tmp_path):
    """A folder of one's own frames (images/ and labels/, no dataset.json) is not the demo's: even --overwrite
    leaves it as it is (the names match the demo's, but the demo did not write them)."""
    users = tmp_path / "my_frames"
    write_png(users / "images" / "case_1" / "0001.png", [[1, 2], [3, 4]])
    write_png(users / "labels" / "case_1" / "0001.png", [[0, 1], [1, 0]])
    before = sorted(str(p.relative_to(users)) for p in users.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(SystemExit, match="did not make") as error:
            cli.make_demo_data(out_dir=str(users), frame_size=(32, 40), num_classes=3, overwrite=overwrite)
        assert "prepare_custom" in str(error.value)
    assert sorted(str(p.relative_to(users)) for p in users.rglob("*")) == before


def test_missing_dataset_hints_name_a_command_that_is_safe_on_the_users_folder(tmp_path):
    """The hint for a folder without dataset.json points to prepare_custom (which never writes over a user's
    files), not to make_demo_data on that folder."""
    from scripts.data.layout import DatasetError, dataset_fact, read_dataset_description
    from scripts.engine.checks import check_training_inputs

    users = tmp_path / "my_frames"
    write_png(users / "images" / "case_1" / "0001.png", [[1, 2], [3, 4]])
    messages = []
    for call in (
        lambda: check_training_inputs(str(users), "tiny", None, str(tmp_path / "cache")),
        lambda: dataset_fact(str(users), "class_names"),
        lambda: read_dataset_description(users),
        lambda: read_dataset_description(tmp_path / "nowhere"),
    ):
        with pytest.raises((FileNotFoundError, DatasetError)) as error:
            call()
        messages.append(str(error.value))
    for message in messages:
        assert "make_demo_data" not in message and "prepare_custom" in message, message


def test_score_crafted_case(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    # frame a: class 1 I=2, U=6 -> 1/3; class 2 exact (1.0): Challenge IoU (1/3 + 1) / 2
    write_png(gt / "seq_1" / "a.png", [[1, 1, 0, 0], [1, 1, 2, 2]])
    write_png(pred / "seq_1" / "a.png", [[1, 1, 1, 1], [0, 0, 2, 2]])
    # frame b: no instrument in the GT, the prediction has class 1: IoU entry 0 (auto), no Challenge entry
    write_png(gt / "seq_1" / "b.png", [[0, 0, 0, 0], [0, 0, 0, 0]])
    write_png(pred / "seq_1" / "b.png", [[0, 1, 0, 0], [0, 0, 0, 0]])
    output = tmp_path / "out" / "metrics.json"

    result = cli.score(
        pred_dir=str(pred),
        gt_dir=str(gt),
        class_names="bipolar,prograsp,needle",
        protocol="auto",
        output_file=str(output),
    )
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
    (dataset / "dataset.json").write_text(
        json.dumps(
            {
                "classes": {"1": "bipolar", "2": "prograsp", "3": "needle"},
                "ignore_index": 255,
                "training": [{"image": "images/x.png", "label": "labels/x.png"}],
            }
        )
    )
    oracle = cli.score(
        pred_dir=str(pred), gt_dir=str(gt), dataset_dir=str(dataset), protocol="oracle", output_file=None
    )
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


def test_make_sam_checkpoint_overwrite_keeps_the_old_file_beside_it(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"my own weights")
    cli.make_sam_checkpoint(path=str(path), variant="tiny", overwrite=True)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("weights.kept-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"my own weights" and kept[0].suffix == ".pth"
    assert path.stat().st_size > 1000 and str(kept[0]) in capsys.readouterr().out


def test_run_benchmark_tiny():
    result = run_benchmark(
        batch_size=2,
        num_classes=3,
        num_tokens=2,
        frame_size=(64, 80),
        steps=1,
        encoder_frames=1,
        inference_frames=1,
        device="cpu",
        sam_variant="tiny",
        encoder_memory_variant="tiny",
        encoder_memory_frames=1,
        encoder_rounds=1,
    )
    assert result["settings"]["embedding_shape"] == [256, 16, 16]
    for key in (
        "train_samples_per_s",
        "train_samples_per_s_original",
        "train_samples_per_s_original_equal_terms",
        "train_speedup",
        "train_speedup_equal_terms",
        "infer_masks_per_s",
        "infer_masks_per_s_original",
        "infer_masks_per_s_original_equal_terms",
        "infer_speedup",
        "infer_speedup_equal_terms",
        "train_speedup_mallopt",
        "train_speedup_never_trim",
        "infer_speedup_mallopt",
        "infer_speedup_never_trim",
        "train_peak_rss_gib",
        "train_peak_rss_gib_never_trim",
        "encoder_frames_per_s",
        "encoder_speedup_fp32",
        "encoder_speedup_bf16",
        "encoder_peak_rss_gib",
    ):
        assert result[key] > 0, key
    # the fast encoder computes segment-anything's; bf16 moves the decoder's logits by a measured amount
    assert result["encoder_max_rel_diff_fp32"] < 1e-4
    assert result["encoder_bf16_decoder_logits_max_abs_diff"] >= 0
    # each path on equal terms under the allocator that is best for it, and both settings' figures kept
    best = result["equal_terms_allocator"]["train"]
    assert set(best.values()) <= {"mallopt", "never_trim"}
    assert result["train_speedup_equal_terms"] == pytest.approx(
        max(result["train_samples_per_s"], result["paths"]["bundle_never_trim"]["train"]["samples_per_s"])
        / max(
            result["paths"]["original_equal_terms"]["train"]["samples_per_s"],
            result["paths"]["original_never_trim"]["train"]["samples_per_s"],
        )
    )
    for name in ("bundle_never_trim", "original_never_trim"):  # glibc's variables, and no mallopt over them
        assert result["paths"][name]["allocator_environment"] == {
            "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1),
        }
        assert "mallopt" not in str(result["paths"][name]["process_settings"]["allocator"])
    # the cache entry measure is reported, or why not
    assert "cache_entry_bytes" in result or "cache_entry_error" in result
    assert result["device"] == "cpu" and result["threads"] >= 1 and result["torch_version"] == torch.__version__
    # each path in its own process: the original out of the box without the bundle's settings, the others with
    paths = result["paths"]
    assert "not called" in paths["original_out_of_the_box"]["process_settings"]["allocator"]
    assert paths["original_equal_terms"]["process_settings"] == paths["bundle"]["process_settings"]
    assert result["process_settings"] == paths["bundle"]["process_settings"]
    # OpenMP's wait policy reaches the workers through their environment, before their torch loads
    assert paths["original_out_of_the_box"]["process_settings"]["openmp"]["OMP_WAIT_POLICY"]["value"] is None
    assert paths["bundle"]["process_settings"]["openmp"]["OMP_WAIT_POLICY"] == {
        "value": os.environ["OMP_WAIT_POLICY"],
        "set_by": "environment",
        "in_force_here": True,
    }
    # same weights and data: the bundle's path and the copy of the original's give the same loss and step
    assert result["train_loss_abs_diff"] < 1e-5
    assert result["data_batch_read_s"] > 0 and result["data_batch_read_share_of_step"] > 0
    assert result["train_param_max_abs_diff"] < 1e-3  # Adam's first step is lr * g / (|g| + eps): see the card
    # the same operations in a process with the default allocator: buffers land at other addresses, and the
    # vectorised reductions may then sum in another order (seen on CI: 9e-5 after Adam's sign-like first step)
    assert result["train_loss_abs_diff_out_of_the_box"] < 1e-5
    assert result["train_param_max_abs_diff_out_of_the_box"] < 1e-3
    assert paths["bundle"]["inference_cached"]["label_map_shape"] == [1, 1, 64, 80]
    assert paths["original_equal_terms"]["inference_cached"]["label_map_shape"] == [1, 64, 80]
    assert result["train_loss_abs_diff"] < 1e-5 and paths["original_never_trim"]["param_max_abs_diff"] < 1e-3
    assert result["cache"]["embedding_npy_bytes"] == 256 * 16 * 16 * 2 + 128
    assert result["cache"]["label_png_bytes"] > 0
    distill = result["distill"]
    assert distill["sam_variant"] == "tiny" and distill["taps"] == [1, 2] and distill["frame_size"] == [64, 80]
    assert distill["raw_frames"]["samples_per_s"] > 0 and distill["tap_cache"]["samples_per_s"] > 0
    # the 8-bit embedding (codes, a float32 scale and offset per channel and tile) and the float16 taps
    tiles = TILE_GRID[0] * TILE_GRID[1]
    assert distill["cache"]["array_bytes_per_entry"] == 256 * 16 * 16 + 256 * tiles * 2 * 4 + 2 * 16 * 16 * 96 * 2
    headers = distill["cache"]["npy_bytes_per_entry"] - distill["cache"]["array_bytes_per_entry"]
    assert 2 * 128 <= headers <= 2 * 512, headers  # two .npy headers (a structured record's is longer)
    table = format_benchmark_table(result)
    assert "speed-up over the original on equal terms" in table and "label PNG" in table and "tap cache" in table


@pytest.mark.parametrize(("batch", "micro_batch_size"), [(1, None), (5, None), (5, 2)])
def test_bundle_training_step_equals_the_original_operations(batch, micro_batch_size):
    """The bundle's step (fast prompt encoder, batched decoder, weighted loss) and the benchmark's copy of
    the original's (stacked features, per-sample decoder calls, its Dice and NTXent): the same loss, the
    same gradients and, after one Adam step, the same parameters (float64, so rounding does not hide a
    difference behind Adam's division by |g| + eps)."""
    from scripts.measurement import benchmark_workers as bm
    from scripts.surgical_sam.loss import SurgicalSAMLoss, class_embeddings_from_masks

    cfg = dict(
        batch_size=batch,
        num_classes=3,
        num_tokens=2,
        frame_size=[48, 72],
        inference_frames=1,
        sam_variant="tiny",
        seed=0,
    )
    runs = []
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the network, the data and the optimizer in float64
    try:
        for path in ("original", "bundle"):
            runs.append(_one_step(bm, cfg, path, SurgicalSAMLoss, class_embeddings_from_masks, micro_batch_size))
    finally:
        torch.set_default_dtype(default_dtype)
    (loss0, grads0, params0), (loss1, grads1, params1) = runs
    assert params0["mask_decoder.iou_token.weight"].dtype == torch.float64
    assert abs(loss0 - loss1) <= 1e-5 * abs(loss0)
    assert set(grads0) == set(grads1)
    for name in grads0:
        scale = max(float(grads0[name].abs().max()), 1e-12)
        assert float((grads0[name] - grads1[name]).abs().max()) / scale <= 1e-4, name
    assert max(float((params0[k] - params1[k]).abs().max()) for k in params0) <= 1e-5


def _one_step(bm, cfg, path, loss_cls, class_embeddings_from_masks, micro_batch_size=None):
    """One training step of ``path`` (original / bundle) from the benchmark's weights and data."""
    from scripts.measurement.original_operations import original_batch, original_training_step

    model, embeddings, targets, _ = bm.model_and_data(cfg, torch.device("cpu"))
    model.train()
    use_float64_dense_pe(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    if path == "original":
        class_embeddings, _ = class_embeddings_from_masks(embeddings, targets["grid_mask"])
        channels_last, masks = original_batch(embeddings, targets["mask"])  # as the original's loader hands them
        loss = original_training_step(model, optimizer, channels_last, masks, targets["class_id"], class_embeddings)
    else:
        loss = float(
            bm.bundle_training_step(
                model, optimizer, loss_cls(), embeddings, targets, micro_batch_size=micro_batch_size
            )
        )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "command", ["prepare_endovis2017", "prepare_endovis2018", "prepare_cholecseg8k", "prepare_custom"]
)
def test_prepare_help_shows_the_raw_layout(command):
    import importlib
    import subprocess
    import sys

    module = importlib.import_module(f"scripts.data.prepare.{command.split('_', 1)[1]}")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": BUNDLE_ROOT, "PAGER": "cat"},
    )
    shown = result.stdout + result.stderr
    for line in module.EXPECTED_LAYOUT.splitlines():
        assert line.strip() in shown, (line, shown[:2000])
    if command == "prepare_custom":
        assert "classes: {1: Grasper, 2: Hook}" in shown
