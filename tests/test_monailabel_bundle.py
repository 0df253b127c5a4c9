"""The bundle's MONAI Label side without MONAI Label: the 2D mask postprocessing, SAM's own point/box path,
the MONAI Label bundle folder and training as BundleTrainTask runs it (train.json, its overrides)."""

from __future__ import annotations

import glob
import json
import os

import monai.bundle
import pytest
import torch
import torch.nn.functional as F

from scripts.data.transforms import LabelMaskd
from scripts.monailabel_glue.bundle_folder import load_model_state, make_monailabel_bundle
from scripts.sam.prompting import PromptError, SamPointPrompter, check_prompts
from scripts.surgical_sam.network import SurgicalSAM

FRAME = (64, 80)
TINY = {"sam_variant": "tiny", "frame_size": list(FRAME)}

pytestmark = pytest.mark.usefixtures("restore_root_logging")


# ------------------------------------------------------------------------------------------ LabelMaskd
def test_label_mask_is_2d_uint8():
    out = LabelMaskd(keys="pred")({"pred": torch.full((1, 1, 5, 7), 3, dtype=torch.long)})["pred"]
    assert out.shape == (5, 7) and out.dtype == torch.uint8 and int(out.max()) == 3


def test_label_mask_in_monai_xy_order_for_monailabel():
    """MONAI Label's writer transposes (MONAI's (x, y) order): the mask goes (W, H) and the frame's
    spatial_shape is stated alike, so MONAI Label's Restored sees no size change; the writer transposes back."""
    from monai.data import MetaTensor

    label_map = torch.arange(35).reshape(1, 1, 5, 7) % 8
    image = MetaTensor(torch.zeros(3, 5, 7), meta={"spatial_shape": [5, 7]})
    out = LabelMaskd(keys="pred", xy_order=True)({"pred": label_map, "image": image})
    assert out["pred"].shape == (7, 5)
    torch.testing.assert_close(out["pred"].t(), label_map[0, 0].to(torch.uint8))
    assert list(out["image"].meta["spatial_shape"]) == [7, 5]


def test_bundle_writer_transposes_back(tmp_path):
    import numpy as np
    from PIL import Image

    from scripts.data.transforms import SaveLabelMapd

    label_map = (torch.arange(35).reshape(5, 7) % 8).to(torch.uint8)
    SaveLabelMapd(keys="pred", output_dir=str(tmp_path), write_overlay=False, xy_order=True)(
        {"pred": label_map.t(), "image": None}
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "frame_seg.png")), label_map.numpy())


@pytest.mark.parametrize(
    "pred, message",
    [
        (torch.zeros(2, 1, 5, 7), "singleton"),
        (torch.zeros(7), "singleton"),
        (torch.full((1, 5, 7), 300), "0..255"),
    ],
)
def test_label_mask_refuses_what_is_not_one_map(pred, message):
    with pytest.raises(ValueError, match=message):
        LabelMaskd(keys="pred")({"pred": pred})


# ------------------------------------------------------------------------------- SAM's point/box path
@pytest.fixture
def tiny_network(small_sam_checkpoint):
    return SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint, with_image_encoder=True).eval()


