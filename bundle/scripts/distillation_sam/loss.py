"""Distillation-SAM's training loss (the Distillation-SAM announcement; bundle/docs/distillation_sam.md)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss


# ------------------------------------------------------------------------------ distillation losses
class DistillationSAMLoss(nn.Module):
    """Distillation-SAM training loss (the Distillation-SAM announcement; bundle/docs/distillation_sam.md)::

        L = ce_weight * CE + dice_weight * Dice + token_kd_weight * MSE(student mask tokens, teacher's)
            + dense_kd_weight * MSE(student dense prompt, teacher's)

    * CE: cross-entropy of the frame-size semantic logits (B, C+1, H, W) against the label map
      (B, H, W), mean over the pixels whose label is not ``ignore_index`` (0 when there is none).
    * Dice (optional, default weight 0): :class:`monai.losses.DiceLoss` on the softmax of the semantic
      logits against the one-hot label, ignored pixels zeroed in both; background channel included
      when ``dice_include_background``.
    * KD terms: mean squared error against the teacher's outputs, which carry no gradient
      (``teacher_mask_tokens`` (B, 4, d), ``teacher_dense`` (B, d, h, w) of the network's output).

    Args:
        ce_weight, dice_weight, token_kd_weight, dense_kd_weight: term weights (defaults 1 / 0 / 0.1 / 0.1).
        ignore_index: label value to leave out of CE and Dice (None: every pixel counts).
        dice_include_background: Dice over channel 0 as well.

    After each call, ``last_terms`` holds the unweighted terms (floats) for logging.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 0.0,
        token_kd_weight: float = 0.1,
        dense_kd_weight: float = 0.1,
        ignore_index: int | None = None,
        dice_include_background: bool = False,
    ) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.token_kd_weight, self.dense_kd_weight = float(token_kd_weight), float(dense_kd_weight)
        self.ignore_index = ignore_index
        self.dice = DiceLoss(include_background=dice_include_background, softmax=False, batch=False, reduction="mean")
        self.last_terms: dict[str, float] = {}

    def _label(self, target, logits: torch.Tensor) -> torch.Tensor:
        label = target["label"] if isinstance(target, Mapping) else target
        if label.ndim == 4 and label.shape[1] == 1:
            label = label[:, 0]
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(label.shape) != expected:
            raise ValueError(
                f"label of shape {tuple(label.shape)} does not match the semantic logits "
                f"{tuple(logits.shape)}: expected (B, H, W) = {expected} or (B, 1, H, W)."
            )
        return label.long()

    def forward(self, pred: Mapping[str, torch.Tensor], target) -> torch.Tensor:
        """
        Args:
            pred: the network's output: ``semantic_logits`` (B, C+1, H, W), ``mask_tokens`` (B, T, d),
                ``dense`` (B, d, h, w), ``teacher_mask_tokens`` (B, T, d), ``teacher_dense`` (B, d, h, w)
                (the teacher entries are needed only when their weight is not 0).
            target: label map (B, H, W) or (B, 1, H, W) long, or a dict with it under ``label``.

        Returns:
            scalar loss.
        """
        logits = pred["semantic_logits"]
        label = self._label(target, logits)
        num_channels = logits.shape[1]
        valid = torch.ones_like(label, dtype=torch.bool) if self.ignore_index is None else label != self.ignore_index
        bad = valid & ((label < 0) | (label >= num_channels))
        if bool(bad.any()):
            raise ValueError(
                f"label values must be in 0..{num_channels - 1} (or ignore_index={self.ignore_index}), "
                f"got {sorted(set(label[bad].unique().tolist()))[:5]}"
            )
        safe_label = torch.where(valid, label, torch.zeros_like(label))
        terms = {}
        if bool(valid.any()):
            per_pixel = F.cross_entropy(logits, safe_label, reduction="none")
            terms["ce"] = (per_pixel * valid).sum() / valid.sum()
        else:
            terms["ce"] = (logits * 0).sum()  # a 0 that stays on the graph of logits
        total = self.ce_weight * terms["ce"]
        if self.dice_weight:
            weights = valid.unsqueeze(1).to(logits.dtype)
            probabilities = logits.softmax(1) * weights
            one_hot = F.one_hot(safe_label, num_channels).permute(0, 3, 1, 2).to(logits.dtype) * weights
            terms["dice"] = self.dice(probabilities, one_hot)
            total = total + self.dice_weight * terms["dice"]
        for name, weight, student_key, teacher_key in (
            ("token_kd", self.token_kd_weight, "mask_tokens", "teacher_mask_tokens"),
            ("dense_kd", self.dense_kd_weight, "dense", "teacher_dense"),
        ):
            if not weight:
                continue
            if teacher_key not in pred:
                raise KeyError(
                    f"the {name} term (weight {weight}) needs {teacher_key!r} in the network output: "
                    "call the network with the label map (training) or set the weight to 0"
                )
            terms[name] = F.mse_loss(pred[student_key], pred[teacher_key].detach())
            total = total + weight * terms[name]
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return total
