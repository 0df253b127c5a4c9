"""Video in, label maps / JSON / overlay video out (the overlay inference_video.yaml's `run`), temporal consistency,
the demo video, and the ONNX Runtime backend: on a small video the tests make from demo frames."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import zipfile

import av
import numpy as np
import pytest
import torch
from conftest import META_FILE, SMALL_DEMO
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts import BUNDLE_ROOT
from scripts.data.frame_files import read_frame
from scripts.data.layout import DatasetError
from scripts.data.video_io import VideoError, legend_panel, open_sequence, write_video
from scripts.deploy.temporal import TemporalPresence
from scripts.distillation_sam.network import DistillationSAM
from scripts.measurement.temporal_measures import class_switches, evaluate_temporal
from scripts.surgical_sam.inferer import ClassPromptInferer
from scripts.surgical_sam.network import SurgicalSAM

pytestmark = pytest.mark.usefixtures("restore_root_logging")

CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
INFERENCE = [os.path.join(CONFIGS, name) for name in ("inference.yaml", "demo_inference.yaml")]
VIDEO = [os.path.join(CONFIGS, name) for name in ("inference.yaml", "inference_video.yaml", "demo_inference.yaml")]
VIDEO_ONNX = [
    os.path.join(CONFIGS, name)
    for name in ("inference.yaml", "inference_video.yaml", "inference_video_onnx.yaml", "demo_inference.yaml")
]
VIDEO_DISTILL = [
    os.path.join(CONFIGS, name)
    for name in ("inference.yaml", "inference_video.yaml", "inference_distill.yaml", "demo_inference.yaml")
]
EXPORT_ONNX = [os.path.join(CONFIGS, name) for name in ("inference.yaml", "export_onnx.yaml", "demo_inference.yaml")]
FPS = 8
FRAME_SIZE = list(SMALL_DEMO["frame_size"])


def demo_frames(demo_dir: str) -> list[np.ndarray]:
    """Every frame of the small demo's sequences, in order (4 sequences of 4 frames: 64x80)."""
    return [read_frame(path) for path in sorted(glob.glob(os.path.join(demo_dir, "images", "*", "*.png")))]


NUM_FRAMES = 6


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, small_demo_dir):
    """A 6-frame H.264 mp4 of demo frames at 8 frames/s."""
    frames = demo_frames(small_demo_dir)[:NUM_FRAMES]
    return write_video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), frames, FPS)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, small_sam_checkpoint):
    torch.manual_seed(1)
    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    torch.save({"model": model.state_dict()}, path)
    return path


def video_workflow(configs, run_id: str, model_file, sam_checkpoint, **overrides) -> ConfigWorkflow:
    """The initialized workflow ``run_id`` of ``configs`` with the test model, on the CPU at the test frame size."""
    workflow = ConfigWorkflow(
        config_file=configs,
        workflow_type=None,
        run_id=run_id,
        meta_file=META_FILE,
        logging_file=None,
        model_file=model_file,
        sam_checkpoint=sam_checkpoint,
        frame_size=FRAME_SIZE,
        device="cpu",
        **overrides,
    )
    workflow.initialize()
    return workflow


def run_video(source, output_dir, model_file, sam_checkpoint, configs=VIDEO, run_id="run", **overrides) -> dict:
    workflow = video_workflow(
        configs, run_id, model_file, sam_checkpoint, dataset_dir=str(source), output_dir=str(output_dir), **overrides
    )
    workflow.run()
    workflow.finalize()
    with open(os.path.join(output_dir, "summary.json")) as handle:
        return json.load(handle)


def video_error(run, match: str) -> VideoError:
    """The VideoError that ``run()`` raises (MONAI's config evaluation chains it under a RuntimeError)."""
    with pytest.raises((VideoError, RuntimeError)) as caught:
        run()
    error = caught.value
    while not isinstance(error, VideoError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, VideoError), f"not a VideoError: {caught.value!r}"
    assert re.search(match, str(error)), str(error)
    return error


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, video_file, model_file, small_sam_checkpoint):
    """The output folder of the video overlay's `run` on the test video (read-only; tests that change it copy it)."""
    out = tmp_path_factory.mktemp("video_run") / "out"
    run_video(video_file, out, model_file, small_sam_checkpoint)
    return out