@pytest.mark.parametrize(
    "prompts",
    [
        {"foreground": [[10, 20]]},
        {"foreground": [[10, 20], [30, 40]], "background": [[70, 5]]},
        {"box": [5, 6, 50, 60]},
        {"foreground": [[12, 30]], "box": [0, 0, 40, 63]},
    ],
)
def test_point_prompts_match_segment_anything(tiny_network, small_sam_checkpoint, prompts):
    """Our path (network's encoder + SAM prompt encoder + the checkpoint's own decoder) gives the logits
    segment-anything's Sam.forward gives for the same frame and prompts."""
    from scripts.sam.backbone import build_sam
    from scripts.sam.geometry import resized_shape

    torch.manual_seed(0)
    frames = torch.rand(1, 3, *FRAME) * 255
    logits, _ = SamPointPrompter(tiny_network, "tiny", small_sam_checkpoint)(frames, **prompts)

    sam = build_sam("tiny", small_sam_checkpoint)
    size = sam.image_encoder.img_size
    new_hw = resized_shape(FRAME, size)
    image = F.interpolate(frames, size=new_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    scale = torch.tensor([new_hw[1] / FRAME[1], new_hw[0] / FRAME[0]])
    item = {"image": image, "original_size": FRAME}
    fg, bg = prompts.get("foreground", []), prompts.get("background", [])
    if fg or bg:
        item["point_coords"] = (torch.tensor(fg + bg, dtype=torch.float32) * scale)[None]
        item["point_labels"] = torch.tensor([1] * len(fg) + [0] * len(bg))[None]
    if "box" in prompts:
        item["boxes"] = (torch.tensor(prompts["box"], dtype=torch.float32).reshape(2, 2) * scale).reshape(1, 4)
    multimask = "box" not in prompts and len(fg + bg) == 1
    with torch.no_grad():
        out = sam([item], multimask_output=multimask)[0]
    best = int(out["iou_predictions"][0].argmax())
    expected = sam.postprocess_masks(out["low_res_logits"][:, best : best + 1], new_hw, FRAME)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ({}, "at least one"),
        ({"foreground": [[80, 10]]}, "outside the frame"),
        ({"background": [[-1, 10]]}, "outside the frame"),
        ({"foreground": [[1]]}, "not \\[x, y\\]"),
        ({"foreground": [["a", 2]]}, "not \\[x, y\\]"),
        ({"box": [10, 10, 5, 20]}, "x0 < x1"),
        ({"box": [0, 0, 81, 10]}, "x0 < x1"),
        ({"box": [0, 0, 10]}, "\\[x0, y0, x1, y1\\]"),
    ],
)
def test_bad_prompts_are_refused(prompts, message):
    with pytest.raises(PromptError, match=message):
        check_prompts(FRAME, **prompts)


# --------------------------------------------------------------------------- MONAI Label bundle folder
def _messages(error: BaseException) -> str:
    """The messages of an exception and its causes (config expressions wrap the original error)."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(parts)


def _datalist(demo_dir, split_glob):
    images = sorted(glob.glob(os.path.join(demo_dir, "images", split_glob, "*.png")))
    return [{"image": p, "label": p.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep)} for p in images]


def _run_like_bundle_train_task(bundle_dir, train, val, epochs=1, load=True, **settings):
    """What MONAI Label 0.8.5's BundleTrainTask does (single GPU): train.json, id `run`, no initialize,
    these overrides, a CheckpointLoader of models/model.pt (strict=False) at the front of train#handlers,
    and the request's values of `monailabel_settings` (``settings``, over the defaults)."""
    configs = os.path.join(bundle_dir, "configs")
    parser = monai.bundle.ConfigParser()
    parser.read_config(os.path.join(configs, "train.json"))
    handlers = parser.get("train#handlers")
    # BundleTrainTask looks for its CheckpointLoader with handler.get("_target_"): every entry is a dict
    assert all(isinstance(handler, dict) for handler in handlers), handlers
    if load:
        handlers.insert(
            0,
            {
                "_target_": "CheckpointLoader",
                "load_path": os.path.join(bundle_dir, "models", "model.pt"),
                "load_dict": {"model": "$@network"},
                "strict": False,
            },
        )
    displayable = {**parser.get("monailabel_settings"), **settings}
    monai.bundle.run(
        run_id="run",
        init_id=None,
        final_id=None,
        meta_file=os.path.join(configs, "metadata.json"),
        config_file=os.path.join(configs, "train.json"),
        **{
            "bundle_root": bundle_dir,
            "train#trainer#max_epochs": epochs,
            "train#dataset#data": train,
            "device": "cpu",
            "train#handlers": handlers,
            "validate#dataset#data": val,
            "monailabel_settings": displayable,
        },
    )


