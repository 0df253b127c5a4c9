"""The fast image-encoder forward (scripts.sam.fast_encoder) computes segment-anything's ImageEncoderViT.

Each case compares both float32 paths against segment-anything's own forward run in float64: the fast path's
error is bounded by a small multiple of the plain path's own float32 rounding, and the two float32 results
agree within 1e-4 relative to the embedding's scale (issue 24's bound). Weights are random everywhere,
the relative-position tables included (segment-anything initialises them to zero, which would hide them).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from scripts.sam.backbone import SAM_VARIANTS, build_sam, import_sam_modeling, tapped_encoder_forward
from scripts.sam.fast_encoder import fast_attention, fast_encoder_forward, relative_position_mask


def small_encoder(variant: str, image_size: int, depth: int = 2, global_blocks: tuple[int, ...] = (1,)) -> nn.Module:
    """An encoder with ``variant``'s width, heads and window, on a small input and a few blocks, random weights."""
    spec = SAM_VARIANTS[variant]
    encoder = import_sam_modeling().ImageEncoderViT(
        img_size=image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.encoder_embed_dim,
        depth=depth,
        num_heads=spec.encoder_num_heads,
        mlp_ratio=4,
        out_chans=spec.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.window_size,
        global_attn_indexes=global_blocks,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            scale = 0.5 if "rel_pos" in name else 0.05
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return encoder.eval()


def errors_against_float64(encoder: nn.Module, x: torch.Tensor, **fast_kwargs) -> tuple[float, float, float]:
    """(plain float32 error, fast float32 error, |fast - plain|), each relative to the float64 embedding's max."""
    exact = copy.deepcopy(encoder).double()(x.double())
    with torch.no_grad():
        plain = encoder(x)
        fast, _ = fast_encoder_forward(encoder, x, **fast_kwargs)
    scale = exact.abs().max().item()
    return (
        (plain.double() - exact).abs().max().item() / scale,
        (fast.double() - exact).abs().max().item() / scale,
        (fast - plain).abs().max().item() / scale,
    )


def assert_equal_to_float32_rounding(plain_error: float, fast_error: float, difference: float) -> None:
    assert fast_error <= 4 * plain_error + 1e-7, (fast_error, plain_error)
    assert difference <= 1e-4, difference


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h", "tiny"])
def test_fast_forward_equals_the_encoder_for_every_variant_layout(variant):
    """Each variant's width, heads and window size; a windowed and a global block; the 5x5 grid of an 80-pixel
    input pads the windows of 14 (8 for tiny) on both sides."""
    torch.manual_seed(1)
    encoder = small_encoder(variant, image_size=80)
    x = torch.randn(2, 3, 80, 80)
    assert_equal_to_float32_rounding(*errors_against_float64(encoder, x))


def test_fast_forward_equals_the_encoder_on_odd_padding_and_several_blocks():
    """A 9x9 grid under windows of 4 (pad 3), windowed blocks on both sides of two global ones."""
    spec = SAM_VARIANTS["tiny"]
    encoder = import_sam_modeling().ImageEncoderViT(
        img_size=144,
        patch_size=16,
        embed_dim=spec.encoder_embed_dim,
        depth=4,
        num_heads=3,
        mlp_ratio=4,
        out_chans=32,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1, 2),
    )
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.1)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 144, 144)
    assert_equal_to_float32_rounding(*errors_against_float64(encoder.eval(), x))


def test_head_groups_do_not_change_the_result():
    """A mask budget of one head at a time gives what one step over every head gives."""
    encoder = small_encoder("vit_b", image_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        whole, _ = fast_encoder_forward(encoder, x)
        one_head, _ = fast_encoder_forward(encoder, x, max_mask_bytes=1)
    torch.testing.assert_close(one_head, whole, rtol=0, atol=1e-6)


def test_taps_equal_the_plain_tapped_forward():
    encoder = small_encoder("tiny", image_size=64, depth=3, global_blocks=(1,))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain, plain_taps = tapped_encoder_forward(encoder, x, [3, 1])
        fast, fast_taps = fast_encoder_forward(encoder, x, [3, 1])
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert [t.shape for t in fast_taps] == [t.shape for t in plain_taps] == [(1, 4, 4, 96)] * 2
    for fast_tap, plain_tap in zip(fast_taps, plain_taps):
        torch.testing.assert_close(fast_tap, plain_tap, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="tap blocks must be in 1..3"):
        fast_encoder_forward(encoder, x, [4])


def test_relative_position_mask_is_the_decomposed_terms():
    """Entry (i, j) is q_i . R_h[y_i - y_j + h - 1] + q_i . R_w[x_i - x_j + w - 1], written out."""
    height, width, channels = 3, 4, 5
    q = torch.randn(2, height * width, channels, dtype=torch.float64)
    rel_h, rel_w = (
        torch.randn(2 * height - 1, channels, dtype=torch.float64),
        torch.randn(2 * width - 1, channels, dtype=torch.float64),
    )
    mask = relative_position_mask(q, rel_h, rel_w, (height, width))
    assert mask.shape == (2, 12, 12)
    for i in range(height * width):
        for j in range(height * width):
            (yi, xi), (yj, xj) = divmod(i, width), divmod(j, width)
            expected = q[:, i] @ rel_h[yi - yj + height - 1] + q[:, i] @ rel_w[xi - xj + width - 1]
            torch.testing.assert_close(mask[:, i, j], expected, rtol=0, atol=1e-12)


def test_fast_attention_without_relative_positions():
    attention = import_sam_modeling().image_encoder.Attention(48, num_heads=4, use_rel_pos=False).eval()
    x = torch.randn(2, 5, 6, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast_attention(attention, x), attention(x), rtol=0, atol=1e-5)


def test_tiny_sam_encoder_as_built_by_the_bundle():
    """The bundle's own tiny SAM (its 16x16 grid, windows of 8, one global block), at its input size."""
    torch.manual_seed(3)
    encoder = build_sam("tiny").image_encoder
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0, 0.5)
    assert_equal_to_float32_rounding(*errors_against_float64(encoder, torch.randn(2, 3, 256, 256)))
