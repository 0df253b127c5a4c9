"""Distillation-SAM (TMI): frozen SAM + a trainable prompt adapter and class head; multi-class in one pass.

Frozen (``requires_grad=False``, kept in eval mode by :meth:`DistillationSAM.train`): SAM's image
encoder, prompt encoder and mask decoder. Trainable: the adapter
(:class:`~.adapter.DistillationAdapter`, PVT-tiny inside) and the class head.

Student path (:meth:`DistillationSAM.forward`, frames (B, 3, H, W), RGB 0..255):

1. SAM input (B, 3, S, S); the frozen encoder gives the embedding E (B, d, h, w) and the tokens
   after the tap blocks (no gradient).
2. Adapter -> dense prompt (B, d, h, w) and sparse prompt (B, Q, d).
3. Frozen decoder (:func:`~scripts.sam.batched_mask_decoder.decode_masks`, all 4 mask tokens: the single-mask
   token and the 3 multimask ones) -> mask logits M (B, 4, 4h, 4w) and mask tokens (B, 4, d).
   Gradients flow through the frozen decoder into the adapter.
4. Class head: MLP d -> 256 -> 256 -> C + 1 (ReLU between) on each mask token -> class logits
   (B, 4, C + 1); channel 0 is background.
5. Semantic logits (the Distillation-SAM announcement's "sum over tokens of mask logits x class probabilities")::

       semantic[b, c] = sum_t softmax(class_logits[b, t])[c] * M[b, t]            (combine="logits")
       semantic[b, c] = sum_t softmax(class_logits[b, t])[c] * sigmoid(M[b, t])   (combine="sigmoid")

   at low resolution (B, C + 1, 4h, 4w); brought to frame size with
   :func:`~scripts.sam.geometry.low_res_logits_to_frame` (B, C + 1, H, W); label map = argmax over the
   C + 1 channels at frame size (B, H, W) (ties: the lowest channel, i.e. background first).

Teacher path (:meth:`DistillationSAM.teacher`): SAM is a binary segmenter, so the teacher of a frame
is SAM prompted with the frame's *instrument foreground* (every pixel whose label is in 1..C; ignored
pixels excluded): prompts sampled from that mask (:mod:`.teacher_prompts`), the frozen prompt encoder,
then the frozen decoder on the same image embedding. Its 4 decoder mask tokens and its dense embedding
are the distillation targets of the student's 4 mask tokens and dense prompt (one teacher per frame;
class identity is learnt by the class head from the cross-entropy). A frame without instruments has
the empty-mask teacher (not-a-point tokens, an all -10 mask).

Trainable parameters (vit_b, taps 4/8/12, C = 7, defaults): 16,151,048; the paper reports 13.8M
"including PVT-tiny". PVT-tiny without its ImageNet head is 12,715,264 on its own, which leaves the
paper ~1.1M for everything else; the paper's adapter layout is not published. Ours: PVT 12,715,264;
lateral 1x1 convs 263,168; fusion conv 262,400; tap projections 3 x (LayerNorm + 768->256) 595,200;
3 tap cross-attention blocks 1,582,848 and the query block 527,616 (MLP width 512; ``adapter_mlp_dim=256``
saves 0.53M); dense output 66,304; queries 4,096; sparse norm 512; class head 133,640.
For the tiny test SAM (96-wide taps, 2 taps): 15,077,252 for C = 3.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sam.backbone import build_sam, get_variant
from ..sam.batched_mask_decoder import decode_masks
from ..sam.fast_encoder import frozen_encoder_forward
from ..sam.frozen_parts import FrozenSamParts
from ..sam.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD, frames_to_sam_input, low_res_logits_to_frame
from .adapter import DistillationAdapter, default_tap_blocks
from .teacher_prompts import sample_teacher_prompts, teacher_prompt_embeddings

logger = logging.getLogger(__name__)

__all__ = ["DistillationSAM", "ClassHead", "semantic_logits", "FROZEN_PREFIXES", "COMBINE_MODES"]

#: State-dict prefixes of the frozen SAM parts: never saved with the model, always the SAM checkpoint's.
FROZEN_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
COMBINE_MODES = ("logits", "sigmoid")


class ClassHead(nn.Module):
    """MLP on mask tokens: (..., d) -> (..., C + 1); Linear d->hidden, ReLU, Linear hidden->hidden, ReLU,
    Linear hidden->C+1."""

    def __init__(self, num_classes: int, embed_dim: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_classes + 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)


def semantic_logits(mask_logits: torch.Tensor, class_logits: torch.Tensor, combine: str = "logits") -> torch.Tensor:
    """Mask logits (B, T, h, w) and class logits (B, T, K) -> semantic logits (B, K, h, w).

    ``sum_t softmax(class_logits[:, t])[k] * m_t`` with m_t the mask logits (``combine="logits"``) or
    their sigmoid (``combine="sigmoid"``).
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(
            f"mask logits {tuple(mask_logits.shape)} and class logits {tuple(class_logits.shape)} must agree on (B, T)"
        )
    masks = mask_logits if combine == "logits" else mask_logits.sigmoid()
    return torch.einsum("btk,bthw->bkhw", class_logits.softmax(-1), masks)


