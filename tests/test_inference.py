"""inference.yaml: a folder of frames -> PNG label maps, overlays and NIfTI, through ConfigWorkflow."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_image
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts import BUNDLE_ROOT
from scripts.data.layout import DatasetError
from scripts.data.transforms import list_frames
from scripts.surgical_sam.network import SurgicalSAM

CONFIGS = [os.path.join(BUNDLE_ROOT, "configs", name) for name in ("inference.yaml", "demo_inference.yaml")]


@pytest.fixture
def frames_dir(tmp_path):
    """Frames of two sizes, one grey and one RGBA, in a sub-folder too."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "frames"
    (folder / "seq_1").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "seq_1" / "a.png")
    Image.fromarray(rng.integers(0, 255, (48, 96), dtype=np.uint8)).save(folder / "b_grey.png")
    Image.fromarray(rng.integers(0, 255, (64, 80, 4), dtype=np.uint8)).save(folder / "c_rgba.png")
    return str(folder)


@pytest.fixture
def model_file(tmp_path, tiny_sam_checkpoint):
    torch.manual_seed(1)
    model = SurgicalSAM(7, 2, (64, 80), "tiny", tiny_sam_checkpoint)
    path = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), path)
    return path


def run_inference(frames_dir, output_dir, model_file, sam_checkpoint, **overrides):
    workflow = ConfigWorkflow(
        config_file=CONFIGS,
        workflow_type="infer",
        logging_file=None,
        meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
        dataset_dir=frames_dir,
        output_dir=output_dir,
        model_file=model_file,
        sam_checkpoint=sam_checkpoint,
        device="cpu",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_inference_writes_label_maps_overlays_and_nifti(tmp_path, frames_dir, model_file, tiny_sam_checkpoint):
    output_dir = str(tmp_path / "out")
    run_inference(frames_dir, output_dir, model_file, tiny_sam_checkpoint, write_nifti=True)
    expected = {"seq_1/a": (64, 80), "b_grey": (48, 96), "c_rgba": (64, 80)}
    for stem, size in expected.items():
        label_map = np.array(Image.open(os.path.join(output_dir, f"{stem}_seg.png")))
        assert label_map.shape == size and label_map.dtype == np.uint8
        assert label_map.max() <= 7
        overlay = np.array(Image.open(os.path.join(output_dir, f"{stem}_overlay.png")))
        assert overlay.shape == (*size, 3)
        volume = np.asarray(nib.load(os.path.join(output_dir, f"{stem}_seg.nii.gz")).dataobj)
        np.testing.assert_array_equal(volume, label_map)


def test_inference_equals_the_network_called_directly(tmp_path, frames_dir, model_file, tiny_sam_checkpoint):
    """The written label map is the automatic-protocol merge of the network's own masks."""
    output_dir = str(tmp_path / "out")
    run_inference(frames_dir, output_dir, model_file, tiny_sam_checkpoint)
    model = SurgicalSAM(7, 2, (64, 80), "tiny", tiny_sam_checkpoint, with_image_encoder=True)
    model.load_state_dict(torch.load(model_file))
    frame = torch.from_numpy(np.array(Image.open(os.path.join(frames_dir, "seq_1", "a.png")))).permute(2, 0, 1)
    with torch.no_grad():
        logits, quality = model.predict_classes(frame[None].float(), torch.ones(1, 7, dtype=torch.bool))
    expected = torch.zeros(64, 80, dtype=torch.long)
    min_pixels = math.ceil(0.01 * 64 * 80)  # inference.yaml's min_mask_fraction
    for class_index in torch.argsort(quality[0], stable=True).tolist():
        mask = logits[0, class_index] > 0
        if mask.sum() >= min_pixels:
            expected[mask] = class_index + 1
    written = np.array(Image.open(os.path.join(output_dir, "seq_1", "a_seg.png")))
    np.testing.assert_array_equal(written, expected.numpy())


def test_inference_rejects_a_checkpoint_of_another_configuration(tmp_path, frames_dir, tiny_sam_checkpoint):
    model = SurgicalSAM(5, 2, (64, 80), "tiny", tiny_sam_checkpoint)
    path = str(tmp_path / "other.pt")
    torch.save(model.state_dict(), path)
    with pytest.raises(Exception) as error:
        run_inference(frames_dir, str(tmp_path / "out"), path, tiny_sam_checkpoint)
    chain, cause = [], error.value
    while cause is not None:  # MONAI wraps the network's error in its config-expression error
        chain.append(str(cause))
        cause = cause.__cause__
    assert any("does not fit this network" in message for message in chain), chain
    assert not os.path.exists(tmp_path / "out")


def test_empty_or_missing_frame_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_frames(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no frames"):
        list_frames(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------- amp (opt-in)
def test_autocast_inferer_is_the_plain_call_without_amp_and_float32_with_it():
    from monai.inferers import SimpleInferer

    from scripts.engine.inferers import AutocastInferer
    from scripts.surgical_sam.inferer import ClassPromptInferer

    torch.manual_seed(0)
    model = SurgicalSAM(3, 2, (64, 80), sam_variant="tiny").eval()
    image = 0.5 * torch.randn(2, 256, 16, 16, generator=torch.Generator().manual_seed(1))
    class_ids = torch.tensor([1, 3])
    with torch.no_grad():
        plain = SimpleInferer()(image, model, class_ids=class_ids)
        same = AutocastInferer(amp=False)(image, model, class_ids=class_ids)
        mixed = AutocastInferer(amp=True)(image, model, class_ids=class_ids)
        for key in ("logits", "quality"):
            assert torch.equal(same[key], plain[key])
            assert mixed[key].dtype == torch.float32
        assert not torch.equal(mixed["logits"], plain["logits"])  # autocast really ran
        # bf16 keeps about 3 significant digits: the masks mostly agree
        assert ((mixed["logits"] > 0) == (plain["logits"] > 0)).float().mean() > 0.9
        label_map = ClassPromptInferer(3, protocol="auto", output="label_map", amp=True)(image, model)
        assert label_map.shape == (2, 1, 64, 80) and label_map.dtype == torch.long


def test_uncertainty_margin_is_zero_on_the_presence_threshold(small_sam_checkpoint):
    """ClassPromptInferer.uncertainty: the presence margin of each class is |pixels - min_pixels| / min_pixels,
    a threshold set to one class's mask size gives that frame margin 0, and the classes it calls present
    and their lowest quality are those of the automatic protocol itself."""
    from scripts.surgical_sam.inferer import ClassPromptInferer

    torch.manual_seed(0)
    network = SurgicalSAM(7, 2, (64, 80), "tiny", small_sam_checkpoint, with_image_encoder=True).eval()
    frames = torch.rand(2, 3, 64, 80) * 255
    with torch.no_grad():
        pixels = ClassPromptInferer(7, "auto", 0.0).uncertainty(frames, network)["pixels"]
        target = int(pixels[0][pixels[0] > 0].min()) if (pixels[0] > 0).any() else 1
        inferer = ClassPromptInferer(7, "auto", (target - 0.5) / (64 * 80))
        found = inferer.uncertainty(frames, network)
        protocol = inferer(frames, network)
    assert int(found["min_pixels"]) == target
    margins = (found["pixels"] - target).abs().float() / target
    torch.testing.assert_close(found["presence_margin"], margins.min(1).values)
    assert float(found["presence_margin"][0]) == 0.0
    quality = protocol["quality"].float().masked_fill(~protocol["present"], math.inf).min(1).values
    torch.testing.assert_close(found["min_quality"], quality)


# --------------------------------------------------------------- unreadable frames and the frame crop
def test_inference_writes_every_readable_frame_and_names_the_bad_ones(tmp_path, model_file, tiny_sam_checkpoint):
    from scripts.engine.handlers import UnreadableFramesError

    rng = np.random.default_rng(0)
    frames = tmp_path / "frames"
    for name in ("a.png", "c.png", "e.png"):
        write_image(frames / name, rng.integers(0, 255, (64, 80, 3)))
    (frames / "b.png").write_bytes((frames / "a.png").read_bytes()[:70])  # truncated
    (frames / "d.jpg").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(Exception) as error:
        run_inference(str(frames), str(out), model_file, tiny_sam_checkpoint)
    cause = error.value
    while cause is not None and not isinstance(cause, UnreadableFramesError):  # MONAI wraps it in its expression's
        cause = cause.__cause__
    assert cause is not None, error.value
    assert sorted(p.name for p in out.glob("*_seg.png")) == ["a_seg.png", "c_seg.png", "e_seg.png"]
    message = str(cause)
    assert "2 of 5 frame(s)" in message and str(frames / "b.png") in message and str(frames / "d.jpg") in message
    assert "dataset.json" not in message and "move it out of the frame folder" in message


def test_inference_exits_non_zero_after_writing_the_other_frames(tmp_path, model_file, tiny_sam_checkpoint):
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
        str(CONFIGS),
        "--dataset_dir",
        str(frames),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_file",
        model_file,
        "--sam_checkpoint",
        tiny_sam_checkpoint,
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": BUNDLE_ROOT}
    )
    assert result.returncode != 0
    assert "1 of 2 frame(s)" in result.stderr + result.stdout and str(frames / "bad.png") in result.stderr
    assert (tmp_path / "out" / "good_seg.png").is_file()


def test_inference_frame_crop_segments_only_the_window(tmp_path, model_file, tiny_sam_checkpoint):
    """frame_crop: the window alone is segmented, as the frame cropped beforehand would be; the label map keeps
    the raw frame's size with background outside the window."""
    rng = np.random.default_rng(3)
    raw = np.zeros((80, 100, 3), np.uint8)  # black borders around a 64x80 camera image
    window = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
    raw[6:70, 12:92] = window
    write_image(tmp_path / "raw" / "f.png", raw)
    write_image(tmp_path / "cropped" / "f.png", window)
    run_inference(
        str(tmp_path / "raw"),
        str(tmp_path / "out_raw"),
        model_file,
        tiny_sam_checkpoint,
        frame_crop=[[6, 70], [12, 92]],
    )
    run_inference(str(tmp_path / "cropped"), str(tmp_path / "out_cropped"), model_file, tiny_sam_checkpoint)
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


def test_frame_crop_in_the_monailabel_seam(tmp_path):
    """What MONAI Label's BundleInferTask runs (preprocessing, then postprocessing on the inferer's label map)
    with a crop overlay: the frame is cropped and the returned mask has the whole frame's size, (W, H)."""
    import torch
    from monai.bundle import ConfigParser

    overlay = tmp_path / "crop.yaml"
    overlay.write_text("frame_crop: [[2, 10], [3, 15]]\n")
    parser = ConfigParser()
    parser.read_config([CONFIGS[0], str(overlay)])
    write_image(tmp_path / "f.png", np.full((12, 20, 3), 9))
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "f.png")})
    assert tuple(data["image"].shape) == (3, 8, 12)
    data["pred"] = torch.full((1, 8, 12), 3, dtype=torch.long)
    mask = parser.get_parsed_content("postprocessing")(data)["pred"]
    assert tuple(mask.shape) == (20, 12)  # (W, H), MONAI's order for 2D images
    expected = np.zeros((12, 20), np.uint8)
    expected[2:10, 3:15] = 3
    np.testing.assert_array_equal(mask.numpy().T, expected)
