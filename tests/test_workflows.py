"""Tests of the bundle's workflows (MONAI bundle conventions): ConfigWorkflow properties, input checks from the command
line, and (slow) demo training, evaluation and kill-and-resume end to end."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml
from conftest import META_FILE, SMALL_CACHE_VERSIONS, SMALL_DEMO, bundle_copy_ignore, checked_workflow
from monai.bundle import ConfigWorkflow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundle", "configs")
TRAIN, DEMO, EVALUATE = (os.path.join(CONFIGS, f"{name}.yaml") for name in ("train", "demo", "evaluate"))
INFERENCE, DEMO_INFERENCE = os.path.join(CONFIGS, "inference.yaml"), os.path.join(CONFIGS, "demo_inference.yaml")

pytestmark = pytest.mark.usefixtures("restore_root_logging")  # ConfigWorkflow reconfigures the root logger


def demo_overrides(dataset_dir, cache_dir, sam_checkpoint, out_dir, **extra) -> dict:
    return {
        "dataset_dir": str(dataset_dir),
        "cache_dir": str(cache_dir),
        "sam_checkpoint": str(sam_checkpoint),
        "output_dir": os.path.join(str(out_dir), "eval"),
        "ckpt_dir": os.path.join(str(out_dir), "models"),
        "frame_size": list(SMALL_DEMO["frame_size"]),
        "augmentation_versions": SMALL_CACHE_VERSIONS,
        "demo_data": {k: SMALL_DEMO[k] for k in ("train_sequences", "val_sequences", "frames_per_sequence")},
        **extra,
    }


@pytest.fixture
def prepared(tmp_path, small_demo_dir, small_cache_dir, small_sam_checkpoint):
    """A private copy of the shared cache (the demo's initialize re-checks and may rewrite its index)."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache_dir, cache_dir)
    return {"dataset_dir": small_demo_dir, "cache_dir": cache_dir, "sam_checkpoint": small_sam_checkpoint,
            "out_dir": tmp_path / "run"}


# -------------------------------------------------------------------------------------- properties
def test_train_workflow_properties(prepared):
    workflow = checked_workflow([TRAIN, DEMO], "train", **demo_overrides(**prepared))
    with open(DEMO) as handle:
        assert workflow.max_epochs == yaml.safe_load(handle)["num_epochs"]
    assert len(workflow.train_dataset) > 0
    assert workflow.dataset_dir == str(prepared["dataset_dir"])
    trainer = workflow.trainer
    assert trainer.state.max_epochs == workflow.max_epochs
    # the demo's initialize left the prepared cache complete and usable
    with open(os.path.join(prepared["cache_dir"], "manifest.json")) as handle:
        assert json.load(handle)["complete"] is True


@pytest.mark.skipif(not os.path.isfile(INFERENCE), reason="bundle/configs/inference.yaml does not exist")
def test_infer_workflow_properties(tmp_path, small_demo_dir, small_sam_checkpoint):
    config_files = [INFERENCE] + ([DEMO_INFERENCE] if os.path.isfile(DEMO_INFERENCE) else [])
    workflow = checked_workflow(
        config_files, "infer",
        dataset_dir=os.path.join(small_demo_dir, "images"), sam_variant="tiny", sam_checkpoint=small_sam_checkpoint,
        output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"), frame_size=list(SMALL_DEMO["frame_size"]),
    )
    assert len(workflow.dataset) == 12  # every frame of the small demo


# ------------------------------------------------------------------------------- command line, no data
def test_cli_training_without_inputs_fails_at_once(tmp_path):
    dataset_dir = str(tmp_path / "empty")
    os.makedirs(dataset_dir)
    checkpoint = str(tmp_path / "missing" / "sam_vit_h_4b8939.pth")
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN,
               "--dataset_dir", dataset_dir, "--sam_checkpoint", checkpoint]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"
    assert "cannot train" in output
    assert dataset_dir in output and "surgical-sam make_demo_data" in output
    assert checkpoint in output and "sam_vit_h_4b8939.pth" in output