class DistillationSAM(FrozenSamParts):
    """
    Args:
        num_classes: C, classes 1..C (0 is background); the head predicts C + 1.
        frame_size: (H, W) of the frames (used where the input size cannot tell, e.g. configs);
            ``forward`` returns frame-size outputs at the size of the frames it gets.
        sam_variant: ``vit_h``, ``vit_l``, ``vit_b`` or ``tiny``.
        sam_checkpoint: SAM weights for the frozen parts; None = random (tests only).
        taps: 1-based ViT blocks whose output the adapter attends to; None = ``num_taps`` evenly
            spaced (:func:`~.adapter.default_tap_blocks`).
        num_taps: number of taps when ``taps`` is None.
        num_queries: learnable queries of the sparse prompt (16).
        pvt: keyword arguments of the PVT (sizes, ``pretrained`` path of an ImageNet PVT v1 file).
        adapter_mlp_dim: hidden width of the adapter's cross-attention MLPs.
        class_head_hidden_dim: hidden width of the class head.
        combine: how mask logits and class probabilities make semantic logits (see module docstring).
        teacher_strategy, teacher_num_points, teacher_num_negative_points: sparse teacher prompts
            (see :mod:`.teacher_prompts`).
        ignore_index: label value excluded from the teacher's foreground (None: none).
        pvt_input_size: side of the (square) image the PVT sees: the SAM input (B, 3, S, S) resized
            (bilinear, antialiased) to (B, 3, P, P); None = S, the SAM input itself. A smaller P makes
            the adapter cheaper where the frames are smaller than S (the demo's 128x160 frames are
            upsampled to 256 for SAM); it does not change the shapes of any weight.
        logit_scale: None (the paper's semantic logits, as they are) or the initial value of a learnable
            scale s > 0 (one parameter, stored as log s) that multiplies the semantic logits. A bundle
            option for a frozen decoder whose mask logits are small: the demo's random-weight tiny SAM
            gives |mask logits| < 0.4 whatever the prompt, so unscaled semantic logits cannot express
            a confident pixel and the cross-entropy stays near log(C + 1).

    Like SurgicalSAM, :meth:`state_dict` leaves the frozen SAM parts out and :meth:`load_state_dict`
    is strict about every other key (:class:`~scripts.sam.frozen_parts.FrozenSamParts`).
    """

    network_name = "DistillationSAM"
    frozen_parts = ("image_encoder", "prompt_encoder", "mask_decoder")
    unsaved_prefixes = FROZEN_PREFIXES
    mismatch_hint = (
        "A checkpoint of another method or configuration (num_classes, sam_variant, taps, num_queries, PVT sizes, "
        "logit_scale on or off) or saved under another key (e.g. 'module.') was given"
    )

    def __init__(
        self,
        num_classes: int,
        frame_size: Sequence[int],
        sam_variant: str = "vit_b",
        sam_checkpoint: str | None = None,
        taps: Sequence[int] | None = None,
        num_taps: int = 3,
        num_queries: int = 16,
        pvt: Mapping | None = None,
        adapter_mlp_dim: int = 512,
        class_head_hidden_dim: int = 256,
        combine: str = "logits",
        teacher_strategy: str = "box",
        teacher_num_points: int = 1,
        teacher_num_negative_points: int = 0,
        ignore_index: int | None = None,
        pvt_input_size: int | None = None,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        variant = get_variant(sam_variant)
        sam = build_sam(sam_variant, checkpoint=sam_checkpoint)
        self.num_classes = num_classes
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.image_size = variant.image_size
        self.grid_size = (variant.grid_size, variant.grid_size)
        self.embed_dim = variant.prompt_embed_dim
        if taps is None:
            taps = default_tap_blocks(variant.encoder_depth, num_taps)
        self.taps = tuple(int(k) for k in taps)
        if not self.taps or any(not 1 <= k <= variant.encoder_depth for k in self.taps):
            raise ValueError(f"taps must be 1-based blocks in 1..{variant.encoder_depth} for {sam_variant}, got {taps}")
        self.combine = combine
        self.teacher_strategy = teacher_strategy
        self.teacher_num_points = teacher_num_points
        self.teacher_num_negative_points = teacher_num_negative_points
        self.ignore_index = ignore_index
        if pvt_input_size is not None and int(pvt_input_size) < 32:
            raise ValueError(
                f"pvt_input_size must be None (the SAM input size) or at least 32 (the PVT downsamples "
                f"by 32), got {pvt_input_size}"
            )
        self.pvt_input_size = None if pvt_input_size is None else int(pvt_input_size)

        self.image_encoder = sam.image_encoder.requires_grad_(False)
        self.prompt_encoder = sam.prompt_encoder.requires_grad_(False)
        self.mask_decoder = sam.mask_decoder.requires_grad_(False)
        self.adapter = DistillationAdapter(
            [variant.encoder_embed_dim] * len(self.taps),
            self.embed_dim,
            num_heads=8,
            num_queries=num_queries,
            mlp_dim=adapter_mlp_dim,
            pvt=pvt,
        )
        self.class_head = ClassHead(num_classes, self.embed_dim, class_head_hidden_dim)
        if logit_scale is not None and not float(logit_scale) > 0:
            raise ValueError(f"logit_scale must be None or a positive initial scale, got {logit_scale}")
        self.log_logit_scale = None if logit_scale is None else nn.Parameter(torch.tensor(float(logit_scale)).log())
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD), persistent=False)
        self.train(False)
        logger.info("DistillationSAM trainable parameters (taps %s): %s", self.taps, self.trainable_parameter_counts())

    # ----------------------------------------------------------------------------------- parameters
    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part and in total."""
        parts = {"pvt": self.adapter.pvt, "adapter": self.adapter, "class_head": self.class_head}
        counts = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}
        counts["adapter_without_pvt"] = counts["adapter"] - counts["pvt"]
        counts["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    # -------------------------------------------------------------------------------------- forward
    def encode(
        self,
        frames: torch.Tensor,
        embedding: torch.Tensor | None = None,
        taps: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Frames (B, 3, H, W) 0..255 -> SAM input (B, 3, S, S), embedding (B, d, h, w), taps [(B, h, w, C_vit)].

        ``embedding`` and ``taps`` (a list of (B, h, w, C_vit) or one (B, n_taps, h, w, C_vit) tensor, e.g.
        from the tap cache) skip the frozen encoder; they must be what it gives for these frames.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B, 3, H, W) (RGB, 0..255), got {tuple(frames.shape)}")
        sam_input = frames_to_sam_input(frames, self.image_size, self.pixel_mean, self.pixel_std)
        if (embedding is None) != (taps is None):
            raise ValueError("give both the cached embedding and the cached taps, or neither")
        if embedding is None:
            with torch.no_grad():
                embedding, taps = frozen_encoder_forward(self.image_encoder, sam_input, self.taps)
            return sam_input, embedding, taps
        if isinstance(taps, torch.Tensor):
            taps = list(taps.unbind(1))
        expected = (frames.shape[0], self.embed_dim, *self.grid_size)
        if tuple(embedding.shape) != expected:
            raise ValueError(
                f"cached embedding of shape {tuple(embedding.shape)}, expected {expected}: the cache was "
                "made by another SAM variant"
            )
        if len(taps) != len(self.taps):
            raise ValueError(
                f"got {len(taps)} cached taps, this network taps blocks {self.taps}: rebuild the tap "
                "cache for these taps (precompute)"
            )
        return sam_input, embedding.to(sam_input.dtype), [t.to(sam_input.dtype) for t in taps]

    def adapter_input(self, sam_input: torch.Tensor) -> torch.Tensor:
        """SAM input (B, 3, S, S) -> the PVT's input (B, 3, P, P) (``pvt_input_size``; P = S: unchanged)."""
        if self.pvt_input_size is None or self.pvt_input_size == sam_input.shape[-1]:
            return sam_input
        size = (self.pvt_input_size, self.pvt_input_size)
        return F.interpolate(sam_input, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward(
        self,
        frames: torch.Tensor,
        label: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        embedding: torch.Tensor | None = None,
        taps: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            frames: (B, 3, H, W) RGB on the 0..255 scale.
            label: optional GT label maps (B, H, W) or (B, 1, H, W); when given, the teacher's outputs
                are added (training), computed on the same image embedding.
            generator: random source of the teacher's point prompts.
            embedding, taps: the frozen encoder's outputs for these frames from the tap cache
                ((B, d, h, w) and (B, n_taps, h, w, C_vit) or a list of (B, h, w, C_vit)); None: run it.

        Returns:
            dict: ``semantic_logits`` (B, C+1, H, W), ``semantic_low_res`` (B, C+1, 4h, 4w),
            ``label_map`` (B, H, W) long, ``mask_logits`` (B, 4, 4h, 4w), ``class_logits`` (B, 4, C+1),
            ``mask_tokens`` (B, 4, d), ``dense`` (B, d, h, w), ``sparse`` (B, Q, d); with ``label`` also
            ``teacher_mask_tokens`` (B, 4, d) and ``teacher_dense`` (B, d, h, w).
        """
        sam_input, embedding, taps = self.encode(frames, embedding, taps)
        image_pe = self.prompt_encoder.get_dense_pe()
        dense, sparse = self.adapter(self.adapter_input(sam_input), taps, image_pe)
        mask_logits, _, mask_tokens = decode_masks(
            self.mask_decoder, embedding, image_pe, sparse, dense, return_mask_tokens=True, all_mask_outputs=True
        )
        class_logits = self.class_head(mask_tokens)
        low_res = semantic_logits(mask_logits, class_logits, self.combine)
        if self.log_logit_scale is not None:
            low_res = low_res * self.log_logit_scale.exp()
        full = low_res_logits_to_frame(low_res, self.image_size, frames.shape[-2:])
        out = {
            "semantic_logits": full,
            "semantic_low_res": low_res,
            "label_map": full.argmax(1),
            "mask_logits": mask_logits,
            "class_logits": class_logits,
            "mask_tokens": mask_tokens,
            "dense": dense,
            "sparse": sparse,
        }
        if label is not None:
            teacher_tokens, teacher_dense = self.teacher(embedding, label, generator)
            out["teacher_mask_tokens"] = teacher_tokens
            out["teacher_dense"] = teacher_dense
        return out

    def foreground(self, label: torch.Tensor) -> torch.Tensor:
        """Label maps (B, H, W) or (B, 1, H, W) -> the teacher's mask (B, H, W) bool: labels in 1..C."""
        if label.ndim == 4 and label.shape[1] == 1:
            label = label[:, 0]
        if label.ndim != 3:
            raise ValueError(f"expected label maps of shape (B, H, W) or (B, 1, H, W), got {tuple(label.shape)}")
        mask = (label >= 1) & (label <= self.num_classes)
        if self.ignore_index is not None:
            mask &= label != self.ignore_index
        return mask

    @torch.no_grad()
    def teacher(
        self, image_embeddings: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher of each frame (see module docstring): embeddings (B, d, h, w) and label maps (B, H, W)
        -> decoder mask tokens (B, 4, d) and dense embedding (B, d, h, w), without gradient."""
        prompts = sample_teacher_prompts(
            self.foreground(label),
            self.image_size,
            self.grid_size,
            self.teacher_strategy,
            self.teacher_num_points,
            self.teacher_num_negative_points,
            generator,
        )
        sparse, dense = teacher_prompt_embeddings(self.prompt_encoder, prompts)
        _, _, tokens = decode_masks(
            self.mask_decoder,
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            return_mask_tokens=True,
            all_mask_outputs=True,
        )
        return tokens, dense
