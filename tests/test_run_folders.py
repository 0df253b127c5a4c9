"""A training run's folders: one run at a time (a second fails at once naming the first; a dead run's lock is named
and taken over), checked writable and with room before the first epoch; resuming says so and refuses other
settings unless asked; the model file records what inference needs, and one already there is kept aside."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import META_FILE, SMALL_CACHE_VERSIONS, SMALL_DEMO

from scripts.engine.checkpoints import ModelInfoError, check_model_info, read_model_info
from scripts.engine.handlers import ResumeSettingsError
from scripts.engine.run_folders import LOCK_FILE, RunFolderError, RunLock, check_room
from scripts.engine.workflows import run_workflow
from scripts.errors import user_error_in

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")
TRAIN, DEMO, EVALUATE = (os.path.join(CONFIGS, f"{name}.yaml") for name in ("train", "demo", "evaluate"))

pytestmark = pytest.mark.usefixtures("restore_root_logging")


def lock_in_another_process(folder, stay: bool) -> subprocess.Popen | None:
    """A process that locks ``folder`` and then either stays (until killed) or exits without releasing (killed)."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from scripts.engine.run_folders import RunLock
        RunLock([{str(folder)!r}]).acquire()
        print("locked", flush=True)
        if {stay}:
            time.sleep(300)
        os._exit(0)  # like a kill: no clean-up
    """)
    bundle = os.path.join(os.path.dirname(CONFIGS))
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": bundle}
    )
    assert process.stdout.readline().strip() == "locked"
    if not stay:
        process.wait(timeout=60)
    return process


def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_first(tmp_path):
    folder = tmp_path / "eval"
    first = lock_in_another_process(folder, stay=True)
    try:
        with pytest.raises(RunFolderError, match=f"pid {first.pid} ") as error:
            RunLock([str(folder), str(tmp_path / "models")]).acquire()
        assert "started" in str(error.value) and str(folder) in str(error.value)
        assert not (tmp_path / "models" / LOCK_FILE).exists()  # all or nothing
    finally:
        first.kill()
        first.wait()


def test_the_lock_of_a_run_that_died_is_named_and_taken_over(tmp_path, caplog):
    folder = tmp_path / "eval"
    dead = lock_in_another_process(folder, stay=False)
    lock = RunLock([str(folder)])
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"pid {dead.pid} " in caplog.text and "no longer running" in caplog.text
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_a_folder_without_room_or_that_cannot_be_made_is_named(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(RunFolderError, match="MiB free") as error:
        check_room({str(tmp_path / "models"): free + 2**40})
    assert str(tmp_path / "models") in str(error.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunFolderError, match="cannot be written"):
        check_room({str(tmp_path / "a_file" / "eval"): 1})


def demo_run(prepared, **extra):
    from monai.bundle import ConfigWorkflow

    overrides = {
        "dataset_dir": str(prepared["dataset_dir"]),
        "cache_dir": str(prepared["cache_dir"]),
        "sam_checkpoint": str(prepared["sam_checkpoint"]),
        "output_dir": str(prepared["out_dir"] / "eval"),
        "ckpt_dir": str(prepared["out_dir"] / "models"),
        "frame_size": list(SMALL_DEMO["frame_size"]),
        "augmentation_versions": SMALL_CACHE_VERSIONS,
        "batch_size": 8,
        "num_epochs": 1,
        "demo_data": {k: SMALL_DEMO[k] for k in ("train_sequences", "val_sequences", "frames_per_sequence")},
        **extra,
    }
    workflow = ConfigWorkflow(
        config_file=[TRAIN, DEMO], workflow_type="train", meta_file=META_FILE, logging_file=False, **overrides
    )
    for name, logger in logging.root.manager.loggerDict.items():  # an earlier workflow's logging.conf disabled them
        if name.startswith("scripts") and isinstance(logger, logging.Logger):
            logger.disabled = False
    return run_workflow(workflow)


def test_training_keeps_an_old_model_aside_records_its_settings_and_resumes_only_with_them(prepared, caplog):
    models = prepared["out_dir"] / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"a model of another run")
    with caplog.at_level(logging.INFO):
        workflow = demo_run(prepared)
    kept = [name for name in os.listdir(models) if name.startswith("model.kept-")]
    assert len(kept) == 1 and (models / kept[0]).read_bytes() == b"a model of another run"
    assert kept[0] in caplog.text and "the best model goes to" in caplog.text and "training finished" in caplog.text
    assert "epoch 1/1: loss" in caplog.text and "samples/s" in caplog.text  # one line per epoch,
    assert "train_loss: " not in caplog.text  # not one per iteration
    assert not (models / LOCK_FILE).exists()  # released at the end

    info = read_model_info(str(models / "model.pt"))
    names = list(workflow.parser.get_parsed_content("class_names"))
    assert info["method"] == "surgical_sam" and info["class_names"] == names
    assert info["frame_size"] == list(SMALL_DEMO["frame_size"]) and info["sam_variant"] == "tiny"
    assert info["sam_checkpoint_md5"]
    # inference with the right names in the wrong order: an error showing both
    with pytest.raises(ModelInfoError, match="class_names") as error:
        check_model_info(str(models / "model.pt"), names[::-1], SMALL_DEMO["frame_size"], "surgical_sam", "tiny")
    assert str(names) in str(error.value) and str(names[::-1]) in str(error.value)
    with pytest.raises(ModelInfoError, match="frame_size"):
        check_model_info(str(models / "model.pt"), names, [64, 64])

    # resuming with another learning rate: refused, naming both; asked for, it goes on
    with pytest.raises(RuntimeError) as error:  # MONAI wraps it; the bundle's report unwraps it (scripts.errors)
        demo_run(prepared, num_epochs=2, learning_rate=0.01)
    found = user_error_in(error.value)
    assert isinstance(found, ResumeSettingsError) and "learning_rate" in str(found)
    assert "0.002" in str(found) and "0.01" in str(found) and "--resume_with_changes" in str(found)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        demo_run(prepared, num_epochs=2, learning_rate=0.01, resume_with_changes=True)
    assert "resuming training from" in caplog.text and "checkpoint_epoch=1.pt" in caplog.text
    assert "learning rate 0.01 applied" in caplog.text
    assert torch.load(models / "model.pt", weights_only=True)["model_info"]["class_names"] == names


def test_an_old_model_file_without_its_record_still_loads(tmp_path, caplog):
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with caplog.at_level(logging.WARNING):
        assert check_model_info(str(path), ["a"], [8, 8]) is None
    assert "no record of its classes" in caplog.text