@pytest.fixture
def label_bundle(tmp_path, small_sam_checkpoint):
    network = SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint)
    model = str(tmp_path / "model0.pt")
    torch.save(network.state_dict(), model)
    out = make_monailabel_bundle(
        str(tmp_path / "app" / "model" / "surgicalsam"),
        model_file=model,
        sam_checkpoint=small_sam_checkpoint,
        settings=TINY,
    )
    return out, model


def test_cli_makes_the_bundle_folder(tmp_path, small_sam_checkpoint, capsys):
    from scripts.cli import main

    model = str(tmp_path / "model.pt")
    torch.save(SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint).state_dict(), model)
    out = str(tmp_path / "app" / "model" / "surgicalsam")
    main(
        [
            "monailabel_bundle",
            out,
            "--model_file",
            model,
            "--sam_checkpoint",
            small_sam_checkpoint,
            "--sam_variant",
            "tiny",
            "--frame_size",
            "64,80",
        ]
    )
    assert "monailabel start_server" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "configs", "train.json")))["frame_size"] == list(FRAME)
    with pytest.raises(SystemExit, match="not empty"):
        main(
            [
                "monailabel_bundle",
                out,
                "--model_file",
                model,
                "--sam_checkpoint",
                small_sam_checkpoint,
                "--sam_variant",
                "tiny",
                "--frame_size",
                "64,80",
            ]
        )


def test_bundle_folder_has_what_monailabel_reads(label_bundle):
    out, _ = label_bundle
    for name in (
        "configs/inference.json",
        "configs/train.json",
        "configs/metadata.json",
        "models/model.pt",
        "models/sam_tiny.pth",
        "scripts/__init__.py",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    inference = json.load(open(os.path.join(out, "configs", "inference.json")))
    for key in ("network_def", "preprocessing", "postprocessing", "inferer"):
        assert key in inference
    assert inference["sam_variant"] == "tiny" and inference["frame_size"] == list(FRAME)
    assert inference["postprocessing"]["transforms"][-1]["_target_"].endswith("LabelMaskd")
    metadata = json.load(open(os.path.join(out, "configs", "metadata.json")))
    assert next(iter(metadata["network_data_format"]["inputs"])) == "image"
    assert next(iter(metadata["network_data_format"]["outputs"])) == "pred"


@pytest.mark.parametrize("wrap", ["state_dict", "module"])
def test_bundle_refuses_a_model_it_cannot_load(tmp_path, small_sam_checkpoint, wrap):
    state = SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint).state_dict()
    bad = {"state_dict": state} if wrap == "state_dict" else {"module." + k: v for k, v in state.items()}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        make_monailabel_bundle(
            str(tmp_path / "out"),
            model_file=str(tmp_path / "bad.pt"),
            sam_checkpoint=small_sam_checkpoint,
            settings=TINY,
        )


def test_monailabel_loading_cannot_give_random_weights(small_sam_checkpoint):
    """MONAI Label loads checkpoint.get('model', checkpoint) with strict=False: the network refuses anyway."""
    network = SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint, with_image_encoder=True)
    saved = SurgicalSAM(7, 2, FRAME, "tiny", small_sam_checkpoint).state_dict()
    for checkpoint in ({"state_dict": saved}, {"network": saved}, {k[:-1]: v for k, v in saved.items()}):
        with pytest.raises(RuntimeError, match="does not fit"):
            network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
    network.load_state_dict({"model": saved}.get("model"), strict=False)  # the bundle's own format loads


