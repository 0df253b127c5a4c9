"""Inference tasks of the SurgicalSAM MONAI Label app, all on the bundle's one network.

- ``SurgicalSAMAuto``: every class prompted, the model keeps those it finds (the bundle's inference.yaml).
- ``SurgicalSAMClass``: one class prompted (``class_name`` or ``class_id``): SurgicalSAM's mask of that
  instrument type.
- ``SAMPrompt``: foreground/background clicks and/or a box through SAM's own prompt path (the network's
  frozen image encoder and SAM prompt encoder, the SAM checkpoint's own mask decoder).

Each returns a 2D label map PNG of the frame's size (values are class ids; ``SAMPrompt`` writes
``class_id`` when given, else 1).
"""

from __future__ import annotations

import logging
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