@pytest.fixture(scope="module")
def reference(video_file, model_file, small_sam_checkpoint):
    return reference_label_maps(video_file, model_file, small_sam_checkpoint)


def label_maps(output_dir) -> dict[int, np.ndarray]:
    return {
        int(os.path.basename(p)[:-4]): np.asarray(Image.open(p))
        for p in sorted(glob.glob(os.path.join(output_dir, "labels", "*.png")))
    }


def reference_label_maps(video, model_file, sam_checkpoint, **inferer_kwargs) -> list[np.ndarray]:
    """The automatic protocol frame by frame (the evaluator's inferer) on the decoded frames."""
    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", sam_checkpoint, with_image_encoder=True).eval()
    model.load_state_dict(torch.load(model_file, weights_only=True)["model"])
    inferer = ClassPromptInferer(7, "auto", 0.01, output="label_map", **inferer_kwargs)
    with torch.no_grad():
        return [
            inferer(torch.from_numpy(f.image).permute(2, 0, 1)[None].float(), model)[0, 0].numpy()
            for f in open_sequence(video)
        ]


# ------------------------------------------------------------------------------------------ reading
def test_sequence_reads_every_frame_stride_and_time_range(tmp_path, small_demo_dir):
    frames = demo_frames(small_demo_dir)
    video = write_video(str(tmp_path / "all.mp4"), frames, FPS)
    sequence = open_sequence(video)
    decoded = list(sequence)
    assert sequence.fps == FPS and len(decoded) == len(frames) == sequence.expected_frames()
    assert [f.index for f in decoded] == list(range(len(frames)))
    assert np.abs(decoded[5].image.astype(int) - frames[5]).mean() < 8  # H.264: close to the frame, not equal
    part = open_sequence(video, stride=3, start_time=0.5, end_time=1.5)  # frames 4..11 at 8 fps
    assert [f.index for f in part] == [6, 9] and part.expected_frames() == 2


def test_folder_of_frames_is_one_sequence(small_demo_dir):
    folder = os.path.join(small_demo_dir, "images")
    sequence = open_sequence(folder, folder_fps=5)
    frames = list(sequence)
    assert len(frames) == len(demo_frames(small_demo_dir)) and frames[3].time == pytest.approx(0.6)


@pytest.mark.parametrize("suffix", [".mkv", ".avi", ".mov"])
def test_other_containers(tmp_path, small_demo_dir, suffix):
    frames = demo_frames(small_demo_dir)[:6]
    sequence = open_sequence(write_video(str(tmp_path / f"clip{suffix}"), frames, FPS))
    assert len(list(sequence)) == 6 == sequence.expected_frames()


