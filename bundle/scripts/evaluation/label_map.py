"""The label map of class-promptable predictions: one binary mask, class and quality per prompt, merged by
quality (as ISINet and SurgicalSAM evaluate)."""

from __future__ import annotations

import torch


def merge_class_masks(masks: torch.Tensor, class_ids: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Merge per-class binary masks of one frame into a label map.

    Masks are written in ascending order of quality (stable sort), so where masks overlap the one with the
    highest quality wins (on ties, the later one).

    Args:
        masks: (K, H, W) bool masks (e.g. ``logits > 0``).
        class_ids: (K,) long label values in 1..C.
        quality: (K,) float quality of each mask (e.g. SAM's IoU prediction).

    Returns:
        (H, W) long label map, 0 = background; all zeros when K = 0.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {tuple(masks.shape)}.")
    class_ids = torch.as_tensor(class_ids, device=masks.device).reshape(-1)
    quality = torch.as_tensor(quality, device=masks.device).reshape(-1)
    num_masks = masks.shape[0]
    if class_ids.shape[0] != num_masks or quality.shape[0] != num_masks:
        raise ValueError(
            f"class_ids {tuple(class_ids.shape)} and quality {tuple(quality.shape)} must have K={num_masks} entries."
        )
    label_map = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    for index in torch.argsort(quality, stable=True).tolist():
        label_map[masks[index].bool()] = int(class_ids[index])
    return label_map