def test_copied_bundle_runs_from_its_own_folder(tmp_path):
    """The bundle folder alone (no repo around it) resolves its own scripts and bundle_root."""
    copy = tmp_path / "bundle_copy"
    shutil.copytree(os.path.join(REPO_ROOT, "bundle"), copy,
                    ignore=bundle_copy_ignore(os.path.join(REPO_ROOT, "bundle")))
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
               "--dataset_dir", str(tmp_path / "no_data")]
    result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot train" in output
    # the default SAM checkpoint path comes from the copy's own bundle_root
    assert str(copy / "models" / "sam_vit_h_4b8939.pth") in output, output[-3000:]


# ------------------------------------------------------------------------------------ slow: end to end
def training_state_files(output_dir, complete_only: bool = False) -> list[str]:
    paths = glob.glob(os.path.join(output_dir, "training_state", "checkpoint_epoch=*.pt"))
    if complete_only:  # torch.save writes a zip; a file still being written has no zip directory yet
        paths = [p for p in paths if zipfile.is_zipfile(p)]
    return sorted(os.path.basename(p) for p in paths)


@pytest.mark.slow
def test_demo_training_then_evaluation(tmp_path, small_sam_checkpoint):
    # Everything from the demo's own initialize: data, (existing) SAM checkpoint, cache.
    overrides = demo_overrides(tmp_path / "data", tmp_path / "cache", small_sam_checkpoint, tmp_path / "run",
                               num_epochs=2, batch_size=8)
    train = ConfigWorkflow(config_file=[TRAIN, DEMO], workflow_type="train", meta_file=META_FILE,
                           logging_file=None, **overrides)
    train.initialize()
    assert os.path.isfile(tmp_path / "data" / "dataset.json")
    assert os.path.isfile(tmp_path / "cache" / "manifest.json")
    train.run()
    train.finalize()
    ckpt_dir, output_dir = overrides["ckpt_dir"], overrides["output_dir"]
    assert os.path.isfile(os.path.join(ckpt_dir, "model.pt"))
    assert training_state_files(output_dir) == ["checkpoint_epoch=2.pt"]
    state = torch.load(os.path.join(output_dir, "training_state", "checkpoint_epoch=2.pt"), map_location="cpu",
                       weights_only=False)
    assert {"model", "optimizer", "trainer", "best_model", "trainer_progress"} <= set(state)
    # epochs follow their version's length: the progress records the epoch ignite would derive wrongly
    assert state["trainer_progress"] == {"epoch": 2, "iteration": state["trainer"]["iteration"]}
    model = torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("image_encoder.") for k in model)

    evaluate = ConfigWorkflow(config_file=[TRAIN, DEMO, EVALUATE], workflow_type=None, meta_file=META_FILE,
                              logging_file=None, run_id="evaluating", protocol="oracle", **overrides)
    evaluate.initialize()
    evaluate.run()
    evaluate.finalize()
    with open(os.path.join(output_dir, "oracle", "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["protocol"] == "oracle"
    for key in ("challenge_iou", "iou", "mc_iou", "miou"):
        # miou (cumulative) is NaN when the barely trained model predicts no instrument at all
        value = metrics[key]
        assert isinstance(value, float) and (math.isnan(value) or 0.0 <= value <= 100.0), (key, value)
    assert not math.isnan(metrics["challenge_iou"])
    assert metrics["iou"] == pytest.approx(metrics["challenge_iou"])  # oracle: equal by construction
    assert "Bipolar Forceps" in metrics["class_iou"]
    assert metrics["num_frames"] == SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]


@pytest.mark.slow
def test_training_killed_and_resumed(tmp_path, small_demo_dir, small_cache_dir, small_sam_checkpoint):
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache_dir, cache_dir)
    overrides = demo_overrides(small_demo_dir, cache_dir, small_sam_checkpoint, tmp_path / "run",
                               num_epochs=3, batch_size=8)
    overlay = tmp_path / "overlay.yaml"
    with open(overlay, "w") as handle:
        yaml.safe_dump(overrides, handle)
    command = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", repr([TRAIN, DEMO, str(overlay)])]
    output_dir = overrides["output_dir"]

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while (not training_state_files(output_dir, complete_only=True) and process.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            killed_at = training_state_files(output_dir, complete_only=True)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert process.returncode == -signal.SIGKILL, first_log[-3000:]
    assert killed_at and killed_at != ["checkpoint_epoch=3.pt"], (killed_at, first_log[-3000:])

    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    second_log = second.stdout + second.stderr
    assert second.returncode == 0, second_log[-3000:]
    assert "resuming training" in second_log and "checkpoint_epoch=" in second_log
    assert training_state_files(output_dir) == ["checkpoint_epoch=3.pt"]
    assert "epoch 1: augmentation version" not in second_log  # not restarted at epoch 1
    assert "epoch 3: augmentation version" in second_log
    state = torch.load(os.path.join(output_dir, "training_state", "checkpoint_epoch=3.pt"), map_location="cpu",
                       weights_only=False)
    assert state["trainer_progress"] == {"epoch": 3, "iteration": state["trainer"]["iteration"]}
    assert os.path.isfile(os.path.join(overrides["ckpt_dir"], "model.pt"))


def test_no_overlay_reaches_into_a_list_by_position():
    """An overlay names what it changes (e.g. cross_dataset.yaml's metrics_report#extra), never `handlers#2`:
    a handler added before it would silently receive the setting."""
    import re

    by_position = re.compile(r"#\d+(#|$)")
    found = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))):
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
        found += [f"{os.path.basename(path)}: {key}" for key in config if by_position.search(str(key))]
    assert not found, found


