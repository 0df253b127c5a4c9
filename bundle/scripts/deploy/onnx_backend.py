"""ONNX export of SurgicalSAM as two graphs, and ONNX Runtime inference with the torch model's interface.

:func:`export_onnx` writes ``image_encoder.onnx`` and ``class_decoder.onnx`` (the cut of
:mod:`scripts.surgical_sam.onnx_parts`, as segment-anything's ONNX export keeps its encoder apart from the
prompt-and-decoder graph) and ``onnx.json``, which says what the graphs take and give and for which
model they were made. :class:`OnnxSurgicalSAM` runs them with ONNX Runtime behind the same
``predict_classes`` as :class:`~scripts.surgical_sam.network.SurgicalSAM`, so the automatic protocol
(:class:`~scripts.surgical_sam.inferer.ClassPromptInferer`) runs on either backend unchanged. The frame <-> SAM-input
geometry stays in torch (:mod:`scripts.sam.geometry`), shared by both backends.

How the two backends agree and how fast each runs is measured by :mod:`scripts.measurement.backend_comparison`.
"""

from __future__ import annotations

import json
import logging
import os
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
            "--config_file <inference.yaml, export_onnx.yaml, then your other overlays>, or leave out "
            "inference_video_onnx.yaml to run the torch network"
        )
    with open(path) as handle:
        return json.load(handle)


class TwoGraphSurgicalSAM:
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


class OnnxSurgicalSAM(TwoGraphSurgicalSAM):
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


def export_model_file(
    network: SurgicalSAM,
    model_file: str,
    out_dir: str,
    sam_variant: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """export_onnx.yaml's ``run`` (merged after inference.yaml): load the trained ``model_file`` into ``network`` and export it."""
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
            raise FileNotFoundError(
                f"ONNX graph {path} ({name}) is missing: export again (inference.yaml with export_onnx.yaml)"
            )
        if file_md5(path) != graph["md5"]:
            raise ValueError(f"ONNX graph {path} ({name}) differs from the one {MANIFEST_FILE} describes: export again")
        files.append(path)
    return files
