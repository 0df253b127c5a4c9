"""SurgicalSAM as a plain image -> label map network, for export and for tools that call ``net(image)``.

``SurgicalSAM.forward`` takes a class prompt beside the frame (mask = f(frame, class)); MONAI's
``verify_net_in_out`` and ``ckpt_export`` (TorchScript) call a network with the image alone. This
subclass runs the automatic protocol inside ``forward``: it prompts every class, keeps a class where its
mask covers at least ``min_mask_fraction`` of the frame, and merges the masks by the IoU head's quality
(the highest quality wins where masks overlap; on ties the higher class id), exactly what
``scripts.surgical_sam.inferer.ClassPromptInferer(protocol="auto", output="label_map")`` does with ``SurgicalSAM``.

Input ``image`` (B, 3, H, W) float RGB 0..255; output ``pred`` (B, 1, H, W) uint8 label map
(0 = background, 1..C instrument types), as metadata.json's ``network_data_format`` says.

It is a subclass, not a wrapper holding a SurgicalSAM: its state dict has the same keys as the trained
``models/model.pt`` (image encoder excluded, strict loading), so that file loads into it unchanged.
The forward has no data-dependent Python control flow, so ``torch.jit.trace`` records it faithfully;
the traced module is fixed to the frame size it was traced at (the resize sizes become constants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..sam.batched_mask_decoder import decode_masks
from ..sam.geometry import low_res_logits_to_frame
from .network import SurgicalSAM


class SurgicalSAMLabelMap(SurgicalSAM):
    """
    Args:
        num_classes, num_tokens, frame_size, sam_variant, sam_checkpoint: as :class:`SurgicalSAM`
            (the image encoder is always kept: the input is a frame).
        min_mask_fraction: a class is present when its mask (logit > 0) covers at least this fraction
            of the frame (0: any pixel), as the automatic protocol's ``min_mask_fraction``.
    """

    def __init__(
        self,
        num_classes: int,
        num_tokens: int,
        frame_size: Sequence[int],
        sam_variant: str = "vit_h",
        sam_checkpoint: str | None = None,
        min_mask_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= float(min_mask_fraction) < 1.0:
            raise ValueError(f"min_mask_fraction must be in [0, 1), got {min_mask_fraction}")
        if not 1 <= int(num_classes) <= 255:
            raise ValueError(f"the uint8 label map holds 1..255 classes, got num_classes={num_classes}")
        super().__init__(
            num_classes,
            num_tokens,
            frame_size,
            sam_variant=sam_variant,
            sam_checkpoint=sam_checkpoint,
            with_image_encoder=True,
        )
        self.min_mask_fraction = float(min_mask_fraction)

    def class_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, 3, H, W) -> logits of every class (B, C, H, W) and their quality (B, C)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B, 3, H, W), RGB 0..255, got {tuple(image.shape)}")
        batch, frame_h, frame_w = image.shape[0], image.shape[-2], image.shape[-1]
        embeddings = self.embed_frames(image)
        pairs = embeddings.repeat_interleave(self.num_classes, dim=0)  # frame-major: (b, class 1..C)
        class_ids = torch.arange(1, self.num_classes + 1, device=embeddings.device).repeat(batch)
        dense, sparse = self.class_prompt_encoder(pairs, self.prototypes(), class_ids)
        low_res, quality = decode_masks(
            self.mask_decoder, pairs, self.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
        logits = low_res_logits_to_frame(low_res, self.image_size, (frame_h, frame_w))
        return logits.reshape(batch, self.num_classes, frame_h, frame_w), quality[:, 0].reshape(batch, self.num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Frames (B, 3, H, W) RGB 0..255 -> label map (B, 1, H, W) uint8."""
        logits, quality = self.class_logits(image)
        masks = logits > 0
        height, width = masks.shape[-2], masks.shape[-1]
        min_pixels = max(1, math.ceil(self.min_mask_fraction * int(height) * int(width)))
        present = masks.flatten(2).sum(-1) >= min_pixels  # (B, C)
        covering = masks & present[:, :, None, None]
        score = torch.where(covering, quality[:, :, None, None], torch.full_like(logits, float("-inf")))
        # the highest quality wins; on ties the higher class id (argmax over the reversed classes)
        winner = self.num_classes - 1 - torch.argmax(score.flip(1), dim=1, keepdim=True)
        label_map = torch.where(covering.any(1, keepdim=True), winner + 1, torch.zeros_like(winner))
        return label_map.to(torch.uint8)