@pytest.mark.parametrize("method", [("train.yaml", "demo.yaml"), ("train_distill.yaml", "demo_distill.yaml")])
def test_the_precompute_call_is_written_once_per_method(method):
    """`precompute` and the demo's `prepare_cache` call the same cache_precompute component (a partial)."""
    import functools

    from monai.bundle import ConfigParser

    from scripts.data.embedding_cache import precompute_embeddings

    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, name) for name in method])
    text = "".join(open(os.path.join(CONFIGS, name)).read() for name in method)
    assert text.count("precompute_embeddings") == 1, "precompute_embeddings is written more than once"
    assert parser["precompute"][-1] == "$@cache_precompute()"
    assert parser["prepare_cache"][0].startswith("$@cache_precompute()")
    parser["device"] = "cpu"
    component = parser.get_parsed_content("cache_precompute", instantiate=True)
    assert isinstance(component, functools.partial) and component.func is precompute_embeddings
    assert ("taps" in component.keywords) == (method[0] == "train_distill.yaml")



#: What the two methods share, per pair of configs (SurgicalSAM's, Distillation-SAM's): keys that must read the
#: same in both (paths, dataset facts, device, the rank-0 gates, loaders, handlers, the run steps, the demo data,
#: the inference pipeline). MONAI's `%file#key` macros read their file relative to the working directory, not to
#: the config, so a base file pulled in by macros would tie every command to one folder (the repository root,
#: not a copied bundle or the CLI's); the copies are therefore held equal here: a change to one that misses the
#: other fails.
SHARED_KEYS = {
    ("train.yaml", "train_distill.yaml"): (
        "bundle_root", "ckpt_dir", "dataset_dir", "train_split", "val_split", "sam_checkpoint", "class_names",
        "num_classes", "frame_size", "dataset_facts_checked", "is_main_process", "device", "network",
        "lr_scheduler", "train#dataloader", "train#handlers", "train#best_model_state", "validate#dataloader",
        "validate#handlers", "validate#evaluator", "precompute", "prepare", "prepare_cache", "initialize", "run"),
    ("demo.yaml", "demo_distill.yaml"): (
        "dataset_dir", "ckpt_dir", "sam_variant", "sam_checkpoint", "frame_size", "class_names", "demo_data",
        "prepare"),
    ("evaluate.yaml", "evaluate_distill.yaml"): ("metrics_file", "validate#handlers", "run"),
    ("inference.yaml", "inference_distill.yaml"): (
        "imports", "bundle_root", "ckpt_dir", "dataset_dir", "sam_checkpoint", "class_names", "num_classes",
        "frame_size", "protocol", "frame_crop", "write_overlay", "write_nifti", "num_workers", "device", "network",
        "datalist", "preprocessing", "dataset", "unreadable_frames", "dataloader", "handlers", "initialize", "run",
        "label_format", "write_overlay_video", "frame_stride", "start_time", "end_time", "folder_fps", "video"),
}