@pytest.mark.slow
def test_training_as_bundle_train_task_runs_it(label_bundle, small_demo_dir):
    out, model0 = label_bundle
    model_file = os.path.join(out, "models", "model.pt")
    before = load_model_state(model_file)
    # no validation split (MONAI Label's val_split 0 or few labels): the served model is kept by default...
    _run_like_bundle_train_task(out, _datalist(small_demo_dir, "seq_1"), [])
    kept = load_model_state(model_file)
    assert all(torch.equal(before[k], kept[k]) for k in before), "an unvalidated model replaced the served one"
    assert json.load(open(os.path.join(out, "eval", "monailabel_train_result.json")))["served_model"] == "kept"
    # ... and replaced by the final model when the request says replace_unvalidated
    _run_like_bundle_train_task(out, _datalist(small_demo_dir, "seq_1"), [], replace_unvalidated=True)
    after = load_model_state(model_file)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "model.pt was not updated"
    assert glob.glob(os.path.join(out, "eval", "monailabel_embeddings", "*", "*.npy")), "embeddings not kept"
    # with a validation split the served model is scored first; a checkpoint replaces it only if better
    _run_like_bundle_train_task(out, _datalist(small_demo_dir, "seq_1"), _datalist(small_demo_dir, "seq_3")[:2])
    assert set(load_model_state(model_file)) == set(before)


def _auto_iou(bundle_dir, datalist, sam_checkpoint) -> float:
    """Challenge IoU of the bundle's models/model.pt on ``datalist`` under the automatic protocol, on the
    frames' embeddings as the training's validation computes them."""
    from scripts.evaluation.metrics import EndoVisMetric
    from scripts.monailabel_glue.training import DatalistFrameDataset, FrameEmbedder
    from scripts.surgical_sam.inferer import ClassPromptInferer

    network = SurgicalSAM(7, 2, FRAME, "tiny", sam_checkpoint).eval()
    network.load_state_dict(load_model_state(os.path.join(bundle_dir, "models", "model.pt")))
    frames = DatalistFrameDataset(datalist, FrameEmbedder("tiny", sam_checkpoint, FRAME, 7))
    metric, inferer = EndoVisMetric(7), ClassPromptInferer(7, "auto", 0.01, output="label_map")
    for item in frames:
        with torch.no_grad():
            metric.update((inferer(item["image_embeddings"][None], network), item["label"][None]))
    return float(metric.compute()["challenge_iou"])


@pytest.mark.slow
@pytest.mark.parametrize("learning_rate", [1e-3, 1.0])
def test_fine_tuning_never_serves_a_worse_model(label_bundle, small_demo_dir, small_sam_checkpoint, learning_rate):
    """The served model is scored on the validation frames first (automatic protocol); a checkpoint replaces
    it only when it scores higher there, and the result file says which happened. lr 1.0 wrecks the
    network: the served model must come through unchanged."""
    out, _ = label_bundle
    model_file = os.path.join(out, "models", "model.pt")
    train, val = _datalist(small_demo_dir, "seq_1"), _datalist(small_demo_dir, "seq_3")[:3]
    before, iou_before = load_model_state(model_file), _auto_iou(out, val, small_sam_checkpoint)
    _run_like_bundle_train_task(out, train, val, epochs=4, learning_rate=learning_rate, early_stopping_patience=2)
    result = json.load(open(os.path.join(out, "eval", "monailabel_train_result.json")))
    assert result["validation_frames"] == [os.path.basename(v["image"])[:-4] for v in val]
    assert result["baseline"] == pytest.approx(iou_before, abs=1e-6)
    after, iou_after = load_model_state(model_file), _auto_iou(out, val, small_sam_checkpoint)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    if result["served_model"] == "kept":
        assert unchanged and result["best"] == pytest.approx(result["baseline"]) and result["best_epoch"] == 0
    else:
        assert result["served_model"] == "replaced" and not unchanged and result["best_epoch"] > 0
        assert result["best"] > result["baseline"]
        assert iou_after == pytest.approx(result["best"], abs=1e-6)
    assert iou_after >= iou_before
    # early stopping: at most `patience` validations without a better score after the best one
    assert result["epochs_run"] <= max(result["best_epoch"], 0) + 2