def test_unreadable_sources_are_clear_errors(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(VideoError, match="cannot open video .*re-encode"):
        open_sequence(str(tmp_path / "noise.mp4"))
    with pytest.raises(VideoError, match="does not exist"):
        open_sequence(str(tmp_path / "missing.mp4"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VideoError, match="not a video file"):
        open_sequence(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="stride"):
        open_sequence(str(tmp_path), stride=0)


def test_legend_has_a_swatch_per_class():
    panel = legend_panel(["a", "bb", "ccc"], 60)
    assert panel.shape[0] == 60 and panel.shape[1] % 2 == 0
    assert panel[:, :20].reshape(-1, 3).max(0).tolist() != [0, 0, 0]


# ------------------------------------------------------------------------------------ video inference
@pytest.mark.slow
def test_video_inference_outputs_equal_frame_by_frame_inference(video_run, reference):
    out = video_run
    with open(out / "summary.json") as handle:
        summary = json.load(handle)
    written = label_maps(out)
    assert summary["complete"] and summary["frames_written"] == len(reference) and summary["fps"] == FPS
    assert sorted(written) == list(range(len(reference)))
    for index, expected in enumerate(reference):
        np.testing.assert_array_equal(written[index], expected)
        with open(out / "frames" / f"{index:06d}.json") as handle:
            record = json.load(handle)
        present = sorted(int(c) for c in np.unique(expected) if c)
        assert record["index"] == index and [c["id"] for c in record["classes"]] == present
        for item in record["classes"]:
            assert item["area"] == pytest.approx(float((expected == item["id"]).mean()), abs=1e-6)
            assert item["name"] and np.isfinite(item["quality"])
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == FPS and stream.frames == len(reference)
        assert stream.height == FRAME_SIZE[0] and stream.width > FRAME_SIZE[1]  # the legend beside the frame


@pytest.mark.slow
def test_video_inference_resumes_and_keeps_what_was_written(
    tmp_path, video_run, video_file, model_file, small_sam_checkpoint
):
    out = tmp_path / "out"
    shutil.copytree(video_run, out)
    first = label_maps(out)
    os.remove(out / "frames" / "000003.json")  # as if the run had stopped before finishing frames 3 and 5
    os.remove(out / "labels" / "000005.png")
    marker = Image.fromarray(np.full(FRAME_SIZE, 9, np.uint8))
    marker.save(out / "labels" / "000001.png")  # a frame already written is not segmented again
    summary = run_video(video_file, out, model_file, small_sam_checkpoint)
    assert summary["frames_written"] == 2 and summary["frames_skipped"] == len(first) - 2
    second = label_maps(out)
    assert (second[1] == 9).all()
    for index in (3, 5):
        np.testing.assert_array_equal(second[index], first[index])


@pytest.mark.slow
def test_npz_stack_holds_the_same_label_maps(tmp_path, video_run, video_file, model_file, small_sam_checkpoint):
    run_video(
        video_file,
        tmp_path / "npz",
        model_file,
        small_sam_checkpoint,
        label_format="npz",
        write_overlay_video=False,
        frame_stride=2,
    )
    assert not os.path.exists(tmp_path / "npz" / "overlay.mp4") and not os.path.exists(tmp_path / "npz" / "labels")
    with np.load(tmp_path / "npz" / "labels.npz") as stack:
        assert sorted(stack.files) == [f"{i:06d}" for i in range(0, NUM_FRAMES, 2)]
        for name in stack.files:
            np.testing.assert_array_equal(stack[name], label_maps(video_run)[int(name)])


@pytest.mark.slow
def test_corrupt_and_truncated_videos_keep_what_was_written(
    tmp_path, video_run, video_file, model_file, small_sam_checkpoint, small_demo_dir
):
    out = tmp_path / "out"
    shutil.copytree(video_run, out)
    before = label_maps(out)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 64 + open(video_file, "rb").read()[64:])
    video_error(lambda: run_video(corrupt, out, model_file, small_sam_checkpoint), "cannot open video .*re-encode")
    assert {k: v.tobytes() for k, v in label_maps(out).items()} == {k: v.tobytes() for k, v in before.items()}

    # a 12-frame video cut at 60%: its first frames decode, then the file ends (segmented every 3rd frame)
    data = open(write_video(str(tmp_path / "full.mp4"), demo_frames(small_demo_dir), FPS), "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    cut = tmp_path / "cut"
    video_error(
        lambda: run_video(truncated, cut, model_file, small_sam_checkpoint, frame_stride=3), "ends early: .*kept"
    )
    decoded = []
    with pytest.raises(VideoError):
        for frame in open_sequence(str(truncated), stride=3):
            decoded.append(frame)
    written = label_maps(cut)
    assert 0 < len(written) == len(decoded) < 4 and sorted(written) == [f.index for f in decoded]
    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint, with_image_encoder=True).eval()
    model.load_state_dict(torch.load(model_file, weights_only=True)["model"])
    inferer = ClassPromptInferer(7, "auto", 0.01, output="label_map")
    for frame in decoded:
        with torch.no_grad():
            expected = inferer(torch.from_numpy(frame.image).permute(2, 0, 1)[None].float(), model)[0, 0].numpy()
        np.testing.assert_array_equal(written[frame.index], expected)
    with open(cut / "summary.json") as handle:
        summary = json.load(handle)
    assert not summary["complete"] and "ends early" in summary["error"]
    with av.open(str(cut / "overlay.mp4")) as container:  # closed, playable, with the decoded frames
        assert container.streams.video[0].frames == len(written)


def damaged_in_the_middle(path: str, damaged: str) -> int:
    """Copy the video at ``path`` with the second half of its middle packet zeroed (a damaged disk sector, or a
    copy that lost bytes); -> the display index of the damaged frame (by presentation time)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size, p.pts) for p in container.demux(stream) if p.size]
        times = sorted(pts for _, _, pts in packets)
    position, size, pts = packets[len(packets) // 2]
    data = bytearray(open(path, "rb").read())
    data[position + size // 2 : position + size] = bytes(size - size // 2)
    open(damaged, "wb").write(data)
    return times.index(pts)


def test_video_damaged_mid_file_names_its_damaged_frames_and_is_not_complete(
    tmp_path, model_file, small_sam_checkpoint, small_demo_dir
):
    """The decoder's errors are counted and named (frame index and time); those frames are not segmented (no
    garbage label maps), the others are, and the run ends with an error (non-zero exit) and complete: false."""
    full = write_video(str(tmp_path / "full.mp4"), demo_frames(small_demo_dir), FPS)
    damaged = str(tmp_path / "damaged.mp4")
    index = damaged_in_the_middle(full, damaged)
    out = tmp_path / "out"
    video_error(
        lambda: run_video(damaged, out, model_file, small_sam_checkpoint),
        rf"1 damaged frame.*{index} \(at {index / FPS:.3f} s\)",
    )
    with open(out / "summary.json") as handle:
        summary = json.load(handle)
    assert summary["complete"] is False and summary["decode_errors"] == 1
    assert summary["damaged_frames"] == [{"index": index, "time": round(index / FPS, 6)}]
    written = label_maps(out)
    assert index not in written and len(written) == len(demo_frames(small_demo_dir)) - 1
    assert summary["frames_written"] == len(written)


def test_plain_run_on_a_video_file_says_it_is_a_video(tmp_path, video_file):
    """`run` segments a folder of frames; given a video it names the video overlay instead of a missing folder."""
    from scripts.data.transforms import list_frames

    with pytest.raises(DatasetError, match=r"is a video file.*inference_video.yaml") as error:
        list_frames(video_file)
    assert "does not exist" not in str(error.value)


@pytest.mark.parametrize("run_id, overlay", [("video", "inference_video.yaml"), ("export_onnx", "export_onnx.yaml")])
def test_the_old_run_ids_of_inference_yaml_name_their_overlay(run_id, overlay, model_file, small_sam_checkpoint):
    """`run video` / `run export_onnx` on inference.yaml alone (the command lines of earlier versions) stop with a
    user error naming the overlay that now holds the workflow."""
    from scripts.errors import WorkflowMovedError, user_error_in

    workflow = video_workflow(INFERENCE, run_id, model_file, small_sam_checkpoint)
    with pytest.raises(Exception) as caught:
        workflow.run()
    found = user_error_in(caught.value)
    assert isinstance(found, WorkflowMovedError) and overlay in str(found), repr(caught.value)


def test_the_workflow_overlays_keep_the_old_run_ids():
    """With its overlay merged, `run video` / `run export_onnx` run what the overlay's `run` runs."""
    from monai.bundle import ConfigParser

    for configs, old in ((VIDEO, "video"), (EXPORT_ONNX, "export_onnx")):
        parser = ConfigParser()
        parser.read_config(configs)
        assert parser[old] == parser["run"], old


