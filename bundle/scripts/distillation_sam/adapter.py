"""Distillation-SAM's adapter: PVT features + SAM encoder taps -> dense and sparse prompt embeddings.

Pipeline (d = SAM's prompt dim, 256; (h, w) = SAM's embedding grid):

1. PVT (:class:`~.pvt.PyramidVisionTransformer`) on the SAM input image -> 4 stage maps (B, C_i, H_i, W_i).
2. Each map: 1x1 conv C_i -> d, bilinear resize to (h, w); the 4 are concatenated and fused by a
   1x1 conv 4d -> d: adapter tokens A (B, h*w, d).
3. SAM encoder tokens tapped after some ViT blocks (:func:`~scripts.sam.backbone.tapped_encoder_forward`), each (B, h, w, C_vit)
   projected to d (LayerNorm + Linear; C_vit is 768 for vit_b, 96 for tiny).
4. One :class:`CrossAttentionBlock` per tap: A attends to the tapped tokens (8 heads, dim d); SAM's
   dense positional encoding is added to queries and keys (both live on the same grid).
5. Dense prompt: LayerNorm + Linear on A, reshaped (B, d, h, w).
   Sparse prompt: ``num_queries`` learnable queries attend to A (+ positional encoding on the keys)
   through one more block -> (B, num_queries, d).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pvt import PyramidVisionTransformer

__all__ = ["default_tap_blocks", "CrossAttentionBlock", "DistillationAdapter"]


def default_tap_blocks(depth: int, num_taps: int = 3) -> tuple[int, ...]:
    """Evenly spaced ViT blocks to tap, 1-based ("after block k"), the last block always included.

    ``(i + 1) * depth // n`` for i < n, with n = min(num_taps, depth): vit_b (12) -> (4, 8, 12),
    vit_l (24) -> (8, 16, 24), vit_h (32) -> (10, 21, 32), tiny (2) -> (1, 2).
    """
    if depth < 1 or num_taps < 1:
        raise ValueError(f"depth and num_taps must be positive, got {depth} and {num_taps}")
    n = min(num_taps, depth)
    return tuple((i + 1) * depth // n for i in range(n))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP, both residual.

    queries (B, Nq, d), keys/values (B, Nk, d), optional positional encodings added to the queries
    (``query_pe`` (B or 1, Nq, d)) and keys (``key_pe`` (B or 1, Nk, d)) -> (B, Nq, d).
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, mlp_dim: int = 512) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor | None = None,
        key_pe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = self.norm_kv(keys)
        q_in = q if query_pe is None else q + query_pe
        k_in = kv if key_pe is None else kv + key_pe
        queries = queries + self.attn(q_in, k_in, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class DistillationAdapter(nn.Module):
    """
    Args:
        tap_dims: channel width C_vit of each SAM tap, one entry per tap (e.g. ``[768] * 3`` for vit_b).
        embed_dim: d, SAM's prompt dim (256).
        num_heads: heads of the cross-attention blocks (8).
        num_queries: learnable queries of the sparse prompt (16).
        mlp_dim: hidden width of the blocks' MLPs.
        pvt: keyword arguments of :class:`~.pvt.PyramidVisionTransformer` (sizes, ``pretrained``);
            default PVT-tiny with random weights.

    forward: SAM input image (B, 3, S, S), tapped tokens (one (B, h, w, C_vit) per tap), SAM's dense
    positional encoding (1, d, h, w) -> dense prompt (B, d, h, w), sparse prompt (B, num_queries, d).
    """

    def __init__(
        self,
        tap_dims: Sequence[int],
        embed_dim: int = 256,
        num_heads: int = 8,
        num_queries: int = 16,
        mlp_dim: int = 512,
        pvt: Mapping | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be positive, got {num_queries}")
        self.embed_dim = embed_dim
        self.num_taps = len(tap_dims)
        self.pvt = PyramidVisionTransformer(**dict(pvt or {}))
        self.lateral = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.pvt.embed_dims)
        self.fuse = nn.Conv2d(len(self.pvt.embed_dims) * embed_dim, embed_dim, kernel_size=1)
        self.tap_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, embed_dim)) for c in tap_dims)
        self.tap_blocks = nn.ModuleList(CrossAttentionBlock(embed_dim, num_heads, mlp_dim) for _ in tap_dims)
        self.dense_out = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim))
        self.queries = nn.Embedding(num_queries, embed_dim)
        self.query_block = CrossAttentionBlock(embed_dim, num_heads, mlp_dim)
        self.sparse_norm = nn.LayerNorm(embed_dim)

    def forward(
        self, image: torch.Tensor, taps: Sequence[torch.Tensor], image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(taps) != self.num_taps:
            raise ValueError(f"this adapter was built for {self.num_taps} SAM taps, got {len(taps)}")
        batch = image.shape[0]
        height, width = image_pe.shape[-2:]
        maps = [
            F.interpolate(lateral(feature), size=(height, width), mode="bilinear", align_corners=False)
            for lateral, feature in zip(self.lateral, self.pvt(image))
        ]
        tokens = self.fuse(torch.cat(maps, dim=1)).flatten(2).transpose(1, 2)  # (B, h*w, d)
        pe = image_pe.flatten(2).transpose(1, 2)  # (1, h*w, d)
        for proj, block, tap in zip(self.tap_proj, self.tap_blocks, taps):
            if tuple(tap.shape[1:3]) != (height, width):
                raise ValueError(f"SAM tap of shape {tuple(tap.shape)} is not on the ({height}, {width}) grid")
            tokens = block(tokens, proj(tap.flatten(1, 2)), query_pe=pe, key_pe=pe)
        dense = self.dense_out(tokens).transpose(1, 2).reshape(batch, self.embed_dim, height, width)
        queries = self.queries.weight.unsqueeze(0).expand(batch, -1, -1)
        sparse = self.sparse_norm(self.query_block(queries, tokens, key_pe=pe))
        return dense, sparse