def test_validation_of_weight_mixes_sees_the_mixed_weights_and_training_goes_on_from_its_own():
    """After each epoch the validator runs once per mix m on start + m * (tuned - start) (start: the weights
    when training started, after the served model's loader), told which mix; then training goes on from the
    tuned weights, bit for bit. The validation at the start sees the start weights; integer buffers are never
    mixed; a mix outside (0, 1] is refused."""
    from ignite.engine import Engine, Events
    from monai.engines import Evaluator

    from scripts.monailabel_glue.training import OptionalValidationHandler

    network = torch.nn.Linear(3, 2)
    network.register_buffer("steps", torch.zeros((), dtype=torch.long))
    start = {k: v.clone() for k, v in network.state_dict().items()}

    def train_step(_engine, _batch):
        with torch.no_grad():
            network.weight.add_(1.0)
            network.bias.mul_(3.0)
            network.steps.add_(1)

    trainer = Engine(train_step)
    validator = Evaluator("cpu", val_data_loader=[0], iteration_update=lambda engine, batch: None)
    seen = []

    @validator.on(Events.COMPLETED)
    def _record(engine):
        seen.append((engine.state.epoch, engine.weight_mix, {k: v.clone() for k, v in network.state_dict().items()}))

    OptionalValidationHandler(validator, exec_at_start=True, network=network, weight_mixes=[0.25, 1.0]).attach(trainer)
    trainer.run([0], max_epochs=2)
    assert [(epoch, mix) for epoch, mix, _ in seen] == [(0, 1.0), (1, 0.25), (1, 1.0), (2, 0.25), (2, 1.0)]
    assert all(torch.equal(seen[0][2][k], start[k]) for k in start)
    for epoch, mix, weights in seen[1:]:
        tuned = {"weight": start["weight"] + epoch, "bias": start["bias"] * 3.0**epoch}
        for key, value in tuned.items():
            assert torch.allclose(weights[key], start[key] + mix * (value - start[key])), (epoch, mix, key)
        assert int(weights["steps"]) == epoch
    final = network.state_dict()
    assert torch.equal(final["weight"], start["weight"] + 1.0 + 1.0)
    assert torch.equal(final["bias"], start["bias"] * 3.0 * 3.0)
    assert int(final["steps"]) == 2 and validator.weight_mix == 1.0
    for bad in ([0.0, 1.0], [1.5], []):
        with pytest.raises(ValueError, match=r"weight_mixes must be numbers in \(0, 1\]"):
            OptionalValidationHandler(validator, network=network, weight_mixes=bad)


@pytest.mark.slow
def test_training_refuses_a_model_under_another_key(label_bundle, small_demo_dir):
    out, _ = label_bundle
    model_file = os.path.join(out, "models", "model.pt")
    torch.save({"state_dict": load_model_state(model_file)}, model_file)
    with pytest.raises(Exception) as raised:
        _run_like_bundle_train_task(out, _datalist(small_demo_dir, "seq_1"), [])
    assert "does not fit" in _messages(raised.value)


def test_training_without_labels_says_so(label_bundle):
    from scripts.monailabel_glue.training import TrainingDataRefused

    out, _ = label_bundle
    with pytest.raises(TrainingDataRefused, match="no labelled frames"):
        _run_like_bundle_train_task(out, [], [], load=False)


def test_a_label_of_another_size_is_refused_unwrapped(label_bundle, small_demo_dir, tmp_path):
    """Not wrapped in MONAI's "Failed to instantiate component" (MONAI Label's train status shows only the
    last lines of the traceback): the error itself names the frame, both sizes and what to do."""
    import numpy as np
    from PIL import Image

    from scripts.monailabel_glue.training import TrainingDataRefused

    out, _ = label_bundle
    data = _datalist(small_demo_dir, "seq_1")
    os.makedirs(tmp_path / "final")
    data[1]["label"] = str(tmp_path / "final" / (os.path.basename(data[1]["image"])))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(data[1]["label"])
    with pytest.raises(TrainingDataRefused) as raised:
        _run_like_bundle_train_task(out, data, [], load=False)
    image_id = os.path.basename(data[1]["image"])[:-4]
    message = str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert f"label map of frame {image_id} is 10x12 (height x width) but the frame is 64x80" in message
    assert f"PUT /datastore/label?image={image_id}&tag=final" in message, message
