"""Torch against ONNX Runtime: agreement, distance from a float64 evaluation, and speed on the same frames.

:func:`compare_backends` checks the ONNX path against torch (logits, embeddings, label maps) and, on request,
both against :class:`Float64SurgicalSAM` (the same graphs in float64 under torch); :func:`agreement_failures`
says which checks a comparison fails; :func:`benchmark_backends` times both on the same frames in one run;
:func:`speed_report` is video_measures.yaml's ``onnx_speed``.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from ..deploy.onnx_backend import OnnxSurgicalSAM, TwoGraphSurgicalSAM, load_model_file
from ..sam.geometry import frames_to_sam_input
from ..surgical_sam.network import SurgicalSAM
from ..surgical_sam.onnx_parts import SurgicalSAMClassDecoder, SurgicalSAMEncoder


class Float64SurgicalSAM(TwoGraphSurgicalSAM):
    """The two exported modules (:mod:`scripts.surgical_sam.onnx_parts`) of ``model`` in float64 under torch: the
    reference both float32 backends are measured against.

    The SAM input is the float32 one both backends get (the same torch preprocessing), the positional
    encoding the float32 constant the graph holds; everything after runs in float64, so the difference
    of a float32 backend from this is that backend's own rounding, amplified by the network.
    """

    def __init__(self, model: SurgicalSAM) -> None:
        model = model.cpu().eval()
        self.num_classes, self.image_size = int(model.num_classes), int(model.image_size)
        self.pixel_mean, self.pixel_std = model.pixel_mean.float().cpu(), model.pixel_std.float().cpu()
        # the modules share the model's parameters: copy them before the cast
        self.encoder = copy.deepcopy(SurgicalSAMEncoder(model)).double().eval()
        self.decoder = copy.deepcopy(SurgicalSAMClassDecoder(model)).double().eval()

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        sam_input = frames_to_sam_input(frames.cpu(), self.image_size, self.pixel_mean, self.pixel_std)
        with torch.no_grad():
            return self.encoder(sam_input.double())

    def decode(self, embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.decoder(embeddings.double(), class_ids.long())


def compare_backends(
    model: SurgicalSAM,
    onnx_model: OnnxSurgicalSAM,
    frames: torch.Tensor,
    inferer,
    reference: bool = False,
    frames_per_pass: int = 4,
) -> dict:
    """Run both backends on ``frames`` (B, 3, H, W), ``frames_per_pass`` frames at a time, every class prompted.

    Returns a dict of:
        max_abs_logit_difference: max |torch - ONNX| over every prompted class's logits at the frame size
            (the logits whose sign makes each class's mask, from which the label map is merged);
        max_abs_quality_difference: the same for the IoU head's quality;
        max_abs_embedding_difference, max_abs_embedding: the encoders' outputs on the same SAM input;
        equal_label_pixels: fraction of equal label-map pixels under ``inferer`` (automatic protocol).
        With ``reference``, each float32 backend against :class:`Float64SurgicalSAM` (the same graphs in
        float64): ``{torch,onnx}_float64_max_error`` (max abs logit difference) and
        ``{torch,onnx}_float64_rms_error`` (root mean square over the same logits).
    """
    reference_model = Float64SurgicalSAM(model) if reference else None
    stats = {
        "logit": 0.0,
        "quality": 0.0,
        "embedding": 0.0,
        "embedding_max": 0.0,
        "equal": 0.0,
        "pixels": 0,
        "torch_max": 0.0,
        "onnx_max": 0.0,
        "torch_sq": 0.0,
        "onnx_sq": 0.0,
        "logits": 0,
    }
    with torch.no_grad():
        for start in range(0, frames.shape[0], frames_per_pass):
            batch = frames[start : start + frames_per_pass]
            every = torch.ones(batch.shape[0], model.num_classes, dtype=torch.bool)
            torch_logits, torch_quality = model.predict_classes(batch, every)
            onnx_logits, onnx_quality = onnx_model.predict_classes(batch, every)
            torch_embedding, onnx_embedding = model.embed_frames(batch), onnx_model.embed_frames(batch)
            torch_map, onnx_map = inferer(batch, model), inferer(batch, onnx_model)
            torch_map = torch_map["label_map"] if isinstance(torch_map, dict) else torch_map
            onnx_map = onnx_map["label_map"] if isinstance(onnx_map, dict) else onnx_map
            stats["logit"] = max(stats["logit"], float((torch_logits - onnx_logits).abs().max()))
            stats["quality"] = max(stats["quality"], float((torch_quality - onnx_quality).abs().max()))
            stats["embedding"] = max(stats["embedding"], float((torch_embedding - onnx_embedding).abs().max()))
            stats["embedding_max"] = max(stats["embedding_max"], float(torch_embedding.abs().max()))
            stats["equal"] += float((torch_map.cpu() == onnx_map.cpu()).sum())
            stats["pixels"] += torch_map.numel()
            if reference_model is not None:
                exact = reference_model.predict_classes(batch, every)[0]
                for name, logits in (("torch", torch_logits), ("onnx", onnx_logits)):
                    error = logits.double() - exact
                    stats[f"{name}_max"] = max(stats[f"{name}_max"], float(error.abs().max()))
                    stats[f"{name}_sq"] += float((error**2).sum())
                stats["logits"] += exact.numel()
    result = {
        "frames": int(frames.shape[0]),
        "frame_size": [int(frames.shape[-2]), int(frames.shape[-1])],
        "max_abs_logit_difference": stats["logit"],
        "max_abs_quality_difference": stats["quality"],
        "max_abs_embedding_difference": stats["embedding"],
        "max_abs_embedding": stats["embedding_max"],
        "equal_label_pixels": stats["equal"] / max(stats["pixels"], 1),
    }
    if reference_model is not None:
        for name in ("torch", "onnx"):
            result[f"{name}_float64_max_error"] = stats[f"{name}_max"]
            result[f"{name}_float64_rms_error"] = (stats[f"{name}_sq"] / max(stats["logits"], 1)) ** 0.5
    return result


def agreement_failures(
    result: dict,
    max_logit_difference: float = 1e-3,
    min_equal_label_pixels: float = 0.999,
    max_relative_embedding_difference: float = 1e-5,
    max_error_ratio: dict | None = None,
) -> list[str]:
    """What of :func:`compare_backends`'s ``result`` fails the checks of the ONNX export (empty: it passes).

    - equal label-map pixels >= ``min_equal_label_pixels``;
    - the encoders agree to float32 rounding: max |embedding difference| <= ``max_relative_embedding_difference``
      x max |embedding| (a changed operator, e.g. GELU's tanh approximation or another LayerNorm eps, is
      orders of magnitude above);
    - logits: within ``max_logit_difference`` of torch, or, with the float64 reference, the ONNX path no
      further from the float64 evaluation of the same graphs than ``max_error_ratio[measure]`` x torch's own
      float32 path, for the measures RMS (default 3: 2.4 measured on the demo model trained from the 8-bit cache,
      below 2 on earlier demo models) and max (default 4: one pixel's worst case moves more between machines and
      trained models than the RMS does): a network that amplifies float32 rounding
      beyond ``max_logit_difference`` cannot agree closer than both paths' own rounding errors, whichever
      kernels sum in which order.
    """
    ratios = {"rms": 3.0, "max": 4.0, **(max_error_ratio or {})}
    failures = []
    if result["equal_label_pixels"] < min_equal_label_pixels:
        failures.append(
            f"equal label pixels {100 * result['equal_label_pixels']:.3f}% < {100 * min_equal_label_pixels:.1f}%"
        )
    if result["max_abs_embedding_difference"] > max_relative_embedding_difference * result["max_abs_embedding"]:
        failures.append(
            f"encoder: max |embedding difference| {result['max_abs_embedding_difference']:.2e} > "
            f"{max_relative_embedding_difference:g} x max |embedding| {result['max_abs_embedding']:.2f}"
        )
    if result["max_abs_logit_difference"] > max_logit_difference:
        if "onnx_float64_max_error" not in result:
            failures.append(
                f"max |logit difference| {result['max_abs_logit_difference']:.2e} > {max_logit_difference:g}"
            )
        else:
            for measure in ("max", "rms"):
                onnx_error = result[f"onnx_float64_{measure}_error"]
                torch_error = result[f"torch_float64_{measure}_error"]
                if onnx_error > ratios[measure] * torch_error:
                    failures.append(
                        f"max |logit difference| {result['max_abs_logit_difference']:.2e} > "
                        f"{max_logit_difference:g}, and the ONNX path's {measure} error from float64 "
                        f"{onnx_error:.2e} > {ratios[measure]:g} x torch's {torch_error:.2e}"
                    )
    return failures


def benchmark_backends(models: dict, frames: torch.Tensor, inferer, repeats: int = 3, warmup: int = 1) -> dict:
    """Frames/s of each model (``{"torch": SurgicalSAM, "onnxruntime": OnnxSurgicalSAM}``) through ``inferer``,
    one frame per call, on the same ``frames`` (N, 3, H, W), timed over ``repeats`` passes after ``warmup``."""
    results = {}
    with torch.no_grad():
        for name, model in models.items():
            for _ in range(warmup):
                inferer(frames[:1], model)
            start = time.perf_counter()
            for _ in range(repeats):
                for index in range(frames.shape[0]):
                    inferer(frames[index : index + 1], model)
            elapsed = time.perf_counter() - start
            results[name] = {
                "frames_per_second": repeats * frames.shape[0] / elapsed,
                "frames": int(repeats * frames.shape[0]),
            }
    return results


def speed_report(
    network: SurgicalSAM,
    model_file: str | None,
    onnx_dir: str,
    frames_dir: str,
    inferer,
    num_frames: int | None = None,
    repeats: int = 2,
    output_file: str | None = None,
    reference: bool = True,
    split: str = "validation",
) -> dict:
    """video_measures.yaml's ``onnx_speed``: torch and ONNX Runtime on the same ``num_frames`` frames of
    ``frames_dir`` (a folder of frames, or a prepared dataset: the frames of its ``split``; None: all) in one
    process (CPU, the same thread count), plus their agreement (:func:`compare_backends`,
    with the float64 reference unless ``reference`` is false, and :func:`agreement_failures`); JSON to
    ``output_file``."""
    from ..data.frame_files import read_frame
    from ..data.transforms import list_frames

    if model_file:
        load_model_file(network, model_file)
    network = network.cpu().eval()
    if os.path.isfile(os.path.join(frames_dir, "dataset.json")):
        with open(os.path.join(frames_dir, "dataset.json")) as handle:
            paths = [os.path.join(frames_dir, item["image"]) for item in json.load(handle)[split]][:num_frames]
    else:
        paths = [item["image"] for item in list_frames(frames_dir)][:num_frames]
    frames = torch.stack([torch.from_numpy(read_frame(p)).permute(2, 0, 1).float() for p in paths])
    threads = torch.get_num_threads()
    onnx_model = OnnxSurgicalSAM(onnx_dir, num_threads=threads)
    agreement = compare_backends(network, onnx_model, frames, inferer, reference=reference)
    agreement["failures"] = agreement_failures(agreement)
    speed = benchmark_backends({"torch": network, "onnxruntime": onnx_model}, frames, inferer, repeats=repeats)
    import onnxruntime

    report = {
        "frames_dir": os.path.abspath(frames_dir),
        "frames": len(paths),
        "frame_size": list(frames.shape[-2:]),
        "threads": threads,
        "device": "cpu",
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "speed": speed,
        "agreement": agreement,
    }
    if output_file:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w") as handle:
            json.dump(report, handle, indent=2)
    print(
        f"torch {speed['torch']['frames_per_second']:.2f} frames/s, ONNX Runtime "
        f"{speed['onnxruntime']['frames_per_second']:.2f} frames/s ({threads} threads, {tuple(frames.shape[-2:])} "
        f"frames); max |logit difference| {agreement['max_abs_logit_difference']:.2e}, equal label pixels "
        f"{100 * agreement['equal_label_pixels']:.3f}%"
    )
    if reference:
        print(
            f"from the float64 evaluation of the same graphs: torch max {agreement['torch_float64_max_error']:.2e} "
            f"(RMS {agreement['torch_float64_rms_error']:.2e}), ONNX Runtime max "
            f"{agreement['onnx_float64_max_error']:.2e} (RMS {agreement['onnx_float64_rms_error']:.2e}); "
            f"checks: {'; '.join(agreement['failures']) or 'passed'}"
        )
    return report
