"""Inference tasks of the SurgicalSAM MONAI Label app, all on the bundle's one network.

- ``SurgicalSAMAuto``: every class prompted, the model keeps those it finds (the bundle's inference.yaml).
- ``SurgicalSAMClass``: one class prompted (``class_name`` or ``class_id``): SurgicalSAM's mask of that
  instrument type.
- ``SurgicalSAMVideo``: the automatic protocol on the consecutive frames of one video, presence decided by the
  bundle's temporal rule (``temporal`` of inference.yaml: ``scripts.deploy.temporal``) over the frames it was
  given since :meth:`SurgicalSAMVideo.start_video`; each result says how uncertain the frame's decision was.
- ``SAMPrompt``: foreground/background clicks and/or a box through SAM's own prompt path (the network's
  frozen image encoder and SAM prompt encoder, the SAM checkpoint's own mask decoder).

Each returns a 2D label map PNG of the frame's size (values are class ids; ``SAMPrompt`` writes
``class_id`` when given, else 1).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


def share_network(task: BundleInferTask, owner: BundleInferTask) -> BundleInferTask:
    """Let ``task`` use ``owner``'s network and its loaded copies (one SAM in memory, not one per task)."""
    task.network = owner.network
    task._networks = owner._networks
    return task


class SurgicalSAMAuto(BundleInferTask):
    """The bundle's automatic protocol, as MONAI Label's stock BundleInferTask runs it."""


def model_identity(bundle_path: str) -> str:
    """Which model file the bundle serves now (``models/model.pt``'s modification time and size): scores and
    pre-labels of another identity came from another model."""
    stat = os.stat(os.path.join(bundle_path, "models", "model.pt"))
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def _bundle_object(task: BundleInferTask, key: str):
    """The bundle config's ``key`` instantiated with the task's bundle's own ``scripts`` importable."""
    from monailabel.utils.others.class_utils import unload_module

    sys.path.insert(0, task.bundle_path)
    unload_module("scripts")
    try:
        return task.bundle_config.get_parsed_content(key, instantiate=True)
    finally:
        sys.path.remove(task.bundle_path)


class SurgicalSAMVideo(BundleInferTask):
    """The automatic protocol with the bundle's temporal presence rule over one video's frames, given in order
    after :meth:`start_video` (one video at a time: the batch pre-labelling of lib/batch.py). The result JSON
    has ``presence_margin`` (the smallest relative distance of a class's mask size to the frame-by-frame
    presence threshold, as ``ClassPromptInferer.uncertainty``; None when no class was prompted) and
    ``min_quality`` (lowest decoder quality among the classes kept; None when none is)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temporal = None

    def start_video(self) -> None:
        """Forget the frames seen so far (the next frame starts a video)."""
        if self.temporal is None:
            self.temporal = _bundle_object(self, "temporal")
        self.temporal.reset()

    def model_identity(self) -> str:
        return model_identity(self.bundle_path)

    def carry_label(self, label_map) -> None:
        """Let a frame a person labelled (``label_map`` (H, W) class ids) stand in the sequence for the model's
        decision: the classes it shows are the presence the next frames continue from."""
        if self.temporal is None:
            self.start_video()
        values = torch.as_tensor(label_map).flatten().long()
        counts = torch.bincount(values[values <= self.temporal.num_classes], minlength=self.temporal.num_classes + 1)
        self.temporal.update_counts(counts[1:][None], values.numel())

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        import copy

        network = self._get_network(device, data)
        frames = torch.as_tensor(data[self.input_key])[None].float().to(torch.device(device))
        inferer = copy.copy(self.inferer(data))
        inferer.output = "dict"
        with torch.no_grad():
            out = inferer(frames, network, temporal=self.temporal)
        data[self.output_label_key] = out["label_map"][0]
        pixels = out["mask_pixels"][0].float().cpu()
        min_pixels = inferer.min_pixels(*frames.shape[-2:])
        prompted = inferer.allowed.cpu()
        margins = ((pixels - min_pixels).abs() / min_pixels)[prompted]
        kept = out["quality"][0].float().cpu()[out["present"][0].cpu()]
        data.setdefault(self.output_json_key, {}).update(
            presence_margin=float(margins.min()) if len(margins) else None,
            min_quality=float(kept.min()) if len(kept) and not math.isinf(float(kept.min())) else None,
        )
        return data


class _Prompted(BundleInferTask):
    def class_names(self) -> dict[str, int]:
        return {name: int(value) for name, value in self.labels.items()}

    def requested_class(self, data: dict, required: bool) -> int | None:
        """``class_id`` (1..C) or ``class_name`` (case-insensitive) from the request, checked."""
        names = self.class_names()
        if data.get("class_id") not in (None, ""):
            value = data["class_id"]
            if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) not in names.values():
                raise HTTPException(
                    status_code=400, detail=f"class_id must be one of {sorted(names.values())}, got {value!r}"
                )
            return int(value)
        if data.get("class_name") not in (None, ""):
            name = str(data["class_name"]).strip().lower()
            if name not in names:
                raise HTTPException(
                    status_code=400, detail=f"unknown class_name {data['class_name']!r}; known: {sorted(names)}"
                )
            return names[name]
        if required:
            raise HTTPException(status_code=400, detail=f"give class_name (one of {sorted(names)}) or class_id")
        return None


class SurgicalSAMClass(_Prompted):
    """One instrument type prompted: the label map holds that class's mask only."""

    def inferer(self, data=None):
        inferer = super().inferer(data)
        class_id = self.requested_class(data or {}, required=True)
        inferer.allowed = torch.zeros(inferer.num_classes, dtype=torch.bool)
        inferer.allowed[class_id - 1] = True
        # the mask of the class asked for, however small: the user asked for this instrument
        inferer.min_mask_fraction = 0.0
        return inferer


class SAMPrompt(_Prompted):
    """Clicks and/or a box (frame pixels, x along the width): SAM's own prompt path."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("type", InferType.DEEPGROW)
        super().__init__(*args, **kwargs)
        self._prompters: dict[str, Any] = {}

    def _prompter(self, network, device: str):
        import sys

        from monailabel.utils.others.class_utils import unload_module

        cached = self._prompters.get(device)
        if cached is not None and cached[0] is network:
            return cached[1]
        sys.path.insert(0, self.bundle_path)
        unload_module("scripts")
        try:
            from scripts.sam.prompting import SamPointPrompter

            variant = self.bundle_config.get_parsed_content("sam_variant")
            checkpoint = self.bundle_config.get_parsed_content("sam_checkpoint")
            prompter = SamPointPrompter(network, variant, checkpoint).to(torch.device(device))
        finally:
            sys.path.remove(self.bundle_path)
        self._prompters[device] = (network, prompter)
        return prompter

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        class_id = self.requested_class(data, required=False) or 1
        network = self._get_network(device, data)
        frames = torch.as_tensor(data[self.input_key])[None].float().to(torch.device(device))
        prompter = self._prompter(network, device)
        try:
            logits, quality = prompter(
                frames,
                foreground=data.get("foreground") or [],
                background=data.get("background") or [],
                box=data.get("box") or None,
            )
        except ValueError as error:  # PromptError: a click or box that does not fit the frame
            raise HTTPException(status_code=400, detail=str(error)) from error
        data[self.output_label_key] = (logits[0] > 0).long() * class_id
        data.setdefault(self.output_json_key, {})["sam_quality"] = float(quality[0])
        return data
