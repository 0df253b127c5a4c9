"""Tests of a newcomer's path (issue: one source for dataset facts, no work lost to one bad file): re-running
a preparation over its embedding cache, dataset facts from dataset.json, partial EndoVis2017 downloads,
inference past unreadable frames, the bundle root of the configs run, one error for every bad input,
messages, the preparation's crop at inference, and the commands the docs give."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data.layout import DatasetError, load_datalist
from scripts.data.prepare.custom import prepare_custom
from scripts.embedding_cache import EmbeddingCache, StaleCacheError, cache_identity, precompute_embeddings

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"


def write_image(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(path)


def make_custom_raw(root: Path, sequences=("case_1", "case_2", "case_3"), size=(16, 20)) -> Path:
    """Raw frames and grey label maps of two classes, one frame per sequence; returns the YAML config."""
    rng = np.random.default_rng(0)
    for index, sequence in enumerate(sequences):
        write_image(root / "frames" / sequence / "img_0.png", rng.integers(0, 256, (*size, 3)))
        labels = np.zeros(size, np.uint8)
        labels[: size[0] // 2, : size[1] // 2] = 1 + index % 2
        write_image(root / "labels" / sequence / "img_0.png", labels)
    config = root / "data.yaml"
    config.write_text(
        f"frames_dir: frames\nlabels_dir: labels\nclasses: {{1: Grasper, 2: Hook}}\n"
        f"validation_sequences: [{sequences[-1]}]\n"
    )
    return config


def npy_stamps(cache_dir: str) -> dict[str, int]:
    return {
        os.path.relpath(p, cache_dir): os.stat(p).st_mtime_ns
        for p in glob.glob(os.path.join(cache_dir, "**", "*.npy"), recursive=True)
    }


# ------------------------------------------------------------------ item 2: preparing again over the cache
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


# ------------------------------------------------------------------ item 7: every kind of bad input at once
def test_precompute_reports_every_kind_of_bad_label_at_once(tmp_path, small_demo_dir, small_sam_checkpoint):
    data = tmp_path / "data"
    shutil.copytree(small_demo_dir, data)
    items = load_datalist(str(data), "training")
    unknown, rgb, small = items[0], items[1], items[2]
    label = np.array(Image.open(unknown["label"]))
    label[0, 0] = 9  # outside the 7-class table
    Image.fromarray(label).save(unknown["label"])
    Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(rgb["label"])  # an RGB label map
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small["label"])  # another size than its frame
    cache_dir = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        precompute_embeddings(str(data), str(cache_dir), "tiny", small_sam_checkpoint, splits=("training",))
    message = str(error.value)
    assert "2 kind(s) of problem" in message
    assert "[9]" in message and unknown["label"] in message
    assert "'RGB'" in message and rgb["label"] in message
    assert "differ in size from their frame" in message and small["label"] in message
    assert not cache_dir.exists() or not glob.glob(str(cache_dir / "**" / "*.npy"), recursive=True)


# ------------------------------------------------------------------ item 8: messages in the bundle's words
@pytest.mark.parametrize("content", [b"\x80\x02random bytes that are no checkpoint" * 40, b"hello world\n" * 50])
def test_a_random_file_as_sam_checkpoint_gets_the_bundles_advice(tmp_path, content):
    from scripts.sam.backbone import build_sam
    from scripts.sam.prompting import load_sam_mask_decoder

    path = tmp_path / "not_sam.pth"
    path.write_bytes(content)
    for load in (lambda: build_sam("tiny", str(path)), lambda: load_sam_mask_decoder("tiny", str(path))):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert str(path) in message and "not a PyTorch weights file" in message
        assert "weights_only" not in message and "will likely succeed" not in message
        assert "--sam_checkpoint" in message


def test_a_cache_of_another_checkpoint_is_a_stale_cache(tmp_path, small_demo_dir, small_cache_dir):
    from scripts.engine.checks import check_evaluation_inputs, check_training_inputs
    from scripts.sam.backbone import save_random_sam_checkpoint

    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), "tiny", seed=1)
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    for check in (
        lambda: check_training_inputs(small_demo_dir, "tiny", other, small_cache_dir),
        lambda: check_evaluation_inputs(small_demo_dir, "tiny", other, small_cache_dir, str(model)),
    ):
        with pytest.raises(StaleCacheError) as error:
            check()
        assert not isinstance(error.value, FileNotFoundError)
        message = str(error.value)
        assert "sam_checkpoint_md5" in message and "--cache_dir NEW_FOLDER" in message
        assert "monai.bundle run precompute" in message


# ------------------------------------------------------------------ item 6: bundle_root of the configs run
def test_bundle_root_is_the_bundle_whose_configs_run(tmp_path):
    """A second copy of the bundle run while ``scripts`` comes from the first (another checkout on
    PYTHONPATH): models, data and outputs are the second copy's."""
    import subprocess
    import sys

    from conftest import bundle_copy_ignore

    copy = tmp_path / "second_clone" / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=bundle_copy_ignore(str(BUNDLE)))
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}  # the first checkout's code comes first
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(copy / "configs" / "train.yaml"),
        "--dataset_dir",
        str(tmp_path / "no_data"),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot train" in output, output[-3000:]
    assert str(copy / "models" / "sam_vit_h_4b8939.pth") in output, output[-3000:]
    assert str(BUNDLE / "models" / "sam_vit_h_4b8939.pth") not in output
    assert "with the code (scripts/) of" in output  # the mix of two checkouts is said


