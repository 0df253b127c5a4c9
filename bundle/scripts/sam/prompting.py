"""SAM's own point and box prompts on the frame, beside SurgicalSAM's class prompts.

SurgicalSAM tunes its mask decoder for class prompts, so clicks and boxes go through the decoder of the
SAM checkpoint itself (loaded here from the same file), with the network's frozen image encoder and SAM
prompt encoder: image encoder -> SAM prompt encoder (points, box) -> SAM mask decoder, as SAM's predictor.
Coordinates are frame pixels, ``x`` along the width and ``y`` along the height.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbone import build_mask_decoder, get_variant
from .checkpoint import read_checkpoint_dict, state_dict_mismatch
from .geometry import low_res_logits_to_frame, resized_shape

DECODER_PREFIX = "mask_decoder."


class PromptError(ValueError):
    """A point or box prompt that does not fit the frame (a user error, not a failure)."""


def load_sam_mask_decoder(sam_variant: str, sam_checkpoint: str) -> nn.Module:
    """The mask decoder of a SAM checkpoint (strict: every ``mask_decoder.*`` key, right shapes)."""
    state = dict(
        read_checkpoint_dict(
            sam_checkpoint,
            "SAM checkpoint",
            expected="a state dict",
            hint="; pass the SAM weights file as --sam_checkpoint PATH",
        )
    )
    if isinstance(state.get("model"), dict):
        state = state["model"]
    decoder = build_mask_decoder(sam_variant)
    sub = {k[len(DECODER_PREFIX) :]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    details = state_dict_mismatch(sub, decoder.state_dict(), expected_as=f"for {sam_variant}")
    if details:
        raise ValueError(
            f"SAM checkpoint {sam_checkpoint}: its mask decoder does not match {sam_variant!r}: {'; '.join(details)}"
        )
    decoder.load_state_dict(sub, strict=True)
    return decoder.eval().requires_grad_(False)


def check_prompts(
    frame_hw: Sequence[int], foreground: Sequence = (), background: Sequence = (), box: Sequence | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate clicks and a box against the frame -> (coords (N, 2) float, labels (N,) long, box (4,) or None).

    Raises:
        PromptError: no prompt at all, a point that is not two numbers, or outside the frame; a box that is
            not [x0, y0, x1, y1] with x0 < x1, y0 < y1 inside the frame.
    """
    height, width = int(frame_hw[0]), int(frame_hw[1])
    coords, labels = [], []
    for name, points, label in (("foreground", foreground or [], 1), ("background", background or [], 0)):
        if not isinstance(points, (list, tuple)):
            raise PromptError(f"{name} must be a list of [x, y] points, got {points!r}")
        for point in points:
            if (
                not isinstance(point, (list, tuple))
                or len(point) < 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point[:2])
            ):
                raise PromptError(f"{name} point {point!r} is not [x, y] (pixels)")
            x, y = float(point[0]), float(point[1])
            if not (0 <= x < width and 0 <= y < height):
                raise PromptError(
                    f"{name} point [{x:g}, {y:g}] is outside the frame (x in 0..{width - 1}, y in 0..{height - 1})"
                )
            coords.append([x, y])
            labels.append(label)
    box_tensor = None
    if box is not None and len(box):
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            raise PromptError(f"box must be [x0, y0, x1, y1] (pixels), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise PromptError(
                f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] must have x0 < x1 <= {width}, y0 < y1 <= {height}, all >= 0"
            )
        box_tensor = torch.tensor([x0, y0, x1, y1])
    if not coords and box_tensor is None:
        raise PromptError("give at least one foreground/background point or a box")
    return (
        torch.tensor(coords, dtype=torch.float32).reshape(-1, 2),
        torch.tensor(labels, dtype=torch.long),
        box_tensor,
    )


class SamPointPrompter(nn.Module):
    """Segment one object from clicks and/or a box with SAM's own decoder on a SurgicalSAM's frozen parts.

    Args:
        network: a SurgicalSAM built ``with_image_encoder=True`` (its image encoder and SAM prompt encoder
            are the SAM checkpoint's, frozen).
        sam_variant, sam_checkpoint: the checkpoint whose mask decoder is used (the network's own SAM).
    """

    def __init__(self, network: nn.Module, sam_variant: str, sam_checkpoint: str) -> None:
        super().__init__()
        if getattr(network, "image_encoder", None) is None:
            raise ValueError("SAM point/box prompts need the network's image encoder (with_image_encoder=True)")
        self.network = network
        self.image_size = get_variant(sam_variant).image_size
        self.sam_mask_decoder = load_sam_mask_decoder(sam_variant, sam_checkpoint)

    @torch.no_grad()
    def forward(
        self,
        frames: torch.Tensor,
        foreground: Sequence = (),
        background: Sequence = (),
        box: Sequence | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            frames: (1, 3, H, W) RGB 0..255.
            foreground, background: [[x, y], ...] pixel clicks.
            box: [x0, y0, x1, y1] pixels, or None.
            embeddings: the frame's image embedding if already computed (1, d, h, w).

        Returns:
            logits (1, 1, H, W) at frame size and the predicted IoU (1,). One click alone uses SAM's
            three-mask output and keeps the best-scored mask, as SAM's predictor recommends.
        """
        if frames.ndim != 4 or frames.shape[:2] != (1, 3):
            raise ValueError(f"expected one frame (1, 3, H, W), got {tuple(frames.shape)}")
        frame_hw = (int(frames.shape[-2]), int(frames.shape[-1]))
        coords, labels, box_t = check_prompts(frame_hw, foreground, background, box)
        device = frames.device
        if embeddings is None:
            embeddings = self.network.embed_frames(frames)
        new_h, new_w = resized_shape(frame_hw, self.image_size)
        scale = torch.tensor([new_w / frame_hw[1], new_h / frame_hw[0]], device=device)
        prompt_encoder = self.network.prompt_encoder
        points = None
        if coords.numel():
            points = ((coords.to(device) * scale)[None], labels.to(device)[None])
        boxes = None if box_t is None else (box_t.to(device).reshape(2, 2) * scale).reshape(1, 4)
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        multimask = box_t is None and coords.shape[0] == 1
        low_res, iou = self.sam_mask_decoder(
            image_embeddings=embeddings,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = iou.argmax(dim=1)
        low_res = low_res[torch.arange(low_res.shape[0], device=device), best][:, None]
        return low_res_logits_to_frame(low_res, self.image_size, frame_hw), iou.max(dim=1).values
