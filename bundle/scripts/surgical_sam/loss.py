"""Training losses of SurgicalSAM (SurgicalSAM paper, Methodology, and the original code).

The paper's objective is ``L = Dice + PCL``:

* ``Dice``: a soft Dice loss on the full-resolution mask logits of each (frame, prompted class) sample
  (:class:`SurgicalSAMDiceLoss`: MONAI's squared-prediction ``DiceLoss`` in exact arithmetic, summed as the
  original code sums it, which float32 rounds about five times less).
* ``PCL``: the prototype contrastive loss between the learnable class prototypes and the class
  embeddings pooled from the image embedding under each sample's ground-truth mask
  (see :class:`PrototypeContrastiveLoss`), in the form the original code computes it.

:class:`SurgicalSAMLoss` combines both and adds an optional term for "absent-class prompts" (samples
whose target mask is empty), which the automatic prompting protocol needs; without such samples it
equals the paper's loss exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SurgicalSAMDiceLoss",
    "surgical_sam_dice_loss",
    "class_embeddings_from_masks",
    "PrototypeContrastiveLoss",
    "SurgicalSAMLoss",
]

# Each of the two denominator terms of the original Dice carries its own 1e-3.
DICE_DENOMINATOR_EPS = 1e-3


class SurgicalSAMDiceLoss(nn.Module):
    """The SurgicalSAM Dice loss, the paper's equation with the original code's constants.

    For every sample ``b`` (and channel) with ``p = sigmoid(logits_b)`` and binary target ``t``::

        d_b = 2 * sum(p * t) / ((sum(p^2) + 1e-3) + (sum(t^2) + 1e-3))
        loss = mean_b (1 - d_b)

    This is :class:`monai.losses.DiceLoss` with ``sigmoid=True, squared_pred=True, smooth_nr=0,
    smooth_dr=2e-3, batch=False`` in exact arithmetic, with its sums written out: MONAI 1.6 computes
    ``sum(p * t)`` there as ``(|p|^2 + |t|^2 - |p - t|^2) / 2`` (its soft-label form), a difference of
    full-frame sums, so in float32 the gradient of every logit carries the rounding of the large sums
    (about five times the RMS error of the direct sums against float64 on 1024x1280 frames; through
    the decoder, every trained parameter's gradient about 3-10 times the original code's error; model
    card, "Speed and memory"). Here each sum is summed directly, as the original code does.

    Args:
        reduction: ``"mean"`` (over samples and channels), ``"sum"`` or ``"none"`` (the per-sample
            losses, (B, C, 1, ..., 1) as MONAI returns them).

    Takes ``logits`` (B, C, H, W[, D]) and ``target`` of the same shape with values in {0, 1}.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
        p = torch.sigmoid(logits).flatten(2)
        t = target.to(p.dtype).flatten(2)
        dice = 2 * (p * t).sum(2) / (((p * p).sum(2) + DICE_DENOMINATOR_EPS) + ((t * t).sum(2) + DICE_DENOMINATOR_EPS))
        loss = 1 - dice  # (B, C)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss.view(*loss.shape, *([1] * (logits.ndim - 2)))


def surgical_sam_dice_loss(reduction: str = "mean") -> SurgicalSAMDiceLoss:
    """The SurgicalSAM Dice loss (:class:`SurgicalSAMDiceLoss`) with ``reduction``."""
    return SurgicalSAMDiceLoss(reduction=reduction)


