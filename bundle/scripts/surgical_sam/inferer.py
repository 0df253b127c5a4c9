"""Frame-level inference for class-promptable models: which classes to prompt, and the label map.

Two protocols (model card: Evaluation protocols), always labelled in the outputs:

- ``oracle`` (the paper's): prompt only the classes present in the frame's ground truth; frames
  without an instrument get no prompt and so no metric entry. Every prompted mask (logit > 0) is
  merged, however small, as the original SurgicalSAM evaluation does: no size threshold.
- ``auto``: no ground truth; prompt every class, a class is present where its mask has at least
  ``min_mask_fraction`` of the frame's pixels; every frame has an entry.
"""

from __future__ import annotations

import math

import torch
from monai.inferers import Inferer

from ..engine.inferers import autocast
from ..evaluation.label_map import merge_class_masks
from ..evaluation.metrics import PROTOCOLS


class ClassPromptInferer(Inferer):
    """Prompt a SurgicalSAM-like network (``predict_classes``) and merge its masks by quality.

    Args:
        num_classes: C.
        protocol: ``oracle`` or ``auto``.
        min_mask_fraction: in ``auto`` only, the smallest mask (pixels with logit > 0), as a fraction of
            the frame's area, that counts as the class being present (0: any pixel). Small spurious masks
            of absent classes are the automatic protocol's main error. Ignored under ``oracle``.
        pairs_per_pass: (frame, class) pairs decoded together.
        output: ``dict`` (for evaluators: label map, entries, qualities) or ``label_map`` (a tensor,
            for inference and MONAI Label).
        prompt_classes: class ids (1..C) that may be prompted, under both protocols; None: all.
            Cross-dataset evaluation prompts only the classes both datasets share.
        amp: run the network under bf16 autocast (logits and qualities come back as float32).
    """

    def __init__(
        self,
        num_classes: int,
        protocol: str = "auto",
        min_mask_fraction: float = 0.0,
        pairs_per_pass: int = 32,
        output: str = "dict",
        prompt_classes: list[int] | None = None,
        amp: bool = False,
    ) -> None:
        self.amp = bool(amp)
        self.allowed = torch.ones(num_classes, dtype=torch.bool)
        if prompt_classes is not None:
            bad = [c for c in prompt_classes if not 1 <= int(c) <= num_classes]
            if bad or not len(prompt_classes):
                raise ValueError(
                    f"prompt_classes must be a non-empty list of ids in 1..{num_classes}, got {prompt_classes}"
                )
            self.allowed = torch.zeros(num_classes, dtype=torch.bool)
            self.allowed[[int(c) - 1 for c in prompt_classes]] = True
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if output not in ("dict", "label_map"):
            raise ValueError(f"output must be 'dict' or 'label_map', got {output!r}")
        self.num_classes, self.protocol, self.output = num_classes, protocol, output
        if not 0.0 <= min_mask_fraction < 1.0:
            raise ValueError(f"min_mask_fraction must be in [0, 1), got {min_mask_fraction}")
        self.min_mask_fraction, self.pairs_per_pass = float(min_mask_fraction), pairs_per_pass

    def min_pixels(self, height: int, width: int) -> int:
        """The smallest mask (pixels) of a class called present under the automatic protocol."""
        return max(1, math.ceil(self.min_mask_fraction * height * width))

    def classes_to_prompt(self, batch: int, gt_label: torch.Tensor | None, device) -> torch.Tensor:
        """-> (B, C) bool."""
        allowed = self.allowed.to(device)[None]
        if self.protocol == "auto":
            return allowed.expand(batch, -1).clone()
        if gt_label is None:
            raise ValueError("the oracle protocol needs the ground-truth label map (gt_label)")
        labels = gt_label.reshape(batch, -1).to(device)
        class_values = torch.arange(1, self.num_classes + 1, device=device)
        return (labels[:, None, :] == class_values[None, :, None]).any(-1) & allowed

    def __call__(self, inputs: torch.Tensor, network, gt_label: torch.Tensor | None = None, temporal=None):
        """
        Args:
            inputs: frames (B, 3, H, W) or image embeddings (B, d, h, w).
            network: a model with ``predict_classes(inputs, class_mask) -> logits (B,C,H,W), quality (B,C)``.
            gt_label: (B, 1, H, W) ground truth, needed by the oracle protocol only.
            temporal: for B consecutive frames of a video, a ``scripts.deploy.temporal.TemporalPresence`` that
                decides presence over the sequence instead of ``min_mask_fraction`` frame by frame.

        Returns:
            ``label_map`` (B, 1, H, W) long; with ``output='dict'`` a dict of it, ``has_entry`` (B,),
            ``present`` (B, C), ``quality`` (B, C) and ``mask_pixels`` (B, C) (pixels with logit > 0).
        """
        model = getattr(network, "module", network)  # DistributedDataParallel
        prompt = self.classes_to_prompt(inputs.shape[0], gt_label, inputs.device)
        with autocast(inputs.device.type, self.amp):
            logits, quality = model.predict_classes(inputs, prompt, pairs_per_pass=self.pairs_per_pass)
        logits, quality = logits.float(), quality.float()
        masks = logits > 0
        if self.protocol == "oracle":  # every prompted mask with logit > 0 is merged, whatever its size
            present = prompt & masks.flatten(2).any(-1)
        elif temporal is None:
            present = prompt & (masks.flatten(2).sum(-1) >= self.min_pixels(*masks.shape[-2:]))
        else:
            present = prompt & temporal(masks)
        class_ids = torch.arange(1, self.num_classes + 1, device=logits.device)
        label_map = torch.stack(
            [
                merge_class_masks(masks[b][present[b]], class_ids[present[b]], quality[b][present[b]])
                for b in range(inputs.shape[0])
            ]
        ).unsqueeze(1)
        if self.output == "label_map":
            return label_map
        has_entry = prompt.any(1) if self.protocol == "oracle" else torch.ones_like(prompt[:, 0])
        return {
            "label_map": label_map,
            "has_entry": has_entry,
            "present": present,
            "quality": quality,
            "mask_pixels": masks.flatten(2).sum(-1),
        }

    def uncertainty(self, inputs: torch.Tensor, network) -> dict[str, torch.Tensor]:
        """How close the automatic decision on each frame is to going the other way (for active learning).

        Every allowed class is prompted. A class is called present when its mask has at least
        ``min_pixels`` = ceil(``min_mask_fraction`` x frame area) pixels; its presence margin is
        ``|pixels - min_pixels| / min_pixels`` (0: the mask sits exactly on the threshold, one pixel more
        or less flips the class). The frame's margin is the smallest over its classes, and its quality the
        lowest decoder quality (IoU head) among the classes called present (+inf when none is).

        Args:
            inputs: frames (B, 3, H, W) or image embeddings (B, d, h, w).
            network: as in ``__call__``.

        Returns:
            ``presence_margin`` (B,), ``min_quality`` (B,), ``pixels`` (B, C) long, ``min_pixels`` () long.
        """
        model = getattr(network, "module", network)
        prompt = self.allowed.to(inputs.device)[None].expand(inputs.shape[0], -1)
        with autocast(inputs.device.type, self.amp):
            logits, quality = model.predict_classes(inputs, prompt, pairs_per_pass=self.pairs_per_pass)
        pixels = (logits > 0).flatten(2).sum(-1)
        min_pixels = self.min_pixels(*logits.shape[-2:])
        margin = ((pixels - min_pixels).abs().float() / min_pixels).masked_fill(~prompt, math.inf)
        present = prompt & (pixels >= min_pixels)
        min_quality = quality.float().masked_fill(~present, math.inf).min(1).values
        return {
            "presence_margin": margin.min(1).values,
            "min_quality": min_quality,
            "pixels": pixels,
            "min_pixels": torch.tensor(min_pixels),
        }