def test_the_onnx_video_overlay_builds_no_torch_network():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(VIDEO_ONNX)
    assert parser["backend"] == "onnxruntime" and parser.get_parsed_content("video_network") is None
    parser = ConfigParser()
    parser.read_config(VIDEO)
    assert parser["backend"] == "torch" and parser["video_network"] == "@network"


@pytest.mark.slow
def test_distillation_video_inference(tmp_path, video_file, small_sam_checkpoint):
    torch.manual_seed(0)
    model = DistillationSAM(
        7,
        FRAME_SIZE,
        sam_variant="tiny",
        sam_checkpoint=small_sam_checkpoint,
        pvt={"embed_dims": [32, 64, 160, 256]},
        pvt_input_size=64,
    )
    torch.save({"model": model.state_dict()}, tmp_path / "distill.pt")
    summary = run_video(
        video_file,
        tmp_path / "out",
        str(tmp_path / "distill.pt"),
        small_sam_checkpoint,
        configs=VIDEO_DISTILL,
        pvt={"embed_dims": [32, 64, 160, 256]},
        pvt_input_size=64,
        frame_stride=4,
    )
    assert summary["complete"] and summary["frames_written"] == 2
    model.eval()
    frame = next(iter(open_sequence(video_file)))
    with torch.no_grad():
        expected = model(torch.from_numpy(frame.image).permute(2, 0, 1)[None].float())["label_map"][0].numpy()
    np.testing.assert_array_equal(label_maps(tmp_path / "out")[0], expected)


