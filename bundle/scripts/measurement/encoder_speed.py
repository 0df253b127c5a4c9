"""The frozen image encoder: the bundle's fast forward (:mod:`scripts.sam.fast_encoder`) against segment-anything's
``ImageEncoderViT`` on the same weights, and the peak memory of a precompute-like pass.

:func:`encoder_speed_worker` times both forwards in one process, alternating, at float32 and the fast one also
under bf16 autocast, and says how far the fast float32 embedding is from segment-anything's (relative to the
embedding's largest value) and how far the decoder's logits move when fed bf16 instead of float32 embeddings.
:func:`encoder_memory_worker` runs one fast pass over a precompute batch in a process of its own, so its peak
resident memory is the pass's (the weights included). Both are benchmark workers
(:mod:`scripts.measurement.benchmark_workers`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..sam.backbone import build_sam, get_variant
from ..sam.fast_encoder import fast_encoder_forward
from .timing import peak_rss_mb, timed


def random_image_encoder(variant: str, seed: int) -> torch.nn.Module:
    """segment-anything's image encoder of ``variant`` with random weights, the relative-position tables
    included (segment-anything starts them at zero, which would leave their terms out of the comparison)."""
    encoder = build_sam(variant, checkpoint=None).image_encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return encoder


def sam_inputs(variant: str, frames: int, seed: int) -> torch.Tensor:
    """Normalised SAM inputs (frames, 3, S, S) as the encoder takes them."""
    size = get_variant(variant).image_size
    return torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))


def encoder_speed_worker(cfg: dict) -> dict[str, Any]:
    """Seconds per frame of segment-anything's encoder and of the fast forward (float32, bf16 autocast), in this
    process, ``cfg["encoder_rounds"]`` alternating rounds (after one warm-up each when there are several), on ``cfg["encoder_frames"]``
    frames of ``cfg["encoder_variant"]``; the fast float32 embedding's largest difference from
    segment-anything's relative to the embedding's largest value; the largest difference of the decoder's
    logits (every class prompted, at ``cfg["frame_size"]``) between bf16 and float32 embeddings."""
    from ..engine.process_settings import apply_process_settings
    from ..surgical_sam.network import SurgicalSAM

    apply_process_settings()
    variant, frames, rounds = cfg["encoder_variant"], int(cfg["encoder_frames"]), max(1, int(cfg["encoder_rounds"]))
    device = torch.device(cfg["device"])
    encoder = random_image_encoder(variant, cfg["seed"]).to(device)
    x = sam_inputs(variant, frames, cfg["seed"]).to(device)

    def fast(autocast: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return fast_encoder_forward(encoder, x)[0].float()

    forwards = {
        "segment_anything_fp32": lambda: encoder(x),
        "fast_fp32": lambda: fast(False),
        "fast_bf16_autocast": lambda: fast(True),
    }
    seconds = {name: 0.0 for name in forwards}
    outputs = {}
    with torch.no_grad():
        for name, forward in forwards.items():
            if rounds > 1:
                outputs[name] = forward()  # warm-up (one round alone: the timed call is the only one)
        for _ in range(rounds):
            for name, forward in forwards.items():
                elapsed, outputs[name] = timed(forward, device, 1)
                seconds[name] += elapsed / rounds
        reference = outputs["segment_anything_fp32"]
        scale = float(reference.abs().max())
        out: dict[str, Any] = {
            "sam_variant": variant,
            "frames": frames,
            "rounds": rounds,
            "s_per_frame": {name: value / frames for name, value in seconds.items()},
            "speedup_fp32": seconds["segment_anything_fp32"] / seconds["fast_fp32"],
            "speedup_bf16": seconds["segment_anything_fp32"] / seconds["fast_bf16_autocast"],
            "max_rel_diff_fp32": float((outputs["fast_fp32"] - reference).abs().max()) / scale,
            "max_rel_diff_bf16": float((outputs["fast_bf16_autocast"] - reference).abs().max()) / scale,
        }
        encoder = None  # released before the decoder is built
        torch.manual_seed(cfg["seed"])
        network = SurgicalSAM(
            cfg["num_classes"],
            cfg["num_tokens"],
            cfg["frame_size"],
            sam_variant=variant,
            sam_checkpoint=None,
            with_image_encoder=False,
        ).to(device)
        every = torch.ones(frames, cfg["num_classes"], dtype=torch.bool, device=device)
        logits_fp32, _ = network.eval().predict_classes(outputs["fast_fp32"], every)
        logits_bf16, _ = network.predict_classes(outputs["fast_bf16_autocast"], every)
    out["bf16_decoder_logits_max_abs_diff"] = float((logits_bf16 - logits_fp32).abs().max())
    out["bf16_decoder_mask_pixels_changed"] = float(((logits_bf16 > 0) != (logits_fp32 > 0)).float().mean())
    out["peak_rss_gib"] = peak_rss_mb() / 1024
    return out


def encoder_memory_worker(cfg: dict) -> dict[str, Any]:
    """One fast float32 pass of ``cfg["memory_variant"]``'s encoder over ``cfg["memory_frames"]`` frames (the
    precompute batch), in this process: its peak resident memory (GiB, the weights included) and its seconds
    per frame.

    With ``cfg["memory_blocks"]`` = k > 0 the pass runs the first k blocks and the neck, every block's weights
    held in memory as in the whole pass: every block allocates what the block of its kind (windowed or
    global) before it did, so a pass through the first global-attention block reaches the whole pass's peak;
    the seconds per frame are scaled by depth / k (the first blocks mix windowed and global blocks as the
    whole encoder does for the official variants: 1 global in 4 (vit_b 3 in 12, vit_h 4 in 32, 1 in the first 8))."""
    from ..engine.process_settings import apply_process_settings

    apply_process_settings()
    variant, frames = cfg["memory_variant"], int(cfg["memory_frames"])
    device = torch.device(cfg["device"])
    encoder = build_sam(variant, checkpoint=None).image_encoder.eval().to(device)
    every_block = encoder.blocks  # kept referenced: the weights of every block stay in memory
    depth, blocks = len(every_block), int(cfg.get("memory_blocks") or 0) or len(every_block)
    encoder.blocks = every_block[: min(blocks, depth)]
    x = sam_inputs(variant, frames, cfg["seed"]).to(device)
    with torch.no_grad():
        elapsed, embedding = timed(lambda: fast_encoder_forward(encoder, x)[0], device, 1)
    out = {
        "sam_variant": variant,
        "frames": frames,
        "blocks_run": len(encoder.blocks),
        "depth": depth,
        "s_per_frame": elapsed / frames * depth / len(encoder.blocks),
        "embedding_shape": list(embedding.shape[1:]),
        "peak_rss_gib": peak_rss_mb() / 1024,
    }
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
