"""The ``benchmark`` command: training and inference speed, peak memory and cache size."""

from __future__ import annotations

import os
from typing import Any

from .registry import command, fail, int_pair, positive_int


# -------------------------------------------------------------------------------------------- benchmark
@command()
def benchmark(
    batch_size: int = 32,
    num_classes: int = 7,
    num_tokens: int = 2,
    frame_size: Any = (1024, 1280),
    steps: int = 3,
    encoder_frames: int = 2,
    device: str = "auto",
    inference_frames: int = 8,
    sam_variant: str = "vit_b",
    distill_batch_size: int = 2,
    distill_sam_variant: str | None = None,
    distill_frame_size: Any = None,
    quick: bool = False,
    amp: bool = False,
    compile: bool = False,
    micro_batch_size: int | None = 8,
    output_json: str | None = None,
) -> dict:
    """Training and inference speed, peak memory and cache size (see scripts.measurement.benchmark.run_benchmark).

    Args:
        batch_size: training batch (the paper's 32).
        num_classes: C.
        num_tokens: n, sparse tokens per class.
        frame_size: H,W of the frames (EndoVis 1024,1280).
        steps: timed steps per measurement (after one untimed warm-up).
        encoder_frames: frames through the image encoder (0 skips that part; vit_b is slow on CPU).
        device: cpu, cuda or auto (cuda when available).
        inference_frames: frames per inference call from cached embeddings.
        sam_variant: SAM sizes of the prompt side and encoder (vit_b; its prompt side equals vit_h's).
        distill_batch_size: Distillation-SAM frames per training step, without and with the tap cache (0 skips).
        distill_sam_variant: SAM variant of the Distillation-SAM part (default: --sam_variant).
        distill_frame_size: H,W of the Distillation-SAM part (default: --frame_size).
        quick: batch 8, one timed step, 2 inference frames, 1 encoder frame, no Distillation-SAM part.
        amp: also measure the bundle's path under bf16 autocast.
        compile: run the bundle's training step through torch.compile.
        micro_batch_size: the bundle's step in slices of this many samples (train.yaml's default 8); 0: one piece.
        output_json: write every figure to this JSON file.
    """
    from scripts.measurement.benchmark import run_benchmark
    from scripts.measurement.benchmark_report import format_benchmark_table
    from scripts.sam.backbone import SAM_VARIANTS

    for flag, value in (("sam_variant", sam_variant), ("distill_sam_variant", distill_sam_variant)):
        if value not in (None, "") and value not in SAM_VARIANTS:
            raise fail(f"unknown --{flag} {value!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}.")
    if str(device) not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise fail(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}.")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise fail("--device cuda was asked for, but torch sees no CUDA device.")
    result = run_benchmark(
        batch_size=positive_int(batch_size, "batch_size"),
        num_classes=positive_int(num_classes, "num_classes"),
        num_tokens=positive_int(num_tokens, "num_tokens"),
        frame_size=int_pair(frame_size, "frame_size"),
        steps=positive_int(steps, "steps"),
        encoder_frames=positive_int(encoder_frames, "encoder_frames", minimum=0),
        device=None if device == "auto" else str(device),
        inference_frames=positive_int(inference_frames, "inference_frames"),
        sam_variant=sam_variant,
        verbose=True,
        distill_batch_size=positive_int(distill_batch_size, "distill_batch_size", minimum=0),
        distill_sam_variant=None if distill_sam_variant in (None, "") else str(distill_sam_variant),
        distill_frame_size=None
        if distill_frame_size in (None, "")
        else int_pair(distill_frame_size, "distill_frame_size"),
        quick=bool(quick),
        amp=bool(amp),
        compile=bool(compile),
        micro_batch_size=positive_int(micro_batch_size, "micro_batch_size", minimum=0) or None,
    )
    print(format_benchmark_table(result))
    if output_json:
        from scripts.files import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(str(output_json))), exist_ok=True)
        print(f"figures written to {os.path.abspath(atomic_write_json(str(output_json), result))}")
    return result
