"""Speed, memory and cache-size benchmark of SurgicalSAM (``surgical-sam benchmark``).

One run measures, on random data and random weights (speed does not depend on the values):

1. training samples/s of a full step (forward, full-frame Dice + PCL, backward, Adam) on cached
   embeddings, for this bundle's path and for the original SurgicalSAM's operations as its code runs them
   (:mod:`scripts.measurement.original_operations`: channels-last embeddings as its data loader hands them,
   per-sample decoder calls, its Dice and pytorch-metric-learning's NTXent), with the loss and the
   parameters after one step compared between the two;
2. inference from cached embeddings, every class prompted and the label map merged (the automatic
   protocol), in masks/s, for both;
3. the frozen image encoder: the fast forward against segment-anything's ``ImageEncoderViT`` in one process
   (float32, bf16 autocast), their difference and what bf16 changes in the decoder's logits, and the peak
   memory of a ViT-H precompute batch in a process of its own (:mod:`scripts.measurement.encoder_speed`);
4. the peak resident memory of each part;
5. the bytes a frame takes in the embedding cache (as stored: 8-bit by default) and its label PNG, and the cache entry
   measure of ``scripts.measurement.cache_size``;
6. Distillation-SAM (``distill_batch_size`` > 0): training samples/s from raw frames and from the tap
   cache, the tap cache's read time and bytes per entry.

Parts 1, 2 and 4 run each path in processes of its own (:data:`PATH_RUNS`), one per allocator setting: the
original *out of the box* (a plain environment, glibc's defaults), and each path on equal terms under both
the bundle's ``mallopt`` (:mod:`scripts.engine.process_settings`, which the bundle applies to itself) and a
never-trimming glibc heap set in the environment before the process starts. The equal-terms speed-ups
compare each path under the setting that is best for it; every setting's figures are kept. The speed-ups
are ratios of figures of one run.

The prompt side (prototypes, class prompt encoder, mask decoder) is the same for every SAM variant
(d = 256 on a 64x64 grid), so ``vit_b`` without a checkpoint stands in for ``vit_h`` in parts 1-2;
part 3 depends on the encoder and is measured with the variants asked for.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..sam.backbone import get_variant
from .benchmark_workers import NEVER_TRIM_ENVIRONMENT, WORKER_MARK
from .timing import peak_rss_mb

__all__ = ["PATH_RUNS", "run_benchmark", "worker_environment"]

#: (name, path, allocator) of each worker of parts 1, 2 and 4 (allocators: benchmark_workers.ALLOCATORS).
PATH_RUNS = (
    ("original_out_of_the_box", "original", "default"),
    ("original_equal_terms", "original", "mallopt"),
    ("original_never_trim", "original", "never_trim"),
    ("bundle", "bundle", "mallopt"),
    ("bundle_never_trim", "bundle", "never_trim"),
)
#: The precompute batch (precompute_embeddings' default batch_size) of the encoder memory measure.
PRECOMPUTE_BATCH = 4


def worker_environment(plain: bool, allocator: str = "mallopt") -> dict[str, str]:
    """The environment of a benchmark worker: this process's (with the bundle's OpenMP variables, which a
    worker's OpenMP reads when it loads), or with ``plain`` one without allocator variables and without the
    variables of ``process_settings.OPENMP_ENVIRONMENT``; with ``allocator="never_trim"`` glibc's
    never-trimming variables (:data:`~scripts.measurement.benchmark_workers.NEVER_TRIM_ENVIRONMENT`) in place
    of any allocator variable of this process."""
    from ..engine.process_settings import OPENMP_ENVIRONMENT, set_openmp_environment

    set_openmp_environment()
    env = dict(os.environ)
    if plain or allocator == "never_trim":
        env = {
            k: v for k, v in env.items() if not k.startswith("MALLOC_") and k not in {"LD_PRELOAD", "GLIBC_TUNABLES"}
        }
    if plain:
        env = {k: v for k, v in env.items() if k not in {name for name, _ in OPENMP_ENVIRONMENT}}
    if allocator == "never_trim":
        env.update(NEVER_TRIM_ENVIRONMENT)
    return env


def run_worker(kind: str, cfg: dict, say, plain: bool = False, allocator: str = "mallopt") -> dict[str, Any]:
    """Run ``python -m scripts.measurement.benchmark_workers KIND CONFIG`` in a fresh process with
    :func:`worker_environment`; -> the worker's record."""
    import json
    import subprocess

    env = worker_environment(plain, allocator)
    bundle_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([bundle_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    label = f"{kind} {cfg.get('path', '')} {allocator if not plain else 'out of the box'}"
    say(f"{label}: a fresh process")
    done = subprocess.run(
        [sys.executable, "-m", "scripts.measurement.benchmark_workers", kind, json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK) :])
    raise RuntimeError(f"benchmark worker {label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def compare_paths(cfg: dict, amp: bool, say) -> dict[str, Any]:
    """Parts 1, 2 and 4 on every run of :data:`PATH_RUNS` (and ``bundle_amp`` with ``amp``), each in its own
    worker; -> {name: its record}, each with ``param_max_abs_diff``: the largest parameter difference after
    the first step from the original on equal terms (the bundle's ``mallopt``)."""
    paths: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        runs = [(name, path, allocator, {}) for name, path, allocator in PATH_RUNS]
        runs += [("bundle_amp", "bundle", "mallopt", {"amp": True})] if amp else []
        params = {}
        for name, path, allocator, extra in runs:
            params_file = os.path.join(folder, f"{name}.pt")
            run_cfg = {**cfg, **extra, "path": path, "allocator": allocator, "params_file": params_file}
            paths[name] = run_worker("path", run_cfg, say, plain=allocator == "default", allocator=allocator)
            params[name] = torch.load(params_file)
    reference = params["original_equal_terms"]
    for name, record in paths.items():
        record["param_max_abs_diff"] = max(float((params[name][k] - v).abs().max()) for k, v in reference.items())
    return paths


def rate_figures(paths: dict[str, Any], part: str, rate: str, prefix: str) -> dict[str, Any]:
    """One part's rates and speed-ups (``part``: ``train`` or ``inference_cached``; ``rate``: its record's key;
    ``prefix``: the flat keys' start, e.g. ``train_samples_per_s`` and ``train``) from :func:`compare_paths`'s
    records; each path on equal terms under the allocator setting that is faster for it."""

    def value(name):
        return paths[name][part][rate]

    best = {
        "bundle": max(("bundle", "bundle_never_trim"), key=value),
        "original": max(("original_equal_terms", "original_never_trim"), key=value),
    }
    rates = f"{prefix}_{rate}"
    return {
        rates: value("bundle"),
        f"{rates}_original": value("original_out_of_the_box"),
        f"{rates}_original_equal_terms": value(best["original"]),
        f"{rates}_best_allocator": value(best["bundle"]),
        f"{prefix}_speedup": value("bundle") / value("original_out_of_the_box"),
        f"{prefix}_speedup_equal_terms": value(best["bundle"]) / value(best["original"]),
        f"{prefix}_speedup_mallopt": value("bundle") / value("original_equal_terms"),
        f"{prefix}_speedup_never_trim": value("bundle_never_trim") / value("original_never_trim"),
        f"{prefix}_equal_terms_allocator": {path: paths[name]["allocator"] for path, name in best.items()},
    }


def path_figures(paths: dict[str, Any], amp: bool) -> dict[str, Any]:
    """The flat keys of the acceptance from the paths' records (:func:`compare_paths`).

    ``*_original_equal_terms`` and ``*_speedup_equal_terms`` take each path under its best allocator setting
    (named in ``equal_terms_allocator``); ``*_mallopt`` / ``*_never_trim`` keep each setting's figures."""
    bundle, plain, equal = paths["bundle"], paths["original_out_of_the_box"], paths["original_equal_terms"]
    figures = {
        "train_param_max_abs_diff": bundle["param_max_abs_diff"],
        "train_param_max_abs_diff_out_of_the_box": plain["param_max_abs_diff"],
        **rate_figures(paths, "train", "samples_per_s", "train"),
        **rate_figures(paths, "inference_cached", "masks_per_s", "infer"),
        "train_peak_rss_gib": bundle["train_peak_rss_gib"],
        "train_peak_rss_gib_never_trim": paths["bundle_never_trim"]["train_peak_rss_gib"],
        "train_peak_rss_gib_original": plain["train_peak_rss_gib"],
        "train_peak_rss_gib_original_equal_terms": equal["train_peak_rss_gib"],
        "train_peak_rss_gib_original_never_trim": paths["original_never_trim"]["train_peak_rss_gib"],
        "train_loss_abs_diff": abs(bundle["first_loss"] - equal["first_loss"]),
        "train_loss_abs_diff_out_of_the_box": abs(plain["first_loss"] - equal["first_loss"]),
        "data_batch_read_s": bundle["data"]["batch_read_s"],
        "data_batch_read_share_of_step": bundle["data"]["batch_read_share_of_step"],
        "process_settings": bundle["process_settings"],
        "paths": paths,
    }
    figures["equal_terms_allocator"] = {
        part: figures.pop(f"{part}_equal_terms_allocator") for part in ("train", "infer")
    }
    if amp:
        amp_run = paths["bundle_amp"]
        figures["train_param_max_abs_diff_amp"] = amp_run["param_max_abs_diff"]
        figures["train_samples_per_s_amp"] = amp_run["train"]["samples_per_s"]
        figures["infer_masks_per_s_amp"] = amp_run["inference_cached"]["masks_per_s"]
        figures["train_loss_abs_diff_amp"] = abs(amp_run["first_loss"] - equal["first_loss"])
    return figures


def encoder_figures(cfg: dict, say) -> dict[str, Any]:
    """Part 3: :func:`~scripts.measurement.encoder_speed.encoder_speed_worker` and, with a
    ``memory_variant``, :func:`~scripts.measurement.encoder_speed.encoder_memory_worker`, each in its own
    process; -> the acceptance's ``encoder_*`` keys and the records."""
    speed = run_worker("encoder_speed", cfg, say)
    figures: dict[str, Any] = {
        "encoder": speed,
        "encoder_frames_per_s": 1.0 / speed["s_per_frame"]["fast_fp32"],
        "encoder_speedup_fp32": speed["speedup_fp32"],
        "encoder_speedup_bf16": speed["speedup_bf16"],
        "encoder_max_rel_diff_fp32": speed["max_rel_diff_fp32"],
        "encoder_bf16_decoder_logits_max_abs_diff": speed["bf16_decoder_logits_max_abs_diff"],
        "encoder_memory": None,
        "encoder_peak_rss_gib": None,
    }
    if cfg.get("memory_variant"):
        memory = run_worker("encoder_memory", cfg, say)
        figures["encoder_memory"] = memory
        figures["encoder_peak_rss_gib"] = memory["peak_rss_gib"]
    return figures


def memory_blocks(variant: str | None, blocks: int | None) -> int:
    """Blocks of the encoder memory pass (:func:`run_benchmark`'s ``encoder_memory_blocks``); 0: all."""
    if variant is None:
        return 0
    if blocks is None:
        return get_variant(variant).encoder_global_attn_indexes[0] + 1
    return int(blocks)


def cache_sizes(embed_dim: int, grid: int, frame_hw: Sequence[int]) -> dict[str, int]:
    """Bytes of one float16 cached embedding (.npy, the encoding of caches up to 0.7; the 8-bit entry: ``cache_entry_bytes``) and of a demo-like label PNG."""
    from ..data.demo import render_sequence
    from ..data.frame_files import write_label_map

    with tempfile.TemporaryDirectory() as folder:
        npy = os.path.join(folder, "frame.npy")
        with open(npy, "wb") as handle:
            np.save(handle, np.zeros((embed_dim, grid, grid), dtype=np.float16))
        _image, label_map = render_sequence(np.random.default_rng(0), [1, 2, 3], tuple(frame_hw), 1)[0]
        png = os.path.join(folder, "label.png")
        write_label_map(png, label_map)
        return {
            "embedding_npy_bytes": os.path.getsize(npy),
            "embedding_raw_bytes": embed_dim * grid * grid * 2,
            "label_png_bytes": os.path.getsize(png),
        }


def cache_entry_figures(sam_variant: str, seed: int, device: torch.device) -> dict[str, Any]:
    """:func:`~.cache_size.measure_cache_entry`'s keys (``cache_entry_bytes``, ``cache_entry_bytes_float16``,
    ``cache_logits_max_abs_diff``)."""
    from .cache_size import measure_cache_entry

    return dict(measure_cache_entry(sam_variant=sam_variant, seed=seed, device=str(device)))


def run_benchmark(
    batch_size: int = 32,
    num_classes: int = 7,
    num_tokens: int = 2,
    frame_size: Sequence[int] = (1024, 1280),
    steps: int = 3,
    encoder_frames: int = 1,
    device: str | torch.device | None = None,
    inference_frames: int = 8,
    sam_variant: str = "vit_b",
    seed: int = 0,
    verbose: bool = False,
    distill_batch_size: int = 2,
    distill_sam_variant: str | None = None,
    distill_frame_size: Sequence[int] | None = None,
    distill_pvt: dict | None = None,
    quick: bool = False,
    amp: bool = False,
    compile: bool = False,
    micro_batch_size: int | None = 8,
    encoder_rounds: int = 2,
    encoder_memory_variant: str | None = "vit_h",
    encoder_memory_frames: int = PRECOMPUTE_BATCH,
    encoder_memory_blocks: int | None = None,
) -> dict[str, Any]:
    """Measure training/inference speed, peak memory and cache size; see the module docstring.

    Args:
        batch_size: training batch of (frame, class) samples (also the original's inference batch of pairs).
        num_classes: C.
        num_tokens: n, sparse tokens per class.
        frame_size: (H, W) of the frames; logits and the Dice loss are at this size.
        steps: timed repetitions of each measurement, after one untimed warm-up.
        encoder_frames: frames per encoder call in part 3 (0 skips part 3).
        device: ``cpu``, ``cuda[:N]``; None picks cuda when available.
        inference_frames: frames per inference call in part 2.
        sam_variant: SAM variant of the network and of part 3's speed comparison (``vit_b``: the official
            256 x 64 x 64 embeddings; ``tiny`` for quick tests: 256 x 16 x 16).
        seed: seed of the random weights and data.
        verbose: print progress lines.
        distill_batch_size: frames per Distillation-SAM training step in part 6 (0 skips part 6).
        distill_sam_variant: SAM variant of part 6 (None: ``sam_variant``; default taps).
        distill_frame_size: (H, W) of part 6's frames (None: ``frame_size``).
        distill_pvt: PVT keyword arguments of part 6 (None: PVT-tiny).
        quick: batch 8, one timed step, 2 inference frames, 1 encoder frame and round, no part 6.
        amp: also measure the bundle's path under bf16 autocast (``*_amp`` keys).
        compile: run the bundle's training step through ``torch.compile``.
        micro_batch_size: the bundle's step in slices of this many samples (train.yaml's
            ``micro_batch_size``, 8 there too); None: the batch in one piece.
        encoder_rounds: alternating timed rounds of each encoder forward in part 3.
        encoder_memory_variant: SAM variant of part 3's memory measure (None skips it).
        encoder_memory_frames: frames of that pass (the precompute batch).
        encoder_memory_blocks: blocks of that pass; None: up to and including the first global-attention
            block, whose allocations every later block repeats (the same peak, a quarter of the time for the
            official variants); 0: every block.

    Returns:
        dict with the flat keys of the acceptance (``train_samples_per_s``, ``train_samples_per_s_original``,
        ``train_samples_per_s_original_equal_terms``, ``train_speedup``, ``train_speedup_equal_terms``,
        ``infer_masks_per_s`` and its ``_original`` / ``_original_equal_terms`` / speed-ups, each allocator's
        (``*_mallopt``, ``*_never_trim``), ``train_peak_rss_gib``, ``train_loss_abs_diff``,
        ``train_param_max_abs_diff``, ``encoder_frames_per_s``, ``encoder_speedup_fp32``,
        ``encoder_speedup_bf16``, ``encoder_max_rel_diff_fp32``, ``encoder_peak_rss_gib``,
        ``encoder_bf16_decoder_logits_max_abs_diff``, ``device``, ``threads``, ``torch_version``,
        ``process_settings``, the cache entry measure's keys) and the details: ``settings``, ``paths`` (each
        worker's record), ``encoder``, ``encoder_memory``, ``cache``, ``distill``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if quick:
        batch_size, steps, inference_frames, encoder_frames = 8, 1, 2, min(int(encoder_frames), 1)
        encoder_rounds, distill_batch_size = 1, 0
    steps = max(1, int(steps))
    frame_hw = (int(frame_size[0]), int(frame_size[1]))
    variant = get_variant(sam_variant)
    grid, embed_dim = variant.grid_size, variant.prompt_embed_dim
    on_cuda = device.type == "cuda"

    def say(message: str) -> None:
        if verbose:
            print(f"[benchmark] {message}", flush=True)

    cfg = {
        "batch_size": int(batch_size),
        "num_classes": int(num_classes),
        "num_tokens": int(num_tokens),
        "frame_size": list(frame_hw),
        "steps": steps,
        "inference_frames": int(inference_frames),
        "encoder_frames": int(encoder_frames),
        "encoder_rounds": int(encoder_rounds),
        "encoder_variant": sam_variant,
        "memory_variant": encoder_memory_variant,
        "memory_frames": int(encoder_memory_frames),
        "memory_blocks": memory_blocks(encoder_memory_variant, encoder_memory_blocks),
        "device": str(device),
        "sam_variant": sam_variant,
        "seed": seed,
        "quick": bool(quick),
        "compile": bool(compile),
        "micro_batch_size": None if micro_batch_size is None else int(micro_batch_size),
    }
    result: dict[str, Any] = {
        "settings": {
            **cfg,
            "embedding_shape": [embed_dim, grid, grid],
            "amp": bool(amp),
            "device_name": torch.cuda.get_device_name(device)
            if on_cuda
            else platform.processor() or platform.machine(),
        },
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    start = time.perf_counter()
    result.update(path_figures(compare_paths(cfg, amp, say), amp))

    # ------------------------------------------------------------------ 3. the image encoder
    result["encoder"] = result["encoder_memory"] = None
    for key in ("encoder_frames_per_s", "encoder_speedup_fp32", "encoder_speedup_bf16", "encoder_max_rel_diff_fp32"):
        result[key] = None
    result["encoder_peak_rss_gib"] = result["encoder_bf16_decoder_logits_max_abs_diff"] = None
    if encoder_frames > 0:
        result.update(encoder_figures(cfg, say))

    # ------------------------------------------------------------------------------- 5. cache size
    result["cache"] = cache_sizes(embed_dim, grid, frame_hw)
    say("cache entry measure")
    result.update(cache_entry_figures(sam_variant, seed, device))

    # ---------------------------------------------------------------------- 6. Distillation-SAM
    result["distill"] = None
    if distill_batch_size > 0:
        from ..engine.process_settings import apply_process_settings
        from .distill_speed import distill_benchmark

        apply_process_settings()
        result["distill"] = distill_benchmark(
            int(distill_batch_size),
            num_classes,
            distill_sam_variant or sam_variant,
            tuple(distill_frame_size or frame_hw),
            distill_pvt,
            steps,
            device,
            seed,
            say,
        )
        result["distill"]["peak_rss_gib"] = peak_rss_mb() / 1024
    result["seconds"] = time.perf_counter() - start
    return result
