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
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    META_FILE,
    SMALL_CACHE_VERSIONS,
    SMALL_DEMO,
    bundle_copy_ignore,
    bundle_run_command,
    checked_workflow,
)
from monai.bundle import ConfigWorkflow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundle", "configs")
BUNDLE = Path(REPO_ROOT) / "bundle"
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
        config_files,
        "infer",
        dataset_dir=os.path.join(small_demo_dir, "images"),
        sam_variant="tiny",
        sam_checkpoint=small_sam_checkpoint,
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        frame_size=list(SMALL_DEMO["frame_size"]),
    )
    assert len(workflow.dataset) == 12  # every frame of the small demo


# ------------------------------------------------------------------------------- command line, no data
def test_cli_training_without_inputs_fails_at_once(tmp_path):
    dataset_dir = str(tmp_path / "empty")
    os.makedirs(dataset_dir)
    checkpoint = str(tmp_path / "missing" / "sam_vit_h_4b8939.pth")
    command = bundle_run_command("training", TRAIN, dataset_dir=dataset_dir, sam_checkpoint=checkpoint)
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"
    assert "cannot train" in output
    assert dataset_dir in output and "surgical-sam prepare_custom" in output
    assert checkpoint in output and "sam_vit_h_4b8939.pth" in output


def test_copied_bundle_runs_from_its_own_folder(tmp_path):
    """The bundle folder alone (no repo around it) resolves its own scripts and bundle_root."""
    copy = tmp_path / "bundle_copy"
    shutil.copytree(
        os.path.join(REPO_ROOT, "bundle"), copy, ignore=bundle_copy_ignore(os.path.join(REPO_ROOT, "bundle"))
    )
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.yaml",
        "--dataset_dir",
        str(tmp_path / "no_data"),
    ]
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
    overrides = demo_overrides(
        tmp_path / "data", tmp_path / "cache", small_sam_checkpoint, tmp_path / "run", num_epochs=2, batch_size=8
    )
    train = ConfigWorkflow(
        config_file=[TRAIN, DEMO], workflow_type="train", meta_file=META_FILE, logging_file=None, **overrides
    )
    train.initialize()
    assert os.path.isfile(tmp_path / "data" / "dataset.json")
    assert os.path.isfile(tmp_path / "cache" / "manifest.json")
    train.run()
    train.finalize()
    ckpt_dir, output_dir = overrides["ckpt_dir"], overrides["output_dir"]
    assert os.path.isfile(os.path.join(ckpt_dir, "model.pt"))
    assert training_state_files(output_dir) == ["checkpoint_epoch=2.pt"]
    state = torch.load(
        os.path.join(output_dir, "training_state", "checkpoint_epoch=2.pt"), map_location="cpu", weights_only=False
    )
    assert {"model", "optimizer", "trainer", "best_model", "trainer_progress"} <= set(state)
    # epochs follow their version's length: the progress records the epoch ignite would derive wrongly
    assert state["trainer_progress"] == {"epoch": 2, "iteration": state["trainer"]["iteration"]}
    model = torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu", weights_only=True)["model"]
    assert model and not any(k.startswith("image_encoder.") for k in model)

    evaluate = ConfigWorkflow(
        config_file=[TRAIN, DEMO, EVALUATE],
        workflow_type=None,
        meta_file=META_FILE,
        logging_file=None,
        run_id="evaluating",
        protocol="oracle",
        **overrides,
    )
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
    overrides = demo_overrides(
        small_demo_dir, cache_dir, small_sam_checkpoint, tmp_path / "run", num_epochs=3, batch_size=8
    )
    overlay = tmp_path / "overlay.yaml"
    with open(overlay, "w") as handle:
        yaml.safe_dump(overrides, handle)
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        repr([TRAIN, DEMO, str(overlay)]),
    ]
    output_dir = overrides["output_dir"]

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while (
                not training_state_files(output_dir, complete_only=True)
                and process.poll() is None
                and time.monotonic() < deadline
            ):
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
    state = torch.load(
        os.path.join(output_dir, "training_state", "checkpoint_epoch=3.pt"), map_location="cpu", weights_only=False
    )
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