# --------------------------------------------------------------------------------- temporal consistency
def test_temporal_defaults_are_the_frame_by_frame_rule():
    masks = torch.rand(12, 5, 16, 20) > torch.linspace(0.9, 1.0, 5)[None, :, None, None]
    rule = TemporalPresence(5, on_fraction=0.05, off_fraction=0.05, min_run=1)
    frame_rule = masks.flatten(2).sum(-1) >= int(np.ceil(0.05 * 16 * 20))
    assert torch.equal(rule(masks), frame_rule)
    assert frame_rule.any() and not frame_rule.all()


def test_temporal_hysteresis_and_minimum_run():
    area = 100
    pixels = torch.tensor([[0], [20], [20], [8], [3], [20], [3], [3], [3]])
    hysteresis = TemporalPresence(1, on_fraction=0.1, off_fraction=0.05, min_run=1)
    assert hysteresis.update_counts(pixels, area)[:, 0].tolist() == [0, 1, 1, 1, 0, 1, 0, 0, 0]
    debounced = TemporalPresence(1, on_fraction=0.1, off_fraction=0.05, min_run=2)
    assert debounced.update_counts(pixels, area)[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="off_fraction <= on_fraction"):
        TemporalPresence(1, on_fraction=0.1, off_fraction=0.2)


def test_class_switches_count_appearances_and_disappearances():
    maps = [torch.tensor([[0, 1]]), torch.tensor([[2, 1]]), torch.tensor([[0, 0]]), torch.tensor([[0, 0]])]
    assert class_switches(maps, 2) == 3


@pytest.mark.slow
def test_temporal_video_inference_and_evaluation(
    tmp_path, video_file, model_file, small_sam_checkpoint, small_demo_dir
):
    """The video run's temporal rule is the evaluation's (and the inferer's) on the same frames."""
    summary = run_video(
        video_file, tmp_path / "out", model_file, small_sam_checkpoint, temporal_min_run=2, temporal_off_fraction=0.002
    )
    assert summary["temporal"] == {"on_fraction": 0.01, "off_fraction": 0.002, "min_run": 2}
    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint, with_image_encoder=True).eval()
    model.load_state_dict(torch.load(model_file, weights_only=True)["model"])
    rule = TemporalPresence(7, 0.01, 0.002, 2)
    inferer = ClassPromptInferer(7, "auto", 0.01, output="label_map")
    with torch.no_grad():
        expected = [
            inferer(torch.from_numpy(f.image).permute(2, 0, 1)[None].float(), model, temporal=rule)[0, 0]
            for f in open_sequence(video_file)
        ]
    written = label_maps(tmp_path / "out")
    for index, label_map in enumerate(expected):
        np.testing.assert_array_equal(written[index], label_map.numpy())
    results = evaluate_temporal(
        model, small_demo_dir, {"frame": TemporalPresence(7, 0.01), "temporal": TemporalPresence(7, 0.01, 0.002, 2)}
    )
    assert results["frame"]["frames"] == SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]
    for result in results.values():
        assert set(result) >= {"iou", "challenge_iou", "switches_per_100_frames"}


# -------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, model_file, small_sam_checkpoint):
    """models/ with the test model and its ONNX export."""
    from scripts.deploy.onnx_backend import export_model_file

    ckpt_dir = tmp_path_factory.mktemp("onnx_models")
    shutil.copy(model_file, ckpt_dir / "model.pt")
    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint, with_image_encoder=True)
    export_model_file(model, str(ckpt_dir / "model.pt"), str(ckpt_dir / "onnx"), "tiny", [f"c{i}" for i in range(7)])
    return ckpt_dir


def test_onnx_export_is_two_graphs_with_dynamic_batch(onnx_export):
    import onnx

    manifest = json.loads((onnx_export / "onnx" / "onnx.json").read_text())
    assert manifest["num_classes"] == 7 and manifest["sam_variant"] == "tiny" and manifest["class_names"][6] == "c6"
    encoder = onnx.load(str(onnx_export / "onnx" / "image_encoder.onnx"))
    decoder = onnx.load(str(onnx_export / "onnx" / "class_decoder.onnx"))
    assert [i.name for i in encoder.graph.input] == ["sam_input"]
    assert [i.name for i in decoder.graph.input] == ["image_embeddings", "class_ids"]
    assert encoder.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "frames"
    assert decoder.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "pairs"


