"""Video inference: a video file or a folder of frames, as one sequence, -> label maps, JSON, overlay video.

:class:`VideoInference` (the overlay inference_video.yaml's ``run``) reads the sequence
one frame at a time (:mod:`scripts.data.video_io`), segments it with the configured model and inferer
(the automatic protocol: no ground truth), and writes into ``output_dir``:

- ``labels/<frame>.png``: the label map (0 = background, 1..C), ``<frame>`` the source frame index
  (6 digits); or, with ``label_format: npz``, one compressed stack ``labels.npz`` whose member
  ``<frame>`` is that (H, W) uint8 map (``numpy.load(path)["000012"]``);
- ``frames/<frame>.json``: the frame's index and time and, for each class present, its name, quality
  (SurgicalSAM: the IoU head's prediction; Distillation-SAM: the mean class probability over its pixels)
  and area (fraction of the frame);
- ``overlay.mp4``: the frames tinted by class with a legend of class names and colours, at the source
  frame rate (divided by the frame stride);
- ``summary.json``: source, frame rate, settings, frames written and skipped, frames per class, whether
  the sequence was read to its end undamaged (``complete``), the decoder's errors (``decode_errors``) and
  the damaged frames it left out (``damaged_frames``: index and time).

Memory stays constant whatever the length: one frame is held at a time. A re-run with the same output
folder skips the frames whose JSON is already there (the JSON is written last, after the label map), and
rebuilds the overlay video from the label maps on disk. A video that cannot be read, ends early or has
damaged frames (which are not segmented) stops the run with :class:`~scripts.data.video_io.VideoError`
(a non-zero exit) after every good frame has been written (and the overlay video closed).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.video_io import OverlayVideoWriter, VideoError, open_sequence
from ..files import atomic_write_bytes
from ..surgical_sam.inferer import ClassPromptInferer
from .onnx_backend import OnnxSurgicalSAM, check_backend, load_model_file
from .temporal import TemporalPresence

logger = logging.getLogger(__name__)

LABEL_FORMATS = ("png", "npz")
LABELS_DIR, FRAMES_DIR, STACK_FILE = "labels", "frames", "labels.npz"
OVERLAY_FILE, SUMMARY_FILE = "overlay.mp4", "summary.json"


def _frame_name(index: int) -> str:
    return f"{int(index):06d}"


class LabelStore:
    """Where the label maps go: one PNG per frame, or members of one compressed ``labels.npz``."""

    def __init__(self, output_dir: str, label_format: str) -> None:
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
        self.label_format, self.output_dir = label_format, output_dir
        self._zip = None
        if label_format == "png":
            os.makedirs(os.path.join(output_dir, LABELS_DIR), exist_ok=True)
        else:
            path = os.path.join(output_dir, STACK_FILE)
            try:
                self._zip = zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED)
            except zipfile.BadZipFile:
                raise VideoError(
                    f"{path} is damaged (an earlier run was killed before closing it): delete it and "
                    f"{os.path.join(output_dir, FRAMES_DIR)} to start again"
                ) from None
            self._members = set(self._zip.namelist())

    def has(self, index: int) -> bool:
        if self._zip is None:
            return os.path.isfile(os.path.join(self.output_dir, LABELS_DIR, _frame_name(index) + ".png"))
        return _frame_name(index) + ".npy" in self._members

    def write(self, index: int, label_map: np.ndarray) -> None:
        if self._zip is None:
            buffer = io.BytesIO()
            Image.fromarray(label_map).save(buffer, format="PNG")
            atomic_write_bytes(
                os.path.join(self.output_dir, LABELS_DIR, _frame_name(index) + ".png"), buffer.getvalue()
            )
            return
        buffer = io.BytesIO()
        np.save(buffer, label_map)
        self._zip.writestr(_frame_name(index) + ".npy", buffer.getvalue())
        self._members.add(_frame_name(index) + ".npy")

    def read(self, index: int) -> np.ndarray:
        if self._zip is None:
            with Image.open(os.path.join(self.output_dir, LABELS_DIR, _frame_name(index) + ".png")) as image:
                return np.asarray(image)
        with self._zip.open(_frame_name(index) + ".npy") as handle:
            return np.load(io.BytesIO(handle.read()))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


class VideoInference:
    """Segment one sequence (a video file or a folder of frames), streaming; see the module docstring.

    Args:
        source: a video file (mp4, avi, mov, mkv) or a folder of frames (sorted names = frame order).
        output_dir: folder to write (made if needed; a re-run resumes in it).
        network: the torch model (SurgicalSAM with its image encoder, or DistillationSAM); None with the
            onnxruntime backend.
        inferer: ``ClassPromptInferer`` (automatic protocol) or ``SemanticInferer``.
        class_names: C names, label values 1..C.
        model_file: trained weights loaded into ``network`` (torch backend); None: as given.
        backend: ``torch`` or ``onnxruntime`` (SurgicalSAM only: the graphs in ``onnx_dir``).
        onnx_dir: the ONNX export (``scripts.deploy.onnx_backend.export_onnx``).
        label_format: ``png`` (a file per frame) or ``npz`` (one compressed stack).
        write_overlay_video: write ``overlay.mp4``.
        frame_stride: segment every ``frame_stride``-th source frame.
        start_time, end_time: segment frames from ``start_time`` to before ``end_time`` seconds (None: all).
        folder_fps: frame rate of a folder of frames.
        temporal: a ``TemporalPresence`` deciding presence over consecutive frames (SurgicalSAM); None:
            frame by frame, ``inferer``'s ``min_mask_fraction``.
        device: torch device of the network.
        progress: show a progress bar (frames, frames/s).
    """

    def __init__(
        self,
        source: str,
        output_dir: str,
        network,
        inferer,
        class_names: Sequence[str],
        model_file: str | None = None,
        backend: str = "torch",
        onnx_dir: str | None = None,
        label_format: str = "png",
        write_overlay_video: bool = True,
        frame_stride: int = 1,
        start_time: float | None = None,
        end_time: float | None = None,
        folder_fps: float = 25.0,
        temporal: TemporalPresence | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.backend = check_backend(backend)
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
        self.class_prompted = isinstance(inferer, ClassPromptInferer)
        if self.class_prompted:
            inferer = copy.copy(inferer)
            inferer.output = "dict"
        elif temporal is not None:
            raise ValueError(
                "temporal consistency decides the presence of prompted classes: it needs the "
                "class-prompt inferer (SurgicalSAM), not this one"
            )
        if backend == "onnxruntime" and not self.class_prompted:
            raise ValueError("the onnxruntime backend runs the exported SurgicalSAM graphs; use backend torch here")
        self.source, self.output_dir, self.network, self.inferer = str(source), str(output_dir), network, inferer
        self.class_names, self.model_file, self.onnx_dir = list(class_names), model_file, onnx_dir
        self.label_format, self.write_overlay_video = label_format, bool(write_overlay_video)
        self.frame_stride, self.start_time, self.end_time = int(frame_stride), start_time, end_time
        self.folder_fps, self.temporal, self.device, self.progress = (
            folder_fps,
            temporal,
            torch.device(device),
            progress,
        )

    # ------------------------------------------------------------------------------------------ model
    def _model(self):
        if self.backend == "onnxruntime":
            if not self.onnx_dir:
                raise ValueError("backend onnxruntime needs onnx_dir (the folder of the ONNX export)")
            return OnnxSurgicalSAM(self.onnx_dir)
        if self.network is None:
            raise ValueError("backend torch needs the network")
        if self.model_file:
            load_model_file(self.network, self.model_file, map_location=self.device)
        return self.network.to(self.device).eval()

    def _segment(self, model, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """Frame (H, W, 3) uint8 -> label map (H, W) uint8 and {"classes": [...], "mask_pixels": [...]}."""
        frame = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(self.device)
        num_classes = len(self.class_names)
        with torch.no_grad():
            if self.class_prompted:
                out = self.inferer(frame, model, temporal=self.temporal)
                label_map = out["label_map"][0, 0]
                quality, mask_pixels = out["quality"][0].float().cpu(), out["mask_pixels"][0].cpu()
            else:
                out = model(frame)
                label_map = out["label_map"][0]
                probabilities = out["semantic_logits"][0].float().softmax(0)  # (C + 1, H, W)
                one_hot = torch.nn.functional.one_hot(label_map.long(), num_classes + 1).permute(2, 0, 1).float()
                pixels = one_hot.flatten(1).sum(1)
                quality = ((probabilities * one_hot).flatten(1).sum(1) / pixels.clamp(min=1))[1:].cpu()
                mask_pixels = None
        label_map = label_map.cpu()
        area = torch.bincount(label_map.flatten().long(), minlength=num_classes + 1)[1 : num_classes + 1].float()
        area = area / label_map.numel()
        classes = [
            {
                "id": c,
                "name": self.class_names[c - 1],
                "quality": round(float(quality[c - 1]), 6),
                "area": round(float(area[c - 1]), 6),
            }
            for c in range(1, num_classes + 1)
            if area[c - 1] > 0
        ]
        record = {"classes": classes}
        if mask_pixels is not None:
            record["mask_pixels"] = [int(v) for v in mask_pixels]
        return label_map.numpy().astype(np.uint8), record

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Segment the sequence; return the summary (also written to ``summary.json``)."""
        sequence = open_sequence(self.source, self.frame_stride, self.start_time, self.end_time, self.folder_fps)
        os.makedirs(os.path.join(self.output_dir, FRAMES_DIR), exist_ok=True)
        model = self._model()
        store = LabelStore(self.output_dir, self.label_format)
        overlay = (
            OverlayVideoWriter(
                os.path.join(self.output_dir, OVERLAY_FILE), sequence.fps / self.frame_stride, self.class_names
            )
            if self.write_overlay_video
            else None
        )
        if self.temporal is not None:
            self.temporal.reset()
        counts = {"written": 0, "skipped": 0}
        frames_per_class = [0] * len(self.class_names)
        error, started = None, time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=sequence.expected_frames(),
                unit="frame",
                desc=os.path.basename(self.source.rstrip("/")),
                dynamic_ncols=True,
            )
        try:
            for frame in sequence:
                json_path = os.path.join(self.output_dir, FRAMES_DIR, _frame_name(frame.index) + ".json")
                record = None
                if os.path.isfile(json_path) and store.has(frame.index):
                    with open(json_path) as handle:
                        record = json.load(handle)
                    label_map = store.read(frame.index)
                    if self.temporal is not None and "mask_pixels" in record:  # the state the frame left
                        self.temporal.update_counts(torch.tensor([record["mask_pixels"]]), label_map.size)
                    counts["skipped"] += 1
                else:
                    label_map, record = self._segment(model, frame.image)
                    record = {"index": frame.index, "time": round(frame.time, 6), **record}
                    store.write(frame.index, label_map)
                    atomic_write_bytes(json_path, json.dumps(record).encode())
                    counts["written"] += 1
                for item in record["classes"]:
                    frames_per_class[item["id"] - 1] += 1
                if overlay is not None:
                    overlay.write(frame.image, label_map)
                if bar is not None:
                    bar.update(1)
        except VideoError as problem:
            error = problem
        finally:
            if bar is not None:
                bar.close()
            store.close()
            if overlay is not None:
                overlay.close()
        elapsed = time.perf_counter() - started
        summary = {
            "source": os.path.abspath(self.source),
            "fps": sequence.fps,
            "frame_stride": self.frame_stride,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "backend": self.backend,
            "label_format": self.label_format,
            "temporal": None if self.temporal is None else self.temporal.describe(),
            "frames_written": counts["written"],
            "frames_skipped": counts["skipped"],
            "frames_per_class": dict(zip(self.class_names, frames_per_class)),
            "seconds": round(elapsed, 3),
            "complete": error is None,
            "error": None if error is None else str(error),
            "decode_errors": sequence.decode_errors,
            "damaged_frames": sequence.damaged_frames,
        }
        atomic_write_bytes(os.path.join(self.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
        if error is not None:
            raise error
        logger.info(
            "video inference: %d frames written, %d already there, into %s",
            counts["written"],
            counts["skipped"],
            self.output_dir,
        )
        return summary
