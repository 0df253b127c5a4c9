"""Teacher prompt embeddings of Distillation-SAM: what SAM's own (frozen) prompt encoder makes of a GT mask.

For a binary ground-truth mask at frame size (H, W):

* dense teacher: the mask brought to SAM's geometry (resize longest side to S, zero pad:
  :func:`~scripts.sam.geometry.masks_to_mask_input`) at the mask-input size (4h, 4w), thresholded at 0.5,
  then +10 inside / -10 outside, given to the prompt encoder as ``masks=`` (its mask_downscaling path)
  -> (B, d, h, w).
* sparse teacher, by ``strategy``:
  - ``box``: the mask's bounding box (2 corner tokens);
  - ``points``: ``num_points`` positive points drawn uniformly (with replacement) from the mask pixels
    and ``num_negative_points`` negative ones from the pixels outside it; SAM's encoder appends one
    not-a-point token when no box is given, so N = num_points + num_negative_points + 1 tokens;
  - ``box+points``: the points, then the box corners (N = num_points + num_negative_points + 2).
  Coordinates are pixel coordinates of the frame mapped to SAM's input as segment-anything's
  ``ResizeLongestSide.apply_coords`` does (x * w'/W, y * h'/H, (h', w') the resized frame).
  Draws come from a ``torch.Generator`` (CPU), so a seeded generator makes them reproducible.

Empty mask (no instrument): every sparse token is SAM's not-a-point embedding (points get label -1;
box corners are replaced by the not-a-point embedding), and the dense teacher is the encoding of an
all -10 mask. A full mask has no negative pixel: its negative points get label -1 likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..sam.geometry import masks_to_mask_input, resized_shape

__all__ = ["STRATEGIES", "TeacherPrompts", "sample_teacher_prompts", "teacher_prompt_embeddings", "MASK_LOGIT"]

STRATEGIES = ("box", "points", "box+points")
#: The value given inside (+) and outside (-) the mask on the ``masks=`` path.
MASK_LOGIT = 10.0


@dataclass
class TeacherPrompts:
    """SAM-input prompts of B masks.

    points: (B, N, 2) x, y in SAM input pixels, or None; point_labels: (B, N) 1 / 0 / -1 (not a point);
    boxes: (B, 4) x0, y0, x1, y1 in SAM input pixels, or None; mask_input: (B, 1, 4h, 4w) +-10;
    empty: (B,) bool, masks without any pixel.
    """

    points: torch.Tensor | None
    point_labels: torch.Tensor | None
    boxes: torch.Tensor | None
    mask_input: torch.Tensor
    empty: torch.Tensor


def _draw(candidates: torch.Tensor, count: int, generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
    """``count`` flat indices drawn with replacement from the True entries of ``candidates`` (CPU)."""
    index = candidates.nonzero(as_tuple=True)[0]
    if index.numel() == 0 or count == 0:
        return torch.zeros(count, dtype=torch.long), False
    return index[torch.randint(index.numel(), (count,), generator=generator)], True


def sample_teacher_prompts(
    masks: torch.Tensor,
    image_size: int,
    grid_hw: Sequence[int],
    strategy: str = "box",
    num_points: int = 1,
    num_negative_points: int = 0,
    generator: torch.Generator | None = None,
) -> TeacherPrompts:
    """Binary masks (B, H, W) at frame size -> :class:`TeacherPrompts` for a SAM of input side ``image_size``
    and embedding grid ``grid_hw`` (h, w)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"teacher prompt strategy must be one of {STRATEGIES}, got {strategy!r}")
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (B, H, W), got {tuple(masks.shape)}")
    if num_points < 0 or num_negative_points < 0:
        raise ValueError(f"point counts must be >= 0, got {num_points} and {num_negative_points}")
    if strategy != "box" and num_points + num_negative_points == 0:
        raise ValueError(f"strategy {strategy!r} needs at least one point")
    device = masks.device
    binary = masks.bool()
    batch, height, width = binary.shape
    empty = ~binary.flatten(1).any(1)
    new_h, new_w = resized_shape((height, width), image_size)
    scale = torch.tensor([new_w / width, new_h / height], device=device)

    grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])
    inside = masks_to_mask_input(binary, image_size, (4 * grid_h, 4 * grid_w)).unsqueeze(1)
    mask_input = torch.where(inside, MASK_LOGIT, -MASK_LOGIT).float()

    points = labels = boxes = None
    if strategy in ("points", "box+points"):
        flat = binary.flatten(1).cpu()
        coords, point_labels = [], []
        for b in range(batch):
            positive, has_positive = _draw(flat[b], num_points, generator)
            negative, has_negative = _draw(~flat[b], num_negative_points, generator)
            index = torch.cat([positive, negative])
            coords.append(torch.stack([index % width, index // width], dim=-1).float())
            point_labels.append(
                torch.cat(
                    [
                        torch.full((num_points,), 1 if has_positive else -1),
                        torch.full((num_negative_points,), 0 if has_negative and has_positive else -1),
                    ]
                )
            )
        points = torch.stack(coords).to(device) * scale
        labels = torch.stack(point_labels).to(device)
        points = torch.where(labels[..., None] == -1, torch.zeros_like(points), points)
    if strategy in ("box", "box+points"):
        rows = binary.any(2)
        cols = binary.any(1)
        arange_h = torch.arange(height, device=device)
        arange_w = torch.arange(width, device=device)
        y0 = torch.where(rows, arange_h, height).amin(1)
        y1 = torch.where(rows, arange_h, -1).amax(1)
        x0 = torch.where(cols, arange_w, width).amin(1)
        x1 = torch.where(cols, arange_w, -1).amax(1)
        boxes = torch.stack([x0, y0, x1, y1], dim=1).float() * scale.repeat(2)
        boxes = torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
    return TeacherPrompts(points, labels, boxes, mask_input, empty)


def teacher_prompt_embeddings(prompt_encoder: nn.Module, prompts: TeacherPrompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's ``PromptEncoder`` on :class:`TeacherPrompts` -> sparse (B, N, d), dense (B, d, h, w).

    The encoder's own ``forward`` does the work; only the box tokens of empty masks are replaced by the
    not-a-point embedding afterwards (a box cannot say "no box").
    """
    point_arg = None if prompts.points is None else (prompts.points, prompts.point_labels)
    sparse, dense = prompt_encoder(points=point_arg, boxes=prompts.boxes, masks=prompts.mask_input)
    if prompts.boxes is not None and bool(prompts.empty.any()):
        not_a_point = prompt_encoder.not_a_point_embed.weight.reshape(1, 1, -1)
        box_tokens = torch.zeros_like(sparse, dtype=torch.bool)
        box_tokens[:, -2:] = True
        sparse = torch.where(box_tokens & prompts.empty[:, None, None], not_a_point.to(sparse.dtype), sparse)
    return sparse, dense