def test_macro_files_are_read_from_the_working_directory(tmp_path, monkeypatch):
    """Why SHARED_KEYS holds copies equal instead of a base file: MONAI reads `%file#key` relative to the working
    directory, so `%configs/base.yaml#x` works from the bundle folder only (and `%bundle/configs/...` from the
    repository root only). Should MONAI read it relative to the config one day, this fails: fold the copies
    into a base file then."""
    from monai.bundle import ConfigParser

    configs = tmp_path / "bundle" / "configs"
    configs.mkdir(parents=True)
    (configs / "base.yaml").write_text("shared: {x: 1}\n")
    (configs / "method.yaml").write_text('shared: "%configs/base.yaml#shared"\n')
    for cwd, works in ((tmp_path / "bundle", True), (tmp_path, False)):
        monkeypatch.chdir(cwd)
        parser = ConfigParser()
        parser.read_config(str(configs / "method.yaml"))
        if works:
            assert parser.get_parsed_content("shared") == {"x": 1}
        else:
            with pytest.raises(FileNotFoundError):
                parser.get_parsed_content("shared")


@pytest.mark.parametrize("pair", sorted(SHARED_KEYS))
def test_both_methods_share_one_skeleton(pair):
    """Distillation-SAM's config repeats SurgicalSAM's shared blocks word for word."""

    def value(config: dict, key: str):  # an overlay writes `validate#handlers` as one key, a base nests it
        if key in config:
            return config[key]
        for part in key.split("#"):
            config = config[part]
        return config

    surgical, distill = (yaml.safe_load(open(os.path.join(CONFIGS, name))) for name in pair)
    differ = [key for key in SHARED_KEYS[pair] if value(surgical, key) != value(distill, key)]
    assert not differ, f"{pair[0]} and {pair[1]} disagree on {differ}"


def test_training_blocks_differ_only_in_the_keys_a_method_owns():
    """train_distill.yaml's trainer, checkpoint saver and precompute call are train.yaml's but for the keys a
    method owns (train.yaml's `compile`, the model file name, the tap list), and every logging handler of both
    carries the gate that keeps other ranks from writing logs."""
    from monai.bundle import ConfigParser

    surgical, distill = ConfigParser(), ConfigParser()
    surgical.read_config(TRAIN)
    distill.read_config(os.path.join(CONFIGS, "train_distill.yaml"))
    for key, owned in (("train#trainer", set()), ("validate#best_model_saver", {"key_metric_filename"}),
                       ("cache_precompute", {"cache_dir", "taps", "augmentation_draws"})):
        common = (set(surgical[key]) & set(distill[key])) - owned
        assert set(distill[key]) - owned <= set(surgical[key]), f"{key}: keys only train_distill.yaml has"
        assert {k: surgical[key][k] for k in common} == {k: distill[key][k] for k in common}, key
    for parser in (surgical, distill):
        for key in ("train#handlers", "validate#handlers"):
            loggers = [h for h in parser[key] if isinstance(h, dict) and "StatsHandler" in h["_target_"]]
            assert loggers and all(h["_disabled_"] == "$not @is_main_process" for h in loggers), key
