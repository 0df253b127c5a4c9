"""Temporal consistency for the automatic protocol: decide each class's presence over consecutive frames.

The automatic protocol (EndoVis protocol, model card) decides frame by frame that a class is present when
its mask (logits > 0) covers at least ``min_mask_fraction`` of the frame. On video that decision flickers:
a class comes and goes for single frames, which reads as the instrument changing type.
:class:`TemporalPresence` replaces it, causally (one frame in, one decision out, constant memory), by

- hysteresis on the mask fraction: an absent class turns on at ``on_fraction``, a present one stays on
  down to ``off_fraction`` (<= ``on_fraction``);
- a minimum run length: the decision changes only after the hysteresis has said the other thing for
  ``min_run`` consecutive frames (a change is reported ``min_run - 1`` frames late).

With ``on_fraction == off_fraction == min_mask_fraction`` and ``min_run == 1`` it is the frame-by-frame
rule exactly. How often classes appear or vanish, and what each rule scores on held-out videos, is measured by
:mod:`scripts.measurement.temporal_measures`.
"""

from __future__ import annotations

import math

import torch


class TemporalPresence:
    """Per-class presence over a sequence of frames (see the module docstring).

    Args:
        num_classes: C.
        on_fraction: mask fraction at which an absent class becomes present.
        off_fraction: mask fraction below which a present class becomes absent (None: ``on_fraction``).
        min_run: consecutive frames a change must persist before it is taken (1: at once).
    """

    def __init__(
        self, num_classes: int, on_fraction: float, off_fraction: float | None = None, min_run: int = 1
    ) -> None:
        off_fraction = on_fraction if off_fraction is None else off_fraction
        if not 0.0 <= float(off_fraction) <= float(on_fraction) < 1.0:
            raise ValueError(f"need 0 <= off_fraction <= on_fraction < 1, got on {on_fraction}, off {off_fraction}")
        if int(min_run) < 1:
            raise ValueError(f"min_run must be >= 1, got {min_run}")
        self.num_classes, self.min_run = int(num_classes), int(min_run)
        self.on_fraction, self.off_fraction = float(on_fraction), float(off_fraction)
        self.reset()

    def reset(self) -> None:
        """Forget the sequence so far (a new video starts with every class absent)."""
        self.present = torch.zeros(self.num_classes, dtype=torch.bool)
        self.pending = torch.zeros(self.num_classes, dtype=torch.long)

    @staticmethod
    def _min_pixels(fraction: float, area: int) -> int:
        return max(1, math.ceil(fraction * area))

    def update_counts(self, pixels: torch.Tensor, area: int) -> torch.Tensor:
        """Mask pixel counts (B, C) of B consecutive frames of ``area`` pixels -> presence (B, C) bool."""
        on_pixels, off_pixels = self._min_pixels(self.on_fraction, area), self._min_pixels(self.off_fraction, area)
        decisions = []
        for row in pixels.detach().cpu():
            wanted = torch.where(self.present, row >= off_pixels, row >= on_pixels)
            changed = wanted != self.present
            self.pending = torch.where(changed, self.pending + 1, torch.zeros_like(self.pending))
            flip = self.pending >= self.min_run
            self.present = torch.where(flip, wanted, self.present)
            self.pending[flip] = 0
            decisions.append(self.present.clone())
        return torch.stack(decisions).to(pixels.device)

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """Binary masks (B, C, H, W) of B consecutive frames -> presence (B, C) bool."""
        return self.update_counts(masks.flatten(2).sum(-1), int(masks.shape[-2]) * int(masks.shape[-1]))

    def describe(self) -> dict:
        return {"on_fraction": self.on_fraction, "off_fraction": self.off_fraction, "min_run": self.min_run}
