"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021), the image branch of Distillation-SAM's adapter.

Four stages; stage i embeds non-overlapping patches (a strided convolution, then LayerNorm), adds a
learned position embedding, and runs ``depths[i]`` transformer blocks whose attention reduces the
keys/values spatially by ``sr_ratios[i]`` (a strided convolution + LayerNorm). Defaults are PVT-tiny:
embed dims 64/128/320/512, depths 2/2/2/2, heads 1/2/5/8, patch sizes 4/2/2/2, spatial-reduction
ratios 8/4/2/1, mlp ratios 8/8/4/4 (12.7M parameters without the ImageNet head).

Inputs of any size: a stage whose input is not a multiple of its patch size is zero-padded on the
bottom/right, so for an (H, W) image the stages have ceil(H/4), ceil(H/8), ceil(H/16), ceil(H/32)
rows (likewise for columns). Position embeddings are stored for ``pretrain_image_size`` (224 as in
ImageNet training) and resized bicubically to the stage grid when it differs.

Parameter names follow the public PVT v1 release (``whai362/PVT``, ``classification/pvt.py``), so
its ImageNet checkpoints (e.g. ``pvt_tiny.pth``) load with :meth:`PyramidVisionTransformer.load_pretrained`::

    patch_embed{1..4}.proj.{weight,bias}    patch_embed{1..4}.norm.{weight,bias}
    pos_embed{1..4}                         (1, N_i, C_i); the release's pos_embed4 has N_4 + 1 rows,
                                            the first one belonging to its class token
    block{1..4}.{j}.norm1 / norm2           block{1..4}.{j}.attn.{q,kv,proj}
    block{1..4}.{j}.attn.{sr,norm}          (only where sr_ratio > 1)
    block{1..4}.{j}.mlp.{fc1,fc2}           norm (after stage 4)
    cls_token, head.*                       (classification only: ignored here)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sam.checkpoint import read_checkpoint_dict, state_dict_mismatch

__all__ = ["PyramidVisionTransformer", "PVT_TINY", "IGNORED_PRETRAINED_KEYS"]

#: PVT-tiny sizes (the constructor's defaults).
PVT_TINY = {
    "embed_dims": (64, 128, 320, 512),
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 5, 8),
    "patch_sizes": (4, 2, 2, 2),
    "sr_ratios": (8, 4, 2, 1),
    "mlp_ratios": (8, 8, 4, 4),
}
#: Keys of the classification release that this backbone has no use for.
IGNORED_PRETRAINED_KEYS = ("cls_token", "head.weight", "head.bias")


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> tokens (B, h*w, C), (h, w) with h = ceil(H / patch), w = ceil(W / patch)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (height, width)


class SpatialReductionAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from the token grid reduced ``sr_ratio`` times.

    tokens (B, N, C) on an (h, w) grid -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = int(sr_ratio)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(batch, num_tokens, heads, dim // heads).transpose(1, 2)
        source = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(batch, dim, *hw)
            r = self.sr_ratio
            pad_h, pad_w = (-hw[0]) % r, (-hw[1]) % r
            if pad_h or pad_w:  # grids that are not a multiple of the ratio (any input size)
                grid = F.pad(grid, (0, pad_w, 0, pad_h))
            source = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(source).reshape(batch, source.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention: (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x))


class PyramidVisionTransformer(nn.Module):
    """PVT v1 backbone returning the four stage feature maps.

    Args:
        in_channels: image channels.
        embed_dims, depths, num_heads, patch_sizes, sr_ratios, mlp_ratios: per-stage sizes
            (4 entries each; defaults: PVT-tiny, see :data:`PVT_TINY`).
        pretrain_image_size: image side the position embeddings are stored for (224 for the
            ImageNet release); other inputs get them resized.
        pretrained: path of an ImageNet checkpoint in the PVT v1 release layout (see the module
            docstring), loaded by :meth:`load_pretrained`; None keeps the random initialisation.

    forward: image (B, in_channels, H, W) -> list of 4 maps (B, C_i, H_i, W_i) with
    H_1 = ceil(H / 4), H_2 = ceil(H_1 / 2), H_3 = ceil(H_2 / 2), H_4 = ceil(H_3 / 2) for the default
    patch sizes (H/4, H/8, H/16, H/32 when H is a multiple of 32).
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dims: Sequence[int] = PVT_TINY["embed_dims"],
        depths: Sequence[int] = PVT_TINY["depths"],
        num_heads: Sequence[int] = PVT_TINY["num_heads"],
        patch_sizes: Sequence[int] = PVT_TINY["patch_sizes"],
        sr_ratios: Sequence[int] = PVT_TINY["sr_ratios"],
        mlp_ratios: Sequence[float] = PVT_TINY["mlp_ratios"],
        pretrain_image_size: int = 224,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        sizes = {
            "embed_dims": embed_dims,
            "depths": depths,
            "num_heads": num_heads,
            "patch_sizes": patch_sizes,
            "sr_ratios": sr_ratios,
            "mlp_ratios": mlp_ratios,
        }
        lengths = {name: len(value) for name, value in sizes.items()}
        if set(lengths.values()) != {4}:
            raise ValueError(f"PVT has 4 stages: every per-stage size needs 4 entries, got lengths {lengths}")
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.num_stages = 4
        grid = int(pretrain_image_size)
        channels = in_channels
        for i in range(self.num_stages):
            stage = i + 1
            grid = math.ceil(grid / patch_sizes[i])
            setattr(self, f"patch_embed{stage}", PatchEmbed(channels, embed_dims[i], patch_sizes[i]))
            pos = nn.Parameter(torch.zeros(1, grid * grid, embed_dims[i]))
            nn.init.trunc_normal_(pos, std=0.02)
            setattr(self, f"pos_embed{stage}", pos)
            setattr(
                self,
                f"block{stage}",
                nn.ModuleList(
                    Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i]) for _ in range(depths[i])
                ),
            )
            channels = embed_dims[i]
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self._init_weights()
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _resize_pos_embed(pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(1, n*n, C) stored for a square grid -> (1, h*w, C), bicubic when the grid differs."""
        side = math.isqrt(pos.shape[1])
        if (side, side) == tuple(hw):
            return pos
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        features = []
        for stage in range(1, self.num_stages + 1):
            tokens, hw = getattr(self, f"patch_embed{stage}")(x)
            tokens = tokens + self._resize_pos_embed(getattr(self, f"pos_embed{stage}"), hw)
            for block in getattr(self, f"block{stage}"):
                tokens = block(tokens, hw)
            if stage == self.num_stages:
                tokens = self.norm(tokens)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *hw)
            features.append(x)
        return features

    # ------------------------------------------------------------------------------------- loading
    def convert_release_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A PVT v1 release state dict -> this module's keys: drop the classification-only keys
        (:data:`IGNORED_PRETRAINED_KEYS`) and the class-token row of ``pos_embed4``."""
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        converted = {k: v for k, v in state_dict.items() if k not in IGNORED_PRETRAINED_KEYS}
        last = f"pos_embed{self.num_stages}"
        pos = converted.get(last)
        expected = getattr(self, last)
        if pos is not None and pos.ndim == 3 and pos.shape[1] == expected.shape[1] + 1:
            converted[last] = pos[:, 1:]
        return converted

    def load_pretrained(self, path: str) -> None:
        """Load an ImageNet checkpoint of the PVT v1 release layout from ``path``.

        Raises FileNotFoundError for a missing file and ValueError, naming missing/unexpected keys
        and mismatched shapes, when the file does not hold this configuration's weights; nothing is
        loaded in that case.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"PVT checkpoint not found: {path} (expected an ImageNet PVT v1 file, e.g. pvt_tiny.pth)"
            )
        raw = read_checkpoint_dict(path, "PVT checkpoint", expected="a state dict")
        state_dict = self.convert_release_state_dict(raw)
        details = state_dict_mismatch(state_dict, self.state_dict())
        if details:
            raise ValueError(
                f"PVT checkpoint {path} does not fit this PVT (embed dims {self.embed_dims}): {'; '.join(details)}. "
                "Expected the PVT v1 release layout (patch_embed1.proj.weight, pos_embed1, block1.0.attn.q.weight, "
                "..., norm.weight) of the same sizes and pretrain_image_size; nothing was loaded."
            )
        self.load_state_dict(state_dict, strict=True)
