"""One source for dataset facts: training and evaluation read the class names and frame size from dataset.json;
a setting or an embedding cache that disagrees with it fails before any work, naming both values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_custom_raw

from scripts.data.prepare.custom import prepare_custom
from scripts.embedding_cache import StaleCacheError, precompute_embeddings

BUNDLE = Path(__file__).resolve().parent.parent / "bundle"
TRAIN = str(BUNDLE / "configs" / "train.yaml")
EVALUATE = str(BUNDLE / "configs" / "evaluate.yaml")
E2018 = str(BUNDLE / "configs" / "endovis2018.yaml")


@pytest.fixture
def own_data(tmp_path, small_sam_checkpoint):
    """Own data (2 classes, 16x20 frames) prepared with prepare_custom, and its embedding cache."""
    config = make_custom_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_custom(str(config), str(out), progress=False)
    cache_dir = str(out / "embedding_cache" / "tiny")
    precompute_embeddings(str(out), cache_dir, "tiny", small_sam_checkpoint, augmentation_versions=1)
    return str(out), cache_dir


def own_data_workflow(config_files, tmp_path, own_data, sam_checkpoint, run_id="run", **overrides):
    from monai.bundle import ConfigWorkflow

    data, cache = own_data
    settings = {
        "dataset_dir": data,
        "cache_dir": cache,
        "sam_variant": "tiny",
        "sam_checkpoint": sam_checkpoint,
        "bundle_root": str(tmp_path / "bundle"),
        "augmentation_versions": 1,
        "num_workers": 0,
        "batch_size": 2,
        "val_batch_size": 2,
        "num_epochs": 1,
        "device": "cpu",
        **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=list(config_files),
        workflow_type=None,
        logging_file=None,
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        run_id=run_id,
        **settings,
    )
    workflow.initialize()
    return workflow


def expression_error(function):
    """The error a config expression raised (MONAI wraps it in RuntimeErrors)."""
    with pytest.raises(Exception) as error:
        function()
    cause = error.value
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None and "Failed to evaluate" in str(cause):
        cause = cause.__cause__
    return cause


def test_training_and_evaluation_read_the_dataset_facts(tmp_path, own_data, small_sam_checkpoint):
    """No --frame_size, no --class_names: train.yaml reads them from dataset.json (16x20, Grasper and Hook)."""
    train = own_data_workflow([TRAIN], tmp_path, own_data, small_sam_checkpoint)
    parser = train.parser
    assert parser.get_parsed_content("class_names") == ["Grasper", "Hook"]
    assert parser.get_parsed_content("frame_size") == [16, 20]
    assert parser.get_parsed_content("network").num_classes == 2
    train.run()
    assert os.path.isfile(tmp_path / "bundle" / "models" / "model.pt")
    evaluate = own_data_workflow([TRAIN, EVALUATE], tmp_path, own_data, small_sam_checkpoint, run_id="evaluating")
    evaluate.run()
    metrics = json.loads((tmp_path / "bundle" / "eval" / "oracle" / "metrics.json").read_text())
    assert list(metrics["class_iou"]) == ["Grasper", "Hook"]


def test_a_setting_that_disagrees_with_dataset_json_fails_before_any_work(tmp_path, own_data, small_sam_checkpoint):
    from scripts.data.layout import DatasetError

    # the EndoVis2018 overlay on own data: both its class names and its frame size are wrong for it
    workflow = own_data_workflow([TRAIN, E2018], tmp_path, own_data, small_sam_checkpoint)
    error = expression_error(workflow.run)
    assert isinstance(error, DatasetError), error
    message = str(error)
    assert "class_names" in message and "['Grasper', 'Hook']" in message
    assert "1: 'Bipolar Forceps' vs 'Grasper'" in message
    assert "frame_size" in message and "[1024, 1280]" in message and "[16, 20]" in message
    assert not (tmp_path / "bundle").exists()  # nothing was trained or written
    # same count, other names: found by name, not by count
    workflow = own_data_workflow(
        [TRAIN, EVALUATE],
        tmp_path,
        own_data,
        small_sam_checkpoint,
        run_id="evaluating",
        class_names=["Hook", "Grasper"],
    )
    (tmp_path / "model.pt").write_bytes(b"")
    workflow.parser["model_file"] = str(tmp_path / "model.pt")
    error = expression_error(workflow.run)
    assert isinstance(error, DatasetError) and "1: 'Hook' vs 'Grasper'" in str(error)
    assert "frame_size" not in str(error)


def test_a_cache_of_other_class_names_is_stale(tmp_path, own_data, small_sam_checkpoint):
    data, _ = own_data
    description = json.loads(Path(data, "dataset.json").read_text())
    description["classes"] = {"1": "Grasper", "2": "Clipper"}  # renamed after precompute
    Path(data, "dataset.json").write_text(json.dumps(description))
    workflow = own_data_workflow([TRAIN], tmp_path, own_data, small_sam_checkpoint)
    error = expression_error(workflow.run)
    assert isinstance(error, StaleCacheError), error
    assert "['Grasper', 'Hook']" in str(error) and "--cache_dir NEW_FOLDER" in str(error)
