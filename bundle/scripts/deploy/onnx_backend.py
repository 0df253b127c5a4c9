"""ONNX export of SurgicalSAM as two graphs, and ONNX Runtime inference with the torch model's interface.

:func:`export_onnx` writes ``image_encoder.onnx`` and ``class_decoder.onnx`` (the cut of
:mod:`scripts.surgical_sam.onnx_parts`, as segment-anything's ONNX export keeps its encoder apart from the
prompt-and-decoder graph) and ``onnx.json``, which says what the graphs take and give and for which
model they were made. :class:`OnnxSurgicalSAM` runs them with ONNX Runtime behind the same
``predict_classes`` as :class:`~scripts.surgical_sam.network.SurgicalSAM`, so the automatic protocol
(:class:`~scripts.surgical_sam.inferer.ClassPromptInferer`) runs on either backend unchanged. The frame <-> SAM-input
geometry stays in torch (:mod:`scripts.sam.geometry`), shared by both backends.

:func:`compare_backends` checks the ONNX path against torch (logits, embeddings, label maps) and, on request,
both against :class:`Float64SurgicalSAM` (the same graphs in float64 under torch); :func:`agreement_failures`
says which checks a comparison fails; :func:`benchmark_backends` times both on the same frames in one run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence

import torch

from ..sam.checkpoint import file_md5
from ..sam.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD, frames_to_sam_input, low_res_logits_to_frame
from ..surgical_sam.network import SurgicalSAM
from ..surgical_sam.onnx_parts import SurgicalSAMClassDecoder, SurgicalSAMEncoder

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "class_decoder.onnx"
MANIFEST_FILE = "onnx.json"
MANIFEST_FORMAT = 1
#: ONNX opset of the export (the opset ONNX Runtime's CPU kernels and TensorRT's parser both support).
DEFAULT_OPSET = 17


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def load_model_file(network: torch.nn.Module, model_file: str, map_location="cpu") -> torch.nn.Module:
    """Load a trained ``models/model.pt`` (``{"model": state}`` as the trainer saves it, or a bare state dict)
    into ``network``, strictly, as inference.yaml's CheckpointLoader does."""
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"trained model {model_file} not found: train first or pass --model_file PATH")
    checkpoint = torch.load(model_file, map_location=map_location, weights_only=True)
    state = (
        checkpoint["model"]
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
        else checkpoint
    )
    network.load_state_dict(state)
    return network


