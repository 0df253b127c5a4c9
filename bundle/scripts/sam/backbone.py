"""SAM backbone: builders for the official variants and a small one, and checked checkpoint loading.

The parts (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) are
segment-anything's own classes; this module only chooses their sizes and loads weights into them.

Variants (``SAM_VARIANTS``): ``vit_h``, ``vit_l``, ``vit_b`` as published (1024x1024 input, 64x64 grid),
and ``tiny``, a two-block encoder on a small input for tests and the demo (no official weights exist
for it; the demo makes a random one with :func:`save_random_sam_checkpoint`). :func:`tapped_encoder_forward`
runs the encoder and also returns the tokens after chosen blocks (Distillation-SAM's taps, and the tap cache).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..files import atomic_write
from .checkpoint import memoised_md5, read_checkpoint_dict, state_dict_mismatch
from .geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD

logger = logging.getLogger(__name__)

SAM_DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


def import_sam_modeling() -> types.ModuleType:
    """Import ``segment_anything.modeling``.

    segment-anything's package ``__init__`` imports its predictor utilities, which need torchvision;
    the modeling classes do not. Where torchvision is missing (the CPU-only install), the package is
    registered as a bare namespace so that ``segment_anything.modeling`` imports on its own.
    """
    try:
        return importlib.import_module("segment_anything.modeling")
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("torchvision"):
            raise
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("segment-anything is not installed: pip install segment-anything==1.0")
    for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
        del sys.modules[name]  # drop the half-imported package
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


@dataclass(frozen=True)
class SamVariant:
    """Sizes of one SAM variant; ``checkpoint_name``/``md5`` describe the official weights, if any."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    checkpoint_name: str | None = None
    md5: str | None = None
    notes: str = ""

    @property
    def grid_size(self) -> int:
        """Side of the square embedding grid (64 for the official variants)."""
        return self.image_size // self.patch_size


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant(
        1280, 32, 16, (7, 15, 23, 31), checkpoint_name="sam_vit_h_4b8939.pth", md5="4b8939a88964f0f4ff5f5b2642c598a6"
    ),
    "vit_l": SamVariant(
        1024, 24, 16, (5, 11, 17, 23), checkpoint_name="sam_vit_l_0b3195.pth", md5="0b3195507c641ddb6910d2bb5adee89c"
    ),
    "vit_b": SamVariant(
        768, 12, 12, (2, 5, 8, 11), checkpoint_name="sam_vit_b_01ec64.pth", md5="01ec64d29a2fca3f0661936605ae66f8"
    ),
    # Small encoder for tests and the demo: 256x256 input, 16x16 patches -> 16x16 grid.
    "tiny": SamVariant(
        96,
        2,
        2,
        (1,),
        image_size=256,
        patch_size=16,
        window_size=8,
        notes="random weights only: for tests and the demo",
    ),
}


