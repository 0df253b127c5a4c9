"""Distillation-SAM's inferer: one semantic pass per frame, no class prompt (the ``auto`` protocol)."""

from __future__ import annotations

import torch
from monai.inferers import Inferer

from .datasets import CACHED_KEYS


class SemanticInferer(Inferer):
    """Run a semantic network (``DistillationSAM``) on frames: one pass, no class prompt, no GT.

    This is the ``auto`` protocol (model card: Evaluation protocols): every frame gets a metric entry.

    Args:
        output: ``dict`` (for evaluators: ``label_map`` (B, 1, H, W) and ``has_entry`` (B,) all True) or
            ``label_map`` (the tensor, for inference and MONAI Label).
    """

    def __init__(self, output: str = "dict") -> None:
        if output not in ("dict", "label_map"):
            raise ValueError(f"output must be 'dict' or 'label_map', got {output!r}")
        self.output = output

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        """inputs: frames (B, 3, H, W) 0..255; ``embedding`` / ``taps`` from the tap cache go to the network;
        other extra arguments (e.g. ``gt_label``) are not used."""
        cached = {key: kwargs[key] for key in CACHED_KEYS if kwargs.get(key) is not None}
        label_map = network(inputs, **cached)["label_map"].unsqueeze(1)
        if self.output == "label_map":
            return label_map
        return {
            "label_map": label_map,
            "has_entry": torch.ones(label_map.shape[0], dtype=torch.bool, device=label_map.device),
        }