def class_embeddings_from_masks(
    image_embeddings: torch.Tensor, grid_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the image embedding over the cells where each sample's grid mask is on.

    Args:
        image_embeddings: (B, d, h, w) image embeddings.
        grid_masks: (B, h, w) or (B, 1, h, w) ground-truth masks already brought to the embedding grid
            (bool, or float/int where non-zero means on).

    Returns:
        embeddings: (B, d) mean embedding under each mask; a row of zeros where the mask is empty.
        valid: (B,) bool, False where the mask is empty.
    """
    if image_embeddings.ndim != 4:
        raise ValueError(f"image_embeddings must be (B, d, h, w), got shape {tuple(image_embeddings.shape)}.")
    if grid_masks.ndim == 4 and grid_masks.shape[1] == 1:
        grid_masks = grid_masks[:, 0]
    batch_size, _, height, width = image_embeddings.shape
    if tuple(grid_masks.shape) != (batch_size, height, width):
        raise ValueError(
            f"grid_masks must be (B, h, w) = {(batch_size, height, width)} to match the image embeddings, "
            f"got shape {tuple(grid_masks.shape)}."
        )
    weights = (grid_masks != 0).to(image_embeddings.dtype)
    cell_counts = weights.sum(dim=(1, 2))
    summed = torch.einsum("bdhw,bhw->bd", image_embeddings, weights)
    embeddings = summed / cell_counts.clamp_min(1.0)[:, None]
    return embeddings, cell_counts > 0


def _graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that stays connected to the graph of ``tensors`` (finite even for huge entries)."""
    return sum((tensor * 0).sum() for tensor in tensors)


def _check_range(class_ids: torch.Tensor, num_classes: int, name: str, used: torch.Tensor) -> None:
    """The ``used`` (bool, like ``class_ids``) class ids must be in 1..C: a ValueError on the CPU, an
    asynchronous assert on an accelerator (no wait for the device)."""
    in_range = ((class_ids >= 1) & (class_ids <= num_classes)) | ~used
    if class_ids.device.type == "cpu":
        if not bool(in_range.all()):
            raise ValueError(f"{name} must lie in 1..{num_classes}, got {class_ids[used].tolist()}.")
    else:
        torch._assert_async(in_range.all(), f"{name} must lie in 1..{num_classes}")


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of ``vectors`` (N, d) without overflowing for very large entries."""
    largest = vectors.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    return F.normalize(vectors / largest, dim=-1, eps=1e-12)


class PrototypeContrastiveLoss(nn.Module):
    """Prototype contrastive loss (PCL) of SurgicalSAM, in the form of the original code.

    With ``s(c, b)`` the cosine similarity between prototype ``c`` and the class embedding ``v_b`` of
    sample ``b``, and ``y_b`` the class of sample ``b``, every valid sample contributes::

        l_b = -log( exp(s(y_b, b) / t) / (exp(s(y_b, b) / t) + sum_{b' valid, y_b' != y_b} exp(s(y_b, b') / t)) )

    i.e. the negatives of prototype ``y_b`` are the *other samples of the batch* that belong to another
    class (not the other prototypes as in eq. 11 of the paper). The loss is the mean of ``l_b`` over the
    valid samples; it is evaluated with ``logsumexp`` so that small temperatures cannot overflow.
    A batch whose valid samples all belong to one class (or that has no valid sample) gives 0, still
    connected to the graph.

    Args:
        temperature: softmax temperature ``t``.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)

    def forward(
        self,
        prototypes: torch.Tensor,
        class_embeddings: torch.Tensor,
        class_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            prototypes: (C, d) class prototypes; row ``k`` belongs to label value ``k + 1``.
            class_embeddings: (B, d) class embeddings ``v_b`` (see :func:`class_embeddings_from_masks`).
            class_ids: (B,) long label values in 1..C.
            valid: (B,) bool, samples to use (e.g. non-empty grid mask); None uses all samples.

        Returns:
            scalar loss.
        """
        if prototypes.ndim != 2 or class_embeddings.ndim != 2 or prototypes.shape[1] != class_embeddings.shape[1]:
            raise ValueError(
                "prototypes must be (C, d) and class_embeddings (B, d) with the same d, got "
                f"{tuple(prototypes.shape)} and {tuple(class_embeddings.shape)}."
            )
        class_ids = class_ids.reshape(-1)
        if class_ids.shape[0] != class_embeddings.shape[0]:
            raise ValueError(
                f"class_ids must be (B,) with B={class_embeddings.shape[0]}, got {tuple(class_ids.shape)}."
            )
        num_classes = prototypes.shape[0]
        class_ids = class_ids.long()
        # Invalid samples are masked out instead of indexed out: the same numbers without a
        # data-dependent shape, so the step never waits for the device. Their ids are never read.
        if valid is None:
            valid = torch.ones_like(class_ids, dtype=torch.bool)
        valid = valid.reshape(-1).to(torch.bool)
        _check_range(class_ids, num_classes, "class_ids", valid)
        prototype_rows = (class_ids - 1).clamp(0, num_classes - 1)
        # similarity[c, b] = s(c + 1, b): (C, B)
        similarity = _unit_rows(prototypes) @ _unit_rows(class_embeddings).t()
        # scaled[b, b'] = s(y_b, b') / t: (B, B)
        scaled = similarity[prototype_rows] / self.temperature
        positive = scaled.diagonal()
        same_class = class_ids[:, None] == class_ids[None, :]
        is_self = torch.eye(class_ids.shape[0], dtype=torch.bool, device=class_ids.device)
        in_denominator = is_self | (~same_class & valid[None, :])
        log_denominator = torch.logsumexp(scaled.masked_fill(~in_denominator, float("-inf")), dim=1)
        weights = valid.to(scaled.dtype)
        return ((log_denominator - positive) * weights).sum() / weights.sum().clamp_min(1.0)


class SurgicalSAMLoss(nn.Module):
    """SurgicalSAM training loss: ``dice_weight * Dice + pcl_weight * PCL (+ absent_weight * BCE)``.

    Samples are (frame, prompted class) pairs. A sample whose target mask is empty is an
    *absent-class prompt*: it teaches the model (for the auto protocol) to answer "no
    instrument of this class". The terms are:

    * Dice (:func:`surgical_sam_dice_loss`): mean over the samples with a non-empty target (0 if none).
    * PCL (:class:`PrototypeContrastiveLoss`): over the samples whose grid mask is non-empty.
    * absent term: for samples with an empty target, binary cross-entropy with logits of their logits
      against 0, averaged over pixels then over those samples (0 if none).

    When no sample has an empty target the absent term vanishes and, with unit weights, the result is
    exactly the paper's ``L = Dice + PCL``.

    Args:
        dice_weight: weight of the Dice term.
        pcl_weight: weight of the prototype contrastive term.
        absent_weight: weight of the absent-class term.
        temperature: PCL temperature.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        pcl_weight: float = 1.0,
        absent_weight: float = 1.0,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.pcl_weight = float(pcl_weight)
        self.absent_weight = float(absent_weight)
        self.dice = surgical_sam_dice_loss(reduction="none")
        self.pcl = PrototypeContrastiveLoss(temperature=temperature)

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            pred: ``"logits"`` (B, 1, H, W) full-frame mask logits, ``"image_embeddings"`` (B, d, h, w),
                ``"prototypes"`` (C, d).
            target: ``"mask"`` (B, 1, H, W) float in {0, 1}, ``"grid_mask"`` (B, 1, h, w) or (B, h, w)
                bool/float, ``"class_id"`` (B,) long in 1..C.

        Returns:
            scalar loss: :meth:`sample_terms` over the batch plus :meth:`prototype_term`.
        """
        counts = self.sample_counts(target["mask"])
        return self.sample_terms(pred, target, counts) + self.prototype_term(
            pred["prototypes"], pred["image_embeddings"], target
        )

    @staticmethod
    def sample_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How many samples of the batch have a target and how many are absent-class prompts.

        Args:
            mask: (B, 1, H, W) the whole batch's target masks.

        Returns:
            two scalars, each at least 1: the denominators of the Dice and the absent term.
        """
        has_target = (mask.flatten(1).sum(dim=1) > 0).to(torch.float32)
        return has_target.sum().clamp_min(1.0), (1.0 - has_target).sum().clamp_min(1.0)

    def sample_terms(
        self,
        pred: Mapping[str, torch.Tensor],
        target: Mapping[str, torch.Tensor],
        counts: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The Dice and absent terms of some of the batch's samples, over the whole batch's ``counts``.

        Both terms are sums over samples divided by a count of the batch, so the terms of the parts of
        a batch (``pred`` and ``target`` of a slice of its samples, ``counts`` from
        :meth:`sample_counts` of the whole batch) add up to the terms of the batch: what lets the
        trainer run a batch in slices (``scripts.surgical_sam.batches.MicroBatchIteration``).

        Args:
            pred: ``"logits"`` (b, 1, H, W) of the samples.
            target: ``"mask"`` (b, 1, H, W) of the samples.
            counts: (samples with a target, absent samples) of the whole batch.
        """
        logits = pred["logits"]
        mask = target["mask"].to(logits.dtype)
        if mask.shape != logits.shape:
            raise ValueError(f"target mask shape {tuple(mask.shape)} differs from logits shape {tuple(logits.shape)}.")
        # Samples are weighted instead of indexed (the same numbers, no data-dependent shapes, so the
        # step never waits for the device): Dice over the samples with a target, BCE over the others.
        has_target = (mask.flatten(1).sum(dim=1) > 0).to(logits.dtype)  # (b,)
        per_sample_dice = self.dice(logits, mask).reshape(-1)  # (b,)
        total = self.dice_weight * (per_sample_dice * has_target).sum() / counts[0].to(logits.dtype)
        absent = 1.0 - has_target
        # on the CPU, asking whether any sample is absent costs nothing and skips a full-frame pass
        if self.absent_weight and (logits.device.type != "cpu" or bool(absent.any())):
            per_pixel = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
            per_sample = per_pixel.flatten(1).mean(dim=1)
            total = total + self.absent_weight * (per_sample * absent).sum() / counts[1].to(logits.dtype)
        return total

    def prototype_term(
        self, prototypes: torch.Tensor, image_embeddings: torch.Tensor, target: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``pcl_weight`` x PCL of the whole batch (it compares samples with each other).

        Args:
            prototypes: (C, d).
            image_embeddings: (B, d, h, w).
            target: ``"grid_mask"`` (B, 1, h, w) or (B, h, w), ``"class_id"`` (B,).
        """
        class_embeddings, valid = class_embeddings_from_masks(image_embeddings, target["grid_mask"])
        return self.pcl_weight * self.pcl(prototypes, class_embeddings, target["class_id"], valid)