def test_onnx_runtime_matches_torch(onnx_export, model_file, small_sam_checkpoint, small_demo_dir):
    from scripts.deploy.onnx_backend import OnnxSurgicalSAM
    from scripts.measurement.backend_comparison import agreement_failures, compare_backends

    model = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint, with_image_encoder=True).eval()
    model.load_state_dict(torch.load(model_file, weights_only=True)["model"])
    onnx_model = OnnxSurgicalSAM(str(onnx_export / "onnx"))
    frames = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() for f in demo_frames(small_demo_dir)[:2]])
    inferer = ClassPromptInferer(7, "auto", 0.01, output="label_map")
    # a batch of 2 frames (14 pairs in one decoder call) and a frame of another size, same graphs
    for batch in (frames, torch.nn.functional.interpolate(frames[:1], size=(50, 96))):
        result = compare_backends(model, onnx_model, batch, inferer, reference=True)
        assert result["max_abs_logit_difference"] < 1e-3 and result["max_abs_quality_difference"] < 1e-3
        assert result["equal_label_pixels"] >= 0.999
        assert agreement_failures(result) == []
        # the float64 reference: both float32 paths are near it, neither is it
        assert 0 < result["torch_float64_max_error"] < 1e-3 and 0 < result["onnx_float64_max_error"] < 1e-3


def test_onnx_agreement_checks_fail_on_another_network(onnx_export, small_sam_checkpoint, small_demo_dir):
    """The export of one network against another torch network (an export that computes something else): the
    logit, encoder and float64-reference checks all fail."""
    from scripts.deploy.onnx_backend import OnnxSurgicalSAM
    from scripts.measurement.backend_comparison import agreement_failures, compare_backends

    torch.manual_seed(2)
    other = SurgicalSAM(7, 2, FRAME_SIZE, "tiny", small_sam_checkpoint, with_image_encoder=True).eval()
    with torch.no_grad():
        other.image_encoder.neck[-1].weight.mul_(1.001)  # the encoder's last LayerNorm2d scale, 0.1% off
    frames = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() for f in demo_frames(small_demo_dir)[:1]])
    result = compare_backends(
        other,
        OnnxSurgicalSAM(str(onnx_export / "onnx")),
        frames,
        ClassPromptInferer(7, "auto", 0.01, output="label_map"),
        reference=True,
    )
    failures = agreement_failures(result)
    assert any(f.startswith("encoder") for f in failures), failures
    assert any("float64" in f for f in failures), failures


@pytest.mark.slow
def test_export_workflow_and_onnx_backend_video_inference(
    tmp_path, model_file, video_run, video_file, small_sam_checkpoint
):
    """export_onnx.yaml's `run`, then the video overlay with inference_video_onnx.yaml (ONNX Runtime): the torch run's
    label maps, with no SAM checkpoint to read."""
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    shutil.copy(model_file, ckpt_dir / "model.pt")
    workflow = ConfigWorkflow(
        config_file=EXPORT_ONNX,
        workflow_type=None,
        run_id="run",
        meta_file=META_FILE,
        logging_file=None,
        ckpt_dir=str(ckpt_dir),
        sam_checkpoint=small_sam_checkpoint,
        frame_size=FRAME_SIZE,
        device="cpu",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert json.loads((ckpt_dir / "onnx" / "onnx.json").read_text())["class_names"][0] == "Bipolar Forceps"
    summary = run_video(
        video_file,
        tmp_path / "out",
        str(ckpt_dir / "model.pt"),
        str(tmp_path / "no_sam_weights.pth"),
        configs=VIDEO_ONNX,
        ckpt_dir=str(ckpt_dir),
        write_overlay_video=False,
    )
    assert summary["backend"] == "onnxruntime" and summary["frames_written"] == NUM_FRAMES
    torch_maps, onnx_maps = label_maps(video_run), label_maps(tmp_path / "out")
    equal = np.mean([np.mean(torch_maps[i] == onnx_maps[i]) for i in torch_maps])
    assert equal >= 0.999


def test_pack_with_onnx_holds_the_graphs_and_checks_them(tmp_path, onnx_export):
    from conftest import bundle_copy_ignore

    from scripts.cli import pack

    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, root, ignore=bundle_copy_ignore(BUNDLE_ROOT))
    shutil.rmtree(root / "models" / "onnx", ignore_errors=True)  # a checkout's own export, if it has one
    shutil.copytree(onnx_export / "onnx", root / "models" / "onnx")
    with zipfile.ZipFile(pack(str(tmp_path / "zip"), str(root), with_onnx=True)) as archive:
        inside = {name.split("/", 1)[1] for name in archive.namelist()}
        metadata = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("configs/metadata.json"))))
    described = {graph["file"] for graph in metadata["onnx_export"]["graphs"].values()}
    assert described | {"models/onnx/onnx.json"} <= inside
    with zipfile.ZipFile(pack(str(tmp_path / "zip2"), str(root))) as archive:
        assert not [n for n in archive.namelist() if "/models/onnx/" in n]
    with open(root / "models" / "onnx" / "class_decoder.onnx", "ab") as handle:
        handle.write(b"changed")
    with pytest.raises(SystemExit, match="differs"):
        pack(str(tmp_path / "zip3"), str(root), with_onnx=True)


