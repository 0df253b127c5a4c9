"""SurgicalSAM (AAAI 2024): class-promptable SAM, mask = f(frame, class).

Frozen: SAM image encoder (optional here: training runs on cached embeddings), SAM prompt encoder
(gives the positional encoding and the positive/negative point embeddings). Trainable: prototype
bank, prototype-based class prompt encoder, SAM mask decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..sam.backbone import build_sam, get_variant
from ..sam.batched_mask_decoder import decode_masks
from ..sam.fast_encoder import frozen_encoder_forward
from ..sam.frozen_parts import FrozenSamParts
from ..sam.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD, frames_to_sam_input, low_res_logits_to_frame
from .prototype_prompt_encoder import PrototypeBank, PrototypePromptEncoder

logger = logging.getLogger(__name__)

IMAGE_ENCODER_PREFIX = "image_encoder."


class SurgicalSAM(FrozenSamParts):
    """
    Args:
        num_classes: C, instrument classes (label values 1..C).
        num_tokens: n, sparse tokens per class (2 for EndoVis2018, 4 for EndoVis2017).
        frame_size: (H, W) of the frames the cached embeddings were made from; logits come back at it.
        sam_variant: ``vit_h``, ``vit_l``, ``vit_b`` or ``tiny`` (see ``scripts.sam.backbone.SAM_VARIANTS``).
        sam_checkpoint: SAM weights; the decoder starts from them, the frozen parts keep them.
            None builds SAM with random weights (only for tests).
        with_image_encoder: keep SAM's image encoder so that ``forward`` takes raw frames too.

    The image encoder's weights are never part of :meth:`state_dict` (they are the SAM checkpoint's),
    and :meth:`load_state_dict` is always strict about every other key, so a checkpoint saved under
    another key or for another configuration fails loudly instead of leaving random weights; the image and
    prompt encoders stay in eval mode (:class:`~scripts.sam.frozen_parts.FrozenSamParts`).
    """

    network_name = "SurgicalSAM"
    frozen_parts = ("image_encoder", "prompt_encoder")
    unsaved_prefixes = (IMAGE_ENCODER_PREFIX,)
    mismatch_hint = (
        "A checkpoint from another method or configuration (num_classes, num_tokens, sam_variant), saved under "
        "another key (e.g. wrapped as 'module.'), or an original SurgicalSAM checkpoint (convert it first) was given"
    )

    def __init__(
        self,
        num_classes: int,
        num_tokens: int,
        frame_size: Sequence[int],
        sam_variant: str = "vit_h",
        sam_checkpoint: str | None = None,
        with_image_encoder: bool = False,
    ) -> None:
        super().__init__()
        variant = get_variant(sam_variant)
        sam = build_sam(sam_variant, checkpoint=sam_checkpoint)
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.image_size = variant.image_size
        self.grid_size = (variant.grid_size, variant.grid_size)
        self.embed_dim = variant.prompt_embed_dim

        self.image_encoder = sam.image_encoder.requires_grad_(False) if with_image_encoder else None
        self.prompt_encoder = sam.prompt_encoder.requires_grad_(False)
        self.prototypes = PrototypeBank(num_classes, self.embed_dim)
        self.class_prompt_encoder = PrototypePromptEncoder(num_classes, num_tokens, self.grid_size, self.embed_dim)
        self.class_prompt_encoder.init_from_sam_points(self.prompt_encoder.point_embeddings)
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD), persistent=False)
        logger.info("SurgicalSAM trainable parameters: %s", self.trainable_parameter_counts())

    # ----------------------------------------------------------------------------------- parameters
    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part and in total (4,650,726 for C=7, n=2 on a 64x64 grid)."""
        parts = {
            "prototypes": self.prototypes,
            "class_prompt_encoder": self.class_prompt_encoder,
            "mask_decoder": self.mask_decoder,
        }
        counts = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    # -------------------------------------------------------------------------------------- forward
    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W), RGB 0..255 -> image embeddings (B, d, h, w) from the frozen encoder."""
        if self.image_encoder is None:
            raise RuntimeError("this SurgicalSAM was built without its image encoder (with_image_encoder=False)")
        with torch.no_grad():
            sam_input = frames_to_sam_input(frames, self.image_size, self.pixel_mean, self.pixel_std)
            return frozen_encoder_forward(self.image_encoder, sam_input)[0]

    def _to_embeddings(self, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw frames or embeddings -> (embeddings (B, d, h, w), frame size to return logits at)."""
        if inputs.ndim == 4 and inputs.shape[1] == 3:
            return self.embed_frames(inputs), (int(inputs.shape[-2]), int(inputs.shape[-1]))
        if inputs.ndim != 4 or inputs.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected frames (B, 3, H, W) or image embeddings (B, {self.embed_dim}, h, w), got {tuple(inputs.shape)}"
            )
        return inputs.to(self.prototypes.class_embeddings.weight.dtype), self.frame_size  # the network's dtype

    def _check_class_ids(self, class_ids: torch.Tensor) -> None:
        """Class ids must be in 1..C; on an accelerator checked asynchronously (no wait for the device)."""
        if not class_ids.numel():
            return
        if class_ids.device.type == "cpu":
            if int(class_ids.min()) < 1 or int(class_ids.max()) > self.num_classes:
                raise ValueError(f"class ids must be in 1..{self.num_classes}, got {class_ids.tolist()}")
        else:
            torch._assert_async(
                ((class_ids >= 1) & (class_ids <= self.num_classes)).all(),
                f"class ids must be in 1..{self.num_classes}",
            )

    def _decode_prompts(self, image_embeddings, dense, sparse) -> tuple[torch.Tensor, torch.Tensor]:
        low_res, quality = decode_masks(
            self.mask_decoder, image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
        return low_res, quality[:, 0]

    def decode(self, image_embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, d, h, w) and prompted classes (B,) in 1..C -> low-res logits (B, 1, 4h, 4w), quality (B,)."""
        self._check_class_ids(class_ids)
        dense, sparse = self.class_prompt_encoder(image_embeddings, self.prototypes(), class_ids)
        return self._decode_prompts(image_embeddings, dense, sparse)

    def forward(self, inputs: torch.Tensor, class_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            inputs: image embeddings (B, d, h, w) or, with the image encoder, frames (B, 3, H, W).
            class_ids: (B,) the class prompted for each sample, 1..C.

        Returns:
            dict with ``logits`` (B, 1, H, W) at frame size, ``low_res_logits`` (B, 1, 4h, 4w),
            ``quality`` (B,) the IoU head, and for the losses ``image_embeddings`` (B, d, h, w)
            and ``prototypes`` (C, d).
        """
        embeddings, frame_hw = self._to_embeddings(inputs)
        low_res, quality = self.decode(embeddings, class_ids.to(embeddings.device))
        return {
            "logits": low_res_logits_to_frame(low_res, self.image_size, frame_hw),
            "low_res_logits": low_res,
            "quality": quality,
            "image_embeddings": embeddings,
            "prototypes": self.prototypes(),
        }

    def predict_classes(
        self, inputs: torch.Tensor, class_mask: torch.Tensor, pairs_per_pass: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt several classes per frame, batched over all (frame, class) pairs.

        Args:
            inputs: image embeddings (B, d, h, w) or frames (B, 3, H, W).
            class_mask: (B, C) bool, the classes to prompt in each frame.
            pairs_per_pass: how many (frame, class) pairs go through the decoder at once.

        Returns:
            logits (B, C, H, W) at frame size (-inf where a class was not prompted) and
            quality (B, C) (-inf where not prompted).
        """
        embeddings, (frame_h, frame_w) = self._to_embeddings(inputs)
        batch = embeddings.shape[0]
        if tuple(class_mask.shape) != (batch, self.num_classes):
            raise ValueError(f"class_mask must be (B, C) = {(batch, self.num_classes)}, got {tuple(class_mask.shape)}")
        class_mask = class_mask.to(embeddings.device).bool()
        logits = embeddings.new_full((batch, self.num_classes, frame_h, frame_w), float("-inf"))
        quality = embeddings.new_full((batch, self.num_classes), float("-inf"))
        frame_index, class_index = class_mask.nonzero(as_tuple=True)
        if not frame_index.numel():
            return logits, quality
        # the class-activated scales and class tokens of a frame serve every class prompted on it
        scale, tokens = self.class_prompt_encoder.frame_prompts(embeddings, self.prototypes())
        for start in range(0, frame_index.numel(), pairs_per_pass):
            frames = frame_index[start : start + pairs_per_pass]
            classes = class_index[start : start + pairs_per_pass]
            pair_embeddings = embeddings[frames]
            dense, sparse = self.class_prompt_encoder.pair_prompts(
                pair_embeddings, scale[frames], tokens[frames], classes
            )
            low_res, pair_quality = self._decode_prompts(pair_embeddings, dense, sparse)
            pair_logits = low_res_logits_to_frame(low_res, self.image_size, (frame_h, frame_w))[:, 0]
            logits[frames, classes] = pair_logits.to(logits.dtype)  # float32 also under autocast
            quality[frames, classes] = pair_quality.to(quality.dtype)
        return logits, quality