def test_bundle_root_outside_a_workflow_is_the_code_folder():
    import scripts

    assert scripts.run_bundle_root() == scripts.BUNDLE_ROOT


# ------------------------------------------------------------------ items 5 and 9: inference on a folder of frames
INFERENCE_CONFIGS = [str(BUNDLE / "configs" / "inference.yaml"), str(BUNDLE / "configs" / "demo_inference.yaml")]


@pytest.fixture
def demo_model(tmp_path, tiny_sam_checkpoint):
    import torch

    from scripts.surgical_sam.network import SurgicalSAM

    torch.manual_seed(1)
    path = str(tmp_path / "model.pt")
    torch.save(SurgicalSAM(7, 2, (64, 80), "tiny", tiny_sam_checkpoint).state_dict(), path)
    return path


def run_inference(frames_dir, output_dir, model_file, sam_checkpoint, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=INFERENCE_CONFIGS,
        workflow_type="infer",
        logging_file=None,
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        dataset_dir=str(frames_dir),
        output_dir=str(output_dir),
        model_file=model_file,
        sam_checkpoint=sam_checkpoint,
        device="cpu",
        **overrides,
    )
    workflow.initialize()
    workflow.run()


def test_inference_writes_every_readable_frame_and_names_the_bad_ones(tmp_path, demo_model, tiny_sam_checkpoint):
    from scripts.engine.handlers import UnreadableFramesError

    rng = np.random.default_rng(0)
    frames = tmp_path / "frames"
    for name in ("a.png", "c.png", "e.png"):
        write_image(frames / name, rng.integers(0, 255, (64, 80, 3)))
    (frames / "b.png").write_bytes((frames / "a.png").read_bytes()[:70])  # truncated
    (frames / "d.jpg").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(Exception) as error:
        run_inference(frames, out, demo_model, tiny_sam_checkpoint)
    cause = error.value
    while cause is not None and not isinstance(cause, UnreadableFramesError):  # MONAI wraps it in its expression's
        cause = cause.__cause__
    assert cause is not None, error.value
    assert sorted(p.name for p in out.glob("*_seg.png")) == ["a_seg.png", "c_seg.png", "e_seg.png"]
    message = str(cause)
    assert "2 of 5 frame(s)" in message and str(frames / "b.png") in message and str(frames / "d.jpg") in message
    assert "dataset.json" not in message and "move it out of the frame folder" in message


def test_inference_exits_non_zero_after_writing_the_other_frames(tmp_path, demo_model, tiny_sam_checkpoint):
    import subprocess
    import sys

    frames = tmp_path / "frames"
    write_image(frames / "good.png", np.zeros((64, 80, 3)))
    (frames / "bad.png").write_text("not an image")
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(INFERENCE_CONFIGS),
        "--dataset_dir",
        str(frames),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_file",
        demo_model,
        "--sam_checkpoint",
        tiny_sam_checkpoint,
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(BUNDLE)}
    )
    assert result.returncode != 0
    assert "1 of 2 frame(s)" in result.stderr + result.stdout and str(frames / "bad.png") in result.stderr
    assert (tmp_path / "out" / "good_seg.png").is_file()