# ---------------------------------------------------------------------------------------- video demo
def test_demo_video_is_the_held_out_sequences(tmp_path, small_demo_dir):
    from scripts.data.demo.video import ensure_demo_video

    demo = tmp_path / "demo"
    shutil.copytree(small_demo_dir, demo)
    path = ensure_demo_video(str(demo))
    assert path == str(demo / "videos" / "validation.mp4")
    sequence = open_sequence(path)
    assert len(list(sequence)) == SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]
    assert ensure_demo_video(str(demo)) == path  # made once
    with pytest.raises(Exception, match="no demo dataset"):
        ensure_demo_video(str(tmp_path / "empty"))


def test_demo_video_command_writes_the_overlay_video(tmp_path, small_demo_dir, model_file, small_sam_checkpoint):
    """The documented video demo command (inference + demo_inference + demo_video.yaml): it makes the demo video
    and segments it into an overlay video of every held-out frame."""
    demo = tmp_path / "demo"
    shutil.copytree(small_demo_dir, demo)
    out = tmp_path / "video"
    workflow = ConfigWorkflow(
        config_file=VIDEO + [os.path.join(CONFIGS, "demo_video.yaml")],
        workflow_type=None,
        run_id="run",
        meta_file=META_FILE,
        logging_file=None,
        demo_dir=str(demo),
        output_dir=str(out),
        model_file=model_file,
        sam_checkpoint=small_sam_checkpoint,
        frame_size=FRAME_SIZE,
        device="cpu",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    held_out = SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["frames_written"] == held_out
    assert len(list(open_sequence(str(out / "overlay.mp4")))) == held_out
    assert label_maps(out).keys() == set(range(held_out))


def test_video_measures_commands_write_the_model_card_tables(
    tmp_path, onnx_export, small_demo_dir, small_sam_checkpoint
):
    """video_measures.yaml's `run temporal_table` and `run onnx_speed` (the model card's commands) on the small
    demo's held-out split: every rule's measures, and both backends' speed and agreement from one run."""
    configs = INFERENCE + [os.path.join(CONFIGS, "video_measures.yaml")]
    common = dict(
        meta_file=META_FILE,
        logging_file=None,
        evaluation_dataset=small_demo_dir,
        measures_dir=str(tmp_path),
        model_file=str(onnx_export / "model.pt"),
        sam_checkpoint=small_sam_checkpoint,
        frame_size=FRAME_SIZE,
        device="cpu",
    )
    for run_id, overrides in (
        ("temporal_table", {}),
        ("onnx_speed", {"onnx_dir": str(onnx_export / "onnx"), "speed_frames": 2}),
    ):
        workflow = ConfigWorkflow(config_file=configs, workflow_type=None, run_id=run_id, **common, **overrides)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    held_out = SMALL_DEMO["val_sequences"] * SMALL_DEMO["frames_per_sequence"]
    temporal = json.loads((tmp_path / "temporal.json").read_text())["results"]
    assert set(temporal) == {"frame_by_frame", "hysteresis", "min_run_3", "hysteresis_min_run_2"}
    assert all(result["frames"] == held_out for result in temporal.values())
    speed = json.loads((tmp_path / "onnx_speed.json").read_text())
    assert speed["frames"] == 2 and set(speed["speed"]) == {"torch", "onnxruntime"}
    assert speed["agreement"]["failures"] == [] and "onnx_float64_max_error" in speed["agreement"]