def get_variant(variant: str) -> SamVariant:
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}: choose one of {sorted(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def build_mask_decoder(variant: str = "vit_h") -> nn.Module:
    """SAM's mask decoder of the given variant (random weights), as :func:`build_sam` builds it."""
    modeling = import_sam_modeling()
    spec = get_variant(variant)
    return modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=spec.prompt_embed_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_sam(variant: str = "vit_h", checkpoint: str | None = None, check_md5: bool = True) -> nn.Module:
    """Build segment-anything's ``Sam`` of the given variant; load ``checkpoint`` when given.

    Returns the model in eval mode. See :func:`load_sam_checkpoint` for the checks on the file.
    """
    modeling = import_sam_modeling()
    spec = get_variant(variant)
    grid = spec.grid_size
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=build_mask_decoder(variant),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint, variant=variant, check_md5=check_md5)
    return sam.eval()


def tapped_encoder_forward(
    image_encoder: nn.Module,
    x: torch.Tensor,
    tap_blocks: Sequence[int],
    block_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """segment-anything's ``ImageEncoderViT.forward``, also returning the tokens after some blocks.

    Args:
        image_encoder: ``ImageEncoderViT``.
        x: SAM input (B, 3, S, S).
        tap_blocks: 1-based block numbers (k: the output of block k); each in 1..depth (may be empty).
        block_forward: ``(block, tokens) -> tokens`` run for each block instead of ``block(tokens)`` (the fast
            path, :func:`scripts.sam.fast_encoder.fast_block`); None runs the blocks themselves.

    Returns:
        the image embedding (B, d, h, w), equal to ``image_encoder(x)``, and the tapped tokens,
        one (B, h, w, C_vit) per entry of ``tap_blocks`` in the given order.
    """
    depth = len(image_encoder.blocks)
    bad = [k for k in tap_blocks if not 1 <= int(k) <= depth]
    if bad:
        raise ValueError(f"tap blocks must be in 1..{depth} (the encoder's depth), got {list(tap_blocks)}")
    tokens = image_encoder.patch_embed(x)
    if image_encoder.pos_embed is not None:
        tokens = tokens + image_encoder.pos_embed
    after = {}
    wanted = {int(k) for k in tap_blocks}
    for number, block in enumerate(image_encoder.blocks, start=1):
        tokens = block(tokens) if block_forward is None else block_forward(block, tokens)
        if number in wanted:
            after[number] = tokens
    embedding = image_encoder.neck(tokens.permute(0, 3, 1, 2))
    return embedding, [after[int(k)] for k in tap_blocks]


def sam_checkpoint_path(folder: str, variant: str) -> str:
    """Where the configs keep the weights of ``variant`` in ``folder``: the official file name
    (``sam_vit_h_4b8939.pth``, ...), ``sam_<variant>.pth`` for a variant without official weights."""
    spec = get_variant(variant)
    return os.path.join(folder, spec.checkpoint_name or f"sam_{variant}.pth")


def how_to_get_sam_weights(variant: str, path: str) -> str:
    """How to get the SAM weights file of ``variant`` at ``path`` (the download, or the random-weight command)."""
    spec = SAM_VARIANTS.get(variant)
    if spec is None or spec.checkpoint_name is None:
        return (
            f"the {variant!r} variant has no official weights; make a random one with "
            f"`surgical-sam make_sam_checkpoint --variant {variant} --path {path}` (tests and demo only)"
        )
    random_path = os.path.join(os.path.dirname(path), f"sam_{variant}_random.pth")  # never the official name
    return (
        f"download {SAM_DOWNLOAD_URL}{spec.checkpoint_name} (md5 {spec.md5}) and put it at {path}, "
        f"or run `python -m monai.bundle download_large_files --bundle_path <bundle folder>`; only to try the "
        f"bundle without weights, make a random SAM with `surgical-sam make_sam_checkpoint --variant {variant} "
        f"--path {random_path}` and pass --sam_checkpoint {random_path} (its segmentations mean nothing)"
    )


def sam_weights_not_found(variant: str, path: str) -> str:
    """The message for a SAM weights file missing at ``path``, with how to get it (one wording for every command)."""
    return f"SAM checkpoint not found: {path}. To fix: {how_to_get_sam_weights(variant, path)}."


def missing_sam_weights(sam_variant: str, sam_checkpoint: str | None) -> list[str]:
    """The input-check problem of a SAM weights file that does not exist, with how to get it; [] when it
    exists or no path is given."""
    if sam_checkpoint is None or os.path.isfile(sam_checkpoint):
        return []
    return [
        f"SAM weights: {sam_checkpoint} not found. {how_to_get_sam_weights(sam_variant, sam_checkpoint)}; "
        "or pass --sam_checkpoint PATH."
    ]


def load_sam_checkpoint(sam: nn.Module, path: str, variant: str, check_md5: bool = True) -> None:
    """Load a SAM state dict from ``path`` into ``sam``, checking the file first.

    Checks, each failing with a message that says what to download and where to put it:
    the file exists; its md5 matches the official one when the file name is the official name
    (and ``check_md5``; the md5 is memoised beside the file, :func:`memoised_md5`, so the 2.4 GB vit_h file is
    hashed once, not at every build); it unpickles; its keys and shapes are exactly those of ``variant``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(sam_weights_not_found(variant, path))
    spec = get_variant(variant)
    if check_md5 and spec.md5 is not None and os.path.basename(path) == spec.checkpoint_name:
        actual = memoised_md5(path)
        if actual != spec.md5:
            raise ValueError(
                f"SAM checkpoint {path} has md5 {actual}, expected {spec.md5} for {spec.checkpoint_name}: the file "
                f"is corrupt or incomplete. To fix: {how_to_get_sam_weights(variant, path)}."
            )
    state_dict = read_checkpoint_dict(
        path,
        "SAM checkpoint",
        expected="a state dict",
        hint=f". To fix: {how_to_get_sam_weights(variant, path)} (or pass --sam_checkpoint PATH).",
    )
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    details = state_dict_mismatch(state_dict, sam.state_dict(), expected_as=f"for {variant}")
    if details:
        guess = guess_variant(state_dict)
        hint = f" The file looks like SAM {guess}: set sam_variant to {guess!r}." if guess and guess != variant else ""
        raise ValueError(
            f"SAM checkpoint {path} does not match the {variant!r} variant: {'; '.join(details)}.{hint} "
            f"To fix: {how_to_get_sam_weights(variant, path)}."
        )
    sam.load_state_dict(state_dict, strict=True)


def guess_variant(state_dict: dict) -> str | None:
    """The variant whose encoder width and depth match a SAM state dict, or None."""
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, spec in SAM_VARIANTS.items():
        if weight.shape[0] == spec.encoder_embed_dim and depth == spec.encoder_depth:
            return name
    return None


def save_random_sam_checkpoint(path: str, variant: str = "tiny", seed: int = 0) -> str:
    """Write a SAM state dict with seeded random weights (for tests and the demo); returns ``path``.

    The global random state is left as it was, so making the file does not change a run's draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(variant)
    atomic_write(path, lambda temporary: torch.save(sam.state_dict(), temporary))
    logger.info("wrote a random-weight SAM %s checkpoint to %s", variant, path)
    return path


def ensure_random_sam_checkpoint(path: str, variant: str = "tiny", seed: int = 0) -> str:
    """The demo's SAM: make the seeded random checkpoint at ``path`` unless it is already there."""
    if not os.path.isfile(path):
        save_random_sam_checkpoint(path, variant, seed)
    return path