#: Each method's commands: the config files merged, in order (Distillation-SAM's overlays go over SurgicalSAM's).
METHOD_COMMANDS = {
    "surgical_sam": {
        "train": ("train",),
        "demo": ("train", "demo"),
        "evaluate": ("train", "evaluate"),
        "infer": ("inference",),
    },
    "distillation_sam": {
        "train": ("train", "train_distill"),
        "demo": ("train", "train_distill", "demo", "demo_distill"),
        "evaluate": ("train", "train_distill", "evaluate", "evaluate_distill"),
        "infer": ("inference", "inference_distill"),
    },
}


def config_files(method: str, command: str) -> list[str]:
    return [os.path.join(CONFIGS, f"{name}.yaml") for name in METHOD_COMMANDS[method][command]]


@pytest.mark.parametrize("method", sorted(METHOD_COMMANDS))
def test_the_precompute_call_is_written_once(method):
    """`precompute` and the demo's `prepare_cache` call train.yaml's cache_precompute component (a partial); the
    Distillation-SAM overlay gives it the tap cache folder and the taps, and its demo calls it only with cache_taps."""
    import functools

    from monai.bundle import ConfigParser

    from scripts.embedding_cache import precompute_embeddings

    text = "".join(open(path).read() for path in glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert text.count("precompute_embeddings") == 1, "precompute_embeddings is written more than once"
    parser = ConfigParser()
    parser.read_config(config_files(method, "demo"))
    assert parser["precompute"][-1] == "$@cache_precompute()"
    assert (
        parser["prepare_cache"]
        == {
            "surgical_sam": ["$@cache_precompute()"],
            "distillation_sam": [
                "$scripts.distillation_sam.datasets.prepare_tap_cache(@cache_taps, @cache_precompute)"
            ],
        }[method]
    )
    parser["device"] = "cpu"
    component = parser.get_parsed_content("cache_precompute", instantiate=True)
    assert isinstance(component, functools.partial) and component.func is precompute_embeddings
    assert (component.keywords.get("taps") is not None) == (method == "distillation_sam")
    assert component.keywords["cache_dir"] == parser.get_parsed_content(
        {"surgical_sam": "cache_dir", "distillation_sam": "tap_cache_dir"}[method]
    )


def test_the_first_use_tap_cache_step_runs_the_precompute_with_cache_taps_only():
    from scripts.distillation_sam.datasets import prepare_tap_cache

    calls = []

    def precompute():
        calls.append(1)
        return {"complete": True}

    assert prepare_tap_cache(False, precompute) is None and not calls
    assert prepare_tap_cache(True, precompute) == {"complete": True} and calls == [1]


def test_macro_files_are_read_from_the_working_directory(tmp_path, monkeypatch):
    """Why Distillation-SAM's configs are overlays merged by --config_file (as the model zoo's bundles do) and not
    files that pull a base in by macros: MONAI reads `%file#key` relative to the working directory, so
    `%configs/base.yaml#x` works from the bundle folder only (and `%bundle/configs/...` from the repository root
    only), while train.yaml must run alone from anywhere. Should MONAI read it relative to the config one day,
    this fails."""
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


def test_no_config_holds_an_if_else_program():
    """Configs are declarative: a choice between components is an overlay or an id, not `$ ... if ... else`."""
    found = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")) + glob.glob(os.path.join(CONFIGS, "*.json"))):
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            code = line.split("#", 1)[0] if path.endswith(".yaml") else line
            if "$" in code and " if " in code and " else " in code:
                found.append(f"{os.path.basename(path)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("command", ["train", "demo", "evaluate", "infer"])
def test_an_overlay_writes_only_what_it_changes(command):
    """No copies: every id a Distillation-SAM overlay sets differs from what the configs merged before it say (or
    is new), and the overlays set no handler list, loader, evaluator or trainer: those are SurgicalSAM's, with
    their rank-0 gates."""
    from monai.bundle import ConfigParser

    names = METHOD_COMMANDS["distillation_sam"][command]
    for index, name in enumerate(names):
        if name in METHOD_COMMANDS["surgical_sam"][command]:
            continue
        before = ConfigParser()
        before.read_config([os.path.join(CONFIGS, f"{n}.yaml") for n in names[:index]])
        overlay = yaml.safe_load(open(os.path.join(CONFIGS, f"{name}.yaml")))
        copies = [
            key for key, value in overlay.items() if not key.startswith("+") and key in before and before[key] == value
        ]
        assert not copies, f"{name} repeats {copies} of {names[:index]}"
        shared = [
            key
            for key in overlay
            if key.split("#")[-1] in ("handlers", "dataloader", "evaluator", "trainer")
            or key in ("train", "validate", "initialize", "run", "training", "evaluating")
        ]
        assert not shared, f"{name} rewrites the shared skeleton: {shared}"


@pytest.mark.parametrize("method", sorted(METHOD_COMMANDS))
def test_both_methods_pass_the_training_workflow_checks_with_rank_zero_gates(method, prepared):
    """The merged configs pass ConfigWorkflow's check_properties, and every logging handler the trainer and the
    evaluator get is gated on is_main_process (multi_gpu_train.yaml: rank 0), in both methods."""
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    from scripts.engine.progress import EpochProgress
    from scripts.engine.run_folders import RunGuard

    gated = {
        "StatsHandler": StatsHandler,
        "TensorBoardStatsHandler": TensorBoardStatsHandler,
        "scripts.engine.progress.EpochProgress": EpochProgress,
        "scripts.engine.run_folders.RunGuard": RunGuard,
    }
    overrides = demo_overrides(**prepared, **({"cache_taps": False} if method == "distillation_sam" else {}))
    workflow = checked_workflow(config_files(method, "demo"), "train", **overrides)
    network = workflow.parser.get_parsed_content("network_def")
    assert type(network).__name__ == {"surgical_sam": "SurgicalSAM", "distillation_sam": "DistillationSAM"}[method]
    expected = {
        "train": {
            "TensorBoardStatsHandler",
            "scripts.engine.progress.EpochProgress",
            "scripts.engine.run_folders.RunGuard",
        },
        "validate": {"StatsHandler", "TensorBoardStatsHandler"},
    }
    for section in ("train", "validate"):
        loggers = [h for h in workflow.parser[f"{section}#handlers"] if isinstance(h, dict) and h["_target_"] in gated]
        assert {h["_target_"] for h in loggers} == expected[section], section
        assert all(h.get("_disabled_") == "$not @is_main_process" for h in loggers), section
    trainer = workflow.parser.get_parsed_content("train#trainer")
    handlers = [h for event in trainer._event_handlers.values() for h, *_ in event]
    attached = {type(getattr(h, "__self__", h)) for h in handlers}
    assert {EpochProgress, TensorBoardStatsHandler, RunGuard} <= attached

    workflow.parser["is_main_process"] = False  # another rank: the loggers are not built
    for section in ("train", "validate"):
        built = workflow.parser.get_parsed_content(f"{section}#handlers", lazy=False)
        assert not any(isinstance(h, tuple(gated.values())) for h in built), section


@pytest.mark.parametrize("method", sorted(METHOD_COMMANDS))
def test_both_methods_pass_the_inference_workflow_checks(method, tmp_path, small_demo_dir, small_sam_checkpoint):
    workflow = checked_workflow(
        config_files(method, "infer") + [DEMO_INFERENCE],
        "infer",
        dataset_dir=os.path.join(small_demo_dir, "images"),
        sam_checkpoint=small_sam_checkpoint,
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        frame_size=list(SMALL_DEMO["frame_size"]),
    )
    assert workflow.parser.get_parsed_content("model_file").endswith(
        {"surgical_sam": "model.pt", "distillation_sam": "distill_model.pt"}[method]
    )


# ------------------------------------------------------------------- bundle_root of the configs run
def test_bundle_root_is_the_bundle_whose_configs_run(tmp_path):
    """A second copy of the bundle run while ``scripts`` comes from the first (another checkout on
    PYTHONPATH): models, data and outputs are the second copy's."""
    import subprocess

    from conftest import bundle_copy_ignore

    copy = tmp_path / "second_clone" / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=bundle_copy_ignore(str(BUNDLE)))
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}  # the first checkout's code comes first
    command = bundle_run_command("training", copy / "configs" / "train.yaml", dataset_dir=tmp_path / "no_data")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot train" in output, output[-3000:]
    assert str(copy / "models" / "sam_vit_h_4b8939.pth") in output, output[-3000:]
    assert str(BUNDLE / "models" / "sam_vit_h_4b8939.pth") not in output
    assert "with the code (scripts/) of" in output  # the mix of two checkouts is said


def test_bundle_root_outside_a_workflow_is_the_code_folder():
    import scripts

    assert scripts.run_bundle_root() == scripts.BUNDLE_ROOT
