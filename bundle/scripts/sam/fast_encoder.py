"""A faster forward pass of segment-anything's ``ImageEncoderViT``, on the same module and weights.

segment-anything's attention makes the full (B * heads, N, N) matrix of scores, adds the decomposed
relative-position terms to it in a second copy, and takes its softmax in a third (N = 4096 tokens in the
global blocks of the official variants: 64 MiB per head and frame, each). :func:`fast_encoder_forward`
computes the same function with ``torch.nn.functional.scaled_dot_product_attention``: the relative-position
terms become the attention's additive mask (one (N, N) tensor per head, built from the two small
(N, h) and (N, w) products), and the fused kernel never keeps the scores. Heads are taken a few at a time
so that the masks of one step stay under ``max_mask_bytes`` (peak memory bounded for ViT-H and batches).

Everything else (patch embedding, windows, MLP, neck) runs segment-anything's own modules. The result equals
``image_encoder(x)`` to float32 rounding (tests: every variant's block layout, windowed and global blocks,
padded windows, taps, against float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import import_sam_modeling, tapped_encoder_forward

#: Default bound on the relative-position masks held at once by one attention step (bytes).
DEFAULT_MAX_MASK_BYTES = 256 * 2**20


def relative_position_mask(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position terms as an additive attention mask.

    Args:
        q: queries (M, h * w, C), unscaled, tokens in row-major (y, x) order.
        rel_pos_h, rel_pos_w: the attention's ``rel_pos_h`` (2h - 1 or any length, C) and ``rel_pos_w``.
        size: (h, w) of the token grid; queries and keys share it.

    Returns:
        (M, h * w, h * w): entry (m, i, j) = q_i . R_h[y_i - y_j] + q_i . R_w[x_i - x_j], in q's dtype.
    """
    get_rel_pos = import_sam_modeling().image_encoder.get_rel_pos
    height, width = size
    grid_h = get_rel_pos(height, height, rel_pos_h).to(q.dtype)  # (h, h, C)
    grid_w = get_rel_pos(width, width, rel_pos_w).to(q.dtype)  # (w, w, C)
    rows = q.reshape(q.shape[0], height, width, q.shape[-1])
    along_h = torch.einsum("myxc,ykc->myxk", rows, grid_h)  # (M, h, w, h)
    along_w = torch.einsum("myxc,xkc->myxk", rows, grid_w)  # (M, h, w, w)
    mask = along_h[..., :, None] + along_w[..., None, :]  # (M, h, w, h, w)
    return mask.reshape(q.shape[0], height * width, height * width)


def fast_attention(attention: nn.Module, x: torch.Tensor, max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES) -> torch.Tensor:
    """``attention(x)`` for segment-anything's ``Attention`` through the fused attention kernel.

    Args:
        attention: ``segment_anything.modeling.image_encoder.Attention``.
        x: tokens (B, h, w, dim).
        max_mask_bytes: bound on the relative-position masks built at once (heads are taken in groups).

    Returns:
        (B, h, w, dim), equal to ``attention(x)`` to float32 rounding.
    """
    batch, height, width, _ = x.shape
    tokens, heads = height * width, attention.num_heads
    qkv = attention.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, tokens, -1).unbind(0)  # each (B * heads, N, C)
    # 4-D operands (1, M, N, C): the fused CPU kernel takes only those (3-D ones fall back to the plain math)
    if not attention.use_rel_pos:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=attention.scale)[0]
    else:
        per_mask = tokens * tokens * q.element_size()
        step = max(1, min(q.shape[0], int(max_mask_bytes // per_mask)))
        out = torch.empty_like(v)
        for start in range(0, q.shape[0], step):
            part = slice(start, start + step)
            mask = relative_position_mask(q[part], attention.rel_pos_h, attention.rel_pos_w, (height, width))
            out[part] = F.scaled_dot_product_attention(
                q[None, part], k[None, part], v[None, part], attn_mask=mask[None], scale=attention.scale
            )[0]
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return attention.proj(out)


def fast_block(block: nn.Module, x: torch.Tensor, max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES) -> torch.Tensor:
    """``block(x)`` for segment-anything's ViT ``Block`` (windowed or global) with :func:`fast_attention`.

    Args:
        block: ``segment_anything.modeling.image_encoder.Block``.
        x: tokens (B, H, W, dim).

    Returns:
        (B, H, W, dim).
    """
    image_encoder = import_sam_modeling().image_encoder
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padded = image_encoder.window_partition(x, block.window_size)
    x = fast_attention(block.attn, x, max_mask_bytes)
    if block.window_size > 0:
        x = image_encoder.window_unpartition(x, block.window_size, padded, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def fast_encoder_forward(
    image_encoder: nn.Module,
    x: torch.Tensor,
    tap_blocks: Sequence[int] = (),
    max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """segment-anything's ``ImageEncoderViT.forward`` with :func:`fast_block`, also returning tapped tokens.

    Args:
        image_encoder: ``ImageEncoderViT``.
        x: SAM input (B, 3, S, S).
        tap_blocks: 1-based block numbers whose output tokens are also returned (may be empty).
        max_mask_bytes: see :func:`fast_attention`.

    Returns:
        the image embedding (B, d, S / p, S / p), equal to ``image_encoder(x)`` to float32 rounding, and the
        tapped tokens, one (B, S / p, S / p, C_vit) per entry of ``tap_blocks`` in the given order.
    """
    return tapped_encoder_forward(
        image_encoder, x, tap_blocks, block_forward=partial(fast_block, max_mask_bytes=max_mask_bytes)
    )


def frozen_encoder_forward(
    image_encoder: nn.Module, x: torch.Tensor, tap_blocks: Sequence[int] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frozen encoder as the bundle runs it: :func:`fast_encoder_forward`, except while a graph is traced or
    exported (TorchScript, ONNX), where segment-anything's own operations are recorded.

    Returns:
        (embedding (B, d, h, w), tapped tokens), as :func:`fast_encoder_forward`.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return tapped_encoder_forward(image_encoder, x, tap_blocks)
    return fast_encoder_forward(image_encoder, x, tap_blocks)