def export_onnx(
    model: SurgicalSAM,
    out_dir: str,
    opset: int = DEFAULT_OPSET,
    sam_variant: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Write the two graphs of ``model`` and ``onnx.json`` into ``out_dir``; return the manifest.

    Args:
        model: a SurgicalSAM with its image encoder (``with_image_encoder=True``), trained weights loaded.
        out_dir: folder to write (made if needed; files of an earlier export are replaced).
        opset: ONNX opset.
        sam_variant, class_names: recorded in the manifest.

    The graphs' batch axes (frames of the encoder, (frame, class) pairs of the decoder) are dynamic; the
    encoder's input side is SAM's (``model.image_size``): frames of any size are resized to it outside.
    """
    if model.image_encoder is None:
        raise ValueError("export needs the image encoder: build SurgicalSAM with with_image_encoder=True")
    os.makedirs(out_dir, exist_ok=True)
    model = model.eval().cpu()
    encoder, decoder = SurgicalSAMEncoder(model).eval(), SurgicalSAMClassDecoder(model).eval()
    side, (grid_h, grid_w), dim = model.image_size, model.grid_size, model.embed_dim
    sam_input = torch.zeros(2, 3, side, side)
    embeddings = torch.randn(3, dim, grid_h, grid_w)
    class_ids = torch.tensor([1, model.num_classes, 1], dtype=torch.long)
    paths = {"image_encoder": os.path.join(out_dir, ENCODER_FILE), "class_decoder": os.path.join(out_dir, DECODER_FILE)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic that it records as constants
        # the TorchScript-based exporter: segment-anything's modules trace cleanly and dynamic_axes
        # keeps the batch axes free (the exporter SAM's own scripts/export_onnx_model.py uses)
        torch.onnx.export(
            encoder,
            (sam_input,),
            paths["image_encoder"],
            input_names=["sam_input"],
            output_names=["image_embeddings"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"sam_input": {0: "frames"}, "image_embeddings": {0: "frames"}},
        )
        torch.onnx.export(
            decoder,
            (embeddings, class_ids),
            paths["class_decoder"],
            input_names=["image_embeddings", "class_ids"],
            output_names=["low_res_logits", "quality"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={
                "image_embeddings": {0: "pairs"},
                "class_ids": {0: "pairs"},
                "low_res_logits": {0: "pairs"},
                "quality": {0: "pairs"},
            },
        )
    low_res_side = 4 * grid_h
    manifest = {
        "format": MANIFEST_FORMAT,
        "opset": int(opset),
        "sam_variant": sam_variant,
        "num_classes": int(model.num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "image_size": int(side),
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
        "graphs": {
            "image_encoder": {
                "file": ENCODER_FILE,
                "md5": file_md5(paths["image_encoder"]),
                "inputs": {"sam_input": ["frames", 3, side, side]},
                "outputs": {"image_embeddings": ["frames", dim, grid_h, grid_w]},
            },
            "class_decoder": {
                "file": DECODER_FILE,
                "md5": file_md5(paths["class_decoder"]),
                "inputs": {"image_embeddings": ["pairs", dim, grid_h, grid_w], "class_ids": ["pairs"]},
                "outputs": {"low_res_logits": ["pairs", 1, low_res_side, low_res_side], "quality": ["pairs"]},
            },
        },
        "preprocessing": "RGB 0..255 frame, longest side resized to image_size (bilinear, antialiased), "
        "normalised by pixel_mean/pixel_std, zero-padded bottom/right to image_size x image_size",
        "postprocessing": "low_res_logits bilinear to image_size x image_size, crop the resized frame's region, "
        "bilinear to the frame size; a class's mask is logits > 0",
    }
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=2)
    logger.info("ONNX graphs written to %s", out_dir)
    return manifest


def read_manifest(onnx_dir: str) -> dict:
    path = os.path.join(onnx_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no ONNX export in {onnx_dir} ({MANIFEST_FILE} missing): export first with python -m monai.bundle run "
            "export_onnx --config_file <the inference config files>, or set --backend torch"
        )
    with open(path) as handle:
        return json.load(handle)


class _TwoGraphSurgicalSAM:
    """:meth:`SurgicalSAM.predict_classes` on the export's two graphs (``embed_frames``, ``decode`` of a subclass):
    a frame is encoded once and its (frame, class) pairs decoded in batches, as the torch model does."""

    num_classes: int
    image_size: int

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict_classes(
        self, inputs: torch.Tensor, class_mask: torch.Tensor, pairs_per_pass: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`SurgicalSAM.predict_classes` for frames: frames (B, 3, H, W), class_mask (B, C) bool ->
        logits (B, C, H, W) (-inf where not prompted) and quality (B, C) (-inf where not prompted), in the
        graphs' dtype."""
        if inputs.ndim != 4 or inputs.shape[1] != 3:
            raise ValueError(f"the ONNX backend takes frames (B, 3, H, W), got {tuple(inputs.shape)}")
        batch, frame_hw = inputs.shape[0], (int(inputs.shape[-2]), int(inputs.shape[-1]))
        embeddings = self.embed_frames(inputs)
        class_mask = class_mask.cpu().bool()
        logits = torch.full((batch, self.num_classes, *frame_hw), float("-inf"), dtype=embeddings.dtype)
        quality = torch.full((batch, self.num_classes), float("-inf"), dtype=embeddings.dtype)
        frame_index, class_index = class_mask.nonzero(as_tuple=True)
        for start in range(0, frame_index.numel(), pairs_per_pass):
            frames, classes = frame_index[start : start + pairs_per_pass], class_index[start : start + pairs_per_pass]
            low_res, pair_quality = self.decode(embeddings[frames], classes + 1)
            logits[frames, classes] = low_res_logits_to_frame(low_res, self.image_size, frame_hw)[:, 0]
            quality[frames, classes] = pair_quality
        return logits, quality

    def eval(self):  # the torch model's call that inference code makes
        return self


class OnnxSurgicalSAM(_TwoGraphSurgicalSAM):
    """The exported graphs under ONNX Runtime, with :meth:`SurgicalSAM.predict_classes`'s interface.

    Args:
        onnx_dir: folder written by :func:`export_onnx`.
        num_threads: ONNX Runtime intra-op threads (0: its default, all cores).
        providers: ONNX Runtime execution providers (None: CPU).
    """

    def __init__(self, onnx_dir: str, num_threads: int = 0, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.manifest = read_manifest(onnx_dir)
        self.num_classes = int(self.manifest["num_classes"])
        self.image_size = int(self.manifest["image_size"])
        self.pixel_mean = torch.tensor(self.manifest["pixel_mean"])
        self.pixel_std = torch.tensor(self.manifest["pixel_std"])
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        graphs = self.manifest["graphs"]
        self.encoder = ort.InferenceSession(
            os.path.join(onnx_dir, graphs["image_encoder"]["file"]), options, providers=providers
        )
        self.decoder = ort.InferenceSession(
            os.path.join(onnx_dir, graphs["class_decoder"]["file"]), options, providers=providers
        )

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) RGB 0..255 -> image embeddings (B, d, h, w)."""
        sam_input = frames_to_sam_input(frames.cpu(), self.image_size, self.pixel_mean, self.pixel_std)
        (embeddings,) = self.encoder.run(None, {"sam_input": sam_input.numpy()})
        return torch.from_numpy(embeddings)

    def decode(self, embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (N, d, h, w), class ids (N,) in 1..C -> low-res logits (N, 1, 4h, 4w), quality (N,)."""
        low_res, quality = self.decoder.run(
            None,
            {"image_embeddings": embeddings.contiguous().numpy(), "class_ids": class_ids.long().contiguous().numpy()},
        )
        return torch.from_numpy(low_res), torch.from_numpy(quality)


class Float64SurgicalSAM(_TwoGraphSurgicalSAM):
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
      float32 path, for the measures RMS (default 2) and max (default 4: one pixel's worst case moves more
      between machines and trained models than the RMS does): a network that amplifies float32 rounding
      beyond ``max_logit_difference`` cannot agree closer than both paths' own rounding errors, whichever
      kernels sum in which order.
    """
    ratios = {"rms": 2.0, "max": 4.0, **(max_error_ratio or {})}
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


def export_model_file(
    network: SurgicalSAM,
    model_file: str,
    out_dir: str,
    sam_variant: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """inference.yaml's ``run export_onnx``: load the trained ``model_file`` into ``network`` and export it."""
    return export_onnx(load_model_file(network, model_file), out_dir, sam_variant=sam_variant, class_names=class_names)


def packed_onnx_files(onnx_dir: str) -> list[str]:
    """Paths of the export's files (manifest first), after checking every graph against its md5 in the manifest.

    Raises:
        FileNotFoundError / ValueError: no export, or a graph missing or changed since the export.
    """
    manifest = read_manifest(onnx_dir)
    files = [os.path.join(onnx_dir, MANIFEST_FILE)]
    for name, graph in manifest["graphs"].items():
        path = os.path.join(onnx_dir, graph["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX graph {path} ({name}) is missing: export again (run export_onnx)")
        if file_md5(path) != graph["md5"]:
            raise ValueError(f"ONNX graph {path} ({name}) differs from the one {MANIFEST_FILE} describes: export again")
        files.append(path)
    return files


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