def test_inference_frame_crop_segments_only_the_window(tmp_path, demo_model, tiny_sam_checkpoint):
    """frame_crop: the window alone is segmented, as the frame cropped beforehand would be; the label map keeps
    the raw frame's size with background outside the window."""
    rng = np.random.default_rng(3)
    raw = np.zeros((80, 100, 3), np.uint8)  # black borders around a 64x80 camera image
    window = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
    raw[6:70, 12:92] = window
    write_image(tmp_path / "raw" / "f.png", raw)
    write_image(tmp_path / "cropped" / "f.png", window)
    run_inference(
        tmp_path / "raw", tmp_path / "out_raw", demo_model, tiny_sam_checkpoint, frame_crop=[[6, 70], [12, 92]]
    )
    run_inference(tmp_path / "cropped", tmp_path / "out_cropped", demo_model, tiny_sam_checkpoint)
    full = np.asarray(Image.open(tmp_path / "out_raw" / "f_seg.png"))
    expected = np.asarray(Image.open(tmp_path / "out_cropped" / "f_seg.png"))
    assert full.shape == (80, 100)
    np.testing.assert_array_equal(full[6:70, 12:92], expected)
    assert not full[:6].any() and not full[70:].any() and not full[:, :12].any() and not full[:, 92:].any()
    assert expected.any()  # the comparison is about a non-empty map
    overlay = np.asarray(Image.open(tmp_path / "out_raw" / "f_overlay.png"))
    assert overlay.shape == (80, 100, 3)


def test_frame_crop_setting_errors(tmp_path):
    from scripts.data.transforms import LoadFramed, frame_crop_box

    with pytest.raises(ValueError, match="frame_crop"):
        frame_crop_box([28, 1052, 320, 1600])
    write_image(tmp_path / "small.png", np.zeros((10, 10, 3)))
    with pytest.raises(DatasetError, match="smaller than frame_crop"):
        LoadFramed("image", crop=[[0, 20], [0, 5]])({"image": str(tmp_path / "small.png")})


# ------------------------------------------------------------------ item 4: a partial EndoVis2017 download
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


# ------------------------------------------------------------------ item 3: one source for dataset facts
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


def test_frame_crop_in_the_monailabel_seam(tmp_path):
    """What MONAI Label's BundleInferTask runs (preprocessing, then postprocessing on the inferer's label map)
    with a crop overlay: the frame is cropped and the returned mask has the whole frame's size, (W, H)."""
    import torch
    from monai.bundle import ConfigParser

    overlay = tmp_path / "crop.yaml"
    overlay.write_text("frame_crop: [[2, 10], [3, 15]]\n")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.yaml"), str(overlay)])
    write_image(tmp_path / "f.png", np.full((12, 20, 3), 9))
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "f.png")})
    assert tuple(data["image"].shape) == (3, 8, 12)
    data["pred"] = torch.full((1, 8, 12), 3, dtype=torch.long)
    mask = parser.get_parsed_content("postprocessing")(data)["pred"]
    assert tuple(mask.shape) == (20, 12)  # (W, H), MONAI's order for 2D images
    expected = np.zeros((12, 20), np.uint8)
    expected[2:10, 3:15] = 3
    np.testing.assert_array_equal(mask.numpy().T, expected)


# ------------------------------------------------------------------ item 10: the docs' commands
def test_docs_give_the_newcomers_commands():
    card = (BUNDLE / "docs" / "README.md").read_text()
    table = card[card.index("## Commands") : card.index("### Dataset overlays")]
    assert (
        "`python -m monai.bundle run --config_file \"['bundle/configs/inference.yaml',"
        "'bundle/configs/demo_inference.yaml']\" --dataset_dir FRAMES`"
    ) in table
    own = card[card.index("**Your own data**") : card.index("**Cross-dataset**")]
    for command in (
        "surgical-sam prepare_custom --config raw/classes.yaml --out_dir data/mine",
        "run precompute --config_file bundle/configs/train.yaml --dataset_dir data/mine",
        "run training   --config_file bundle/configs/train.yaml --dataset_dir data/mine",
        "run evaluating",
        "--class_names \"['Grasper','Hook']\"",
        '--frame_size "[480, 640]"',
    ):
        assert command in own, command
    for key in ("frames_dir: frames", "labels_dir: labels", "classes: {1: Grasper, 2: Hook}"):
        assert key in own


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
        env={**os.environ, "PYTHONPATH": str(BUNDLE), "PAGER": "cat"},
    )
    shown = result.stdout + result.stderr
    for line in module.EXPECTED_LAYOUT.splitlines():
        assert line.strip() in shown, (line, shown[:2000])
    if command == "prepare_custom":
        assert "classes: {1: Grasper, 2: Hook}" in shown
