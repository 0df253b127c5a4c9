"""Speed, memory and cache-size benchmark of SurgicalSAM (``surgical-sam benchmark``).

One run measures, on random data and random weights (speed does not depend on the values):

1. training samples/s of a full step (forward, SurgicalSAMLoss on full-frame logits, backward, Adam)
   on cached embeddings, for this bundle's batched decoder call and for the original SurgicalSAM's
   per-sample loop over SAM's ``MaskDecoder`` (prototype prompt encoder on the whole batch, as the
   original; then one decoder call and one postprocess per sample), and the speed-up;
2. inference frames/s from cached embeddings, every class prompted (the auto protocol);
3. inference frames/s from raw frames through the frozen image encoder;
4. the process's peak resident memory after each part (and the CUDA peak on a GPU);
5. the bytes a frame takes in the embedding cache (float16 ``.npy``) and its label PNG;
6. Distillation-SAM (``distill_batch_size`` > 0): training samples/s of a full step (forward with the
   teacher, DistillationSAMLoss, backward, AdamW) from raw frames (the frozen encoder runs in every
   step) and from the tap cache (embedding and taps given; the PVT still runs on the frame), the
   seconds to read one tap-cache entry from disk (float16 ``.npy`` -> float32), and the tap cache's
   bytes per (frame, version). Its SAM variant, batch and frame size are separate settings
   (``distill_*``): a vit_b-sized adapter at 1024 x 1280 is slow on a CPU.

The prompt side (prototypes, class prompt encoder, mask decoder) is the same for every SAM variant
(d = 256 on a 64x64 grid), so ``vit_b`` without a checkpoint stands in for ``vit_h`` in parts 1-2;
part 3 does depend on the encoder and is measured with the variant asked for.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .losses import DistillationSAMLoss, SurgicalSAMLoss
from .networks.sam_backbone import get_variant
from .networks.sam_geometry import low_res_logits_to_frame, masks_to_embedding_grid
from .networks.surgical_sam import SurgicalSAM

__all__ = ["format_benchmark_table", "run_benchmark"]


# ------------------------------------------------------------------------------------------- helpers
def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Mean seconds per call of ``fn`` over ``repeats`` calls (the caller warms up first); last result."""
    _sync(device)
    start = time.perf_counter()
    result = None
    for _ in range(repeats):
        result = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats, result


def _random_targets(
    generator: torch.Generator, batch: int, num_classes: int, frame_hw: Sequence[int], image_size: int,
    grid_hw: Sequence[int], device: torch.device,
) -> dict[str, torch.Tensor]:
    """(frame, class) training samples: a random rectangle per sample, big enough to survive the grid."""
    height, width = frame_hw
    masks = torch.zeros(batch, 1, height, width)
    for row in range(batch):
        box_h = int(torch.randint(max(1, height // 4), max(2, height // 2 + 1), (1,), generator=generator))
        box_w = int(torch.randint(max(1, width // 4), max(2, width // 2 + 1), (1,), generator=generator))
        top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
        masks[row, 0, top : top + box_h, left : left + box_w] = 1.0
    # every class appears (when the batch allows), so the contrastive term has negatives
    class_ids = (torch.arange(batch) % num_classes + 1)[torch.randperm(batch, generator=generator)]
    grid_mask = masks_to_embedding_grid(masks[:, 0], image_size, grid_hw)
    return {"mask": masks.to(device), "grid_mask": grid_mask.to(device), "class_id": class_ids.to(device)}


def _original_loop_forward(model: SurgicalSAM, embeddings: torch.Tensor, class_ids: torch.Tensor) -> dict:
    """The original SurgicalSAM's forward: class prompts for the batch, then SAM's decoder once per sample."""
    prototypes = model.prototypes()
    dense, sparse = model.class_prompt_encoder(embeddings, prototypes, class_ids)
    image_pe = model.prompt_encoder.get_dense_pe()
    logits = []
    for index in range(embeddings.shape[0]):
        low_res, _quality = model.mask_decoder(
            image_embeddings=embeddings[index : index + 1],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse[index : index + 1],
            dense_prompt_embeddings=dense[index : index + 1],
            multimask_output=False,
        )
        logits.append(low_res_logits_to_frame(low_res, model.image_size, model.frame_size))
    return {"logits": torch.cat(logits), "image_embeddings": embeddings, "prototypes": prototypes}


def _training_step(model, forward, loss_fn, optimizer, embeddings, targets) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(model, embeddings, targets["class_id"]), targets)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _batched_forward(model: SurgicalSAM, embeddings: torch.Tensor, class_ids: torch.Tensor) -> dict:
    return model(embeddings, class_ids)


def _cache_sizes(embed_dim: int, grid: int, frame_hw: Sequence[int]) -> dict[str, int]:
    """Bytes of one cached embedding (float16 .npy, as the cache writes it) and of a demo-like label PNG."""
    from .data.demo import render_sequence
    from .data.layout import write_label_map

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


def _tap_cache_entry_files(identity: dict, folder: str) -> tuple[str, str]:
    """Write one tap-cache entry's arrays as the cache does (float16 .npy); -> (embedding path, taps path)."""
    grid_h, grid_w = identity["grid_size"]
    paths = (os.path.join(folder, "frame.npy"), os.path.join(folder, "frame_taps.npy"))
    with open(paths[0], "wb") as handle:
        np.save(handle, np.zeros((identity["embed_dim"], grid_h, grid_w), dtype=np.float16))
    with open(paths[1], "wb") as handle:
        np.save(handle, np.zeros((len(identity["taps"]), grid_h, grid_w, identity["tap_dim"]), dtype=np.float16))
    return paths


def _distill_benchmark(batch, num_classes, sam_variant, frame_hw, pvt, steps, device, seed, say) -> dict[str, Any]:
    """Part 6: Distillation-SAM training samples/s without and with the tap cache; tap cache bytes per entry."""
    from .data.embedding_cache import cache_identity, entry_bytes
    from .networks.distillation_sam import DistillationSAM

    generator = torch.Generator().manual_seed(seed + 1)
    frames = (torch.rand(batch, 3, *frame_hw, generator=generator) * 255).to(device)
    label = torch.zeros(batch, 1, *frame_hw, dtype=torch.long)
    for row in range(batch):  # one instrument-like rectangle per frame, class 1..C
        label[row, 0, frame_hw[0] // 4 : frame_hw[0] // 2, frame_hw[1] // 4 : frame_hw[1] // 2] = row % num_classes + 1
    label = label.to(device)
    torch.manual_seed(seed)
    model = DistillationSAM(num_classes, frame_hw, sam_variant=sam_variant, sam_checkpoint=None, pvt=pvt).to(device)
    model.train()
    with torch.no_grad():
        _, embedding, taps = model.encode(frames)
        taps = torch.stack(taps, 1)
    loss_fn = DistillationSAMLoss(ignore_index=255)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    out: dict[str, Any] = {"sam_variant": sam_variant, "batch_size": batch, "frame_size": list(frame_hw),
                           "taps": list(model.taps), "trainable_parameters": model.trainable_parameter_counts()["total"]}
    for name, cached in (("raw_frames", {}), ("tap_cache", {"embedding": embedding, "taps": taps})):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(frames, label=label, **cached), label)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        say(f"Distillation-SAM training ({name}, {sam_variant}, batch {batch}): warm-up, then {steps} step(s)")
        step()
        seconds, _ = _timed(step, device, steps)
        out[name] = {"s_per_step": seconds, "samples_per_s": batch / seconds}
    out["cache_speedup"] = out["raw_frames"]["s_per_step"] / out["tap_cache"]["s_per_step"]
    identity = cache_identity(sam_variant, None, model.taps)
    with tempfile.TemporaryDirectory() as folder:
        paths = _tap_cache_entry_files(identity, folder)
        npy_bytes = sum(os.path.getsize(p) for p in paths)
        start = time.perf_counter()
        for _ in range(steps):
            for path in paths:
                torch.from_numpy(np.load(path).astype(np.float32))
        read_seconds = (time.perf_counter() - start) / steps
    out["cache"] = {"array_bytes_per_entry": entry_bytes(identity), "npy_bytes_per_entry": npy_bytes,
                    "read_s_per_entry": read_seconds}
    del model, optimizer, frames, embedding, taps
    return out


# ------------------------------------------------------------------------------------------ benchmark
def run_benchmark(
    batch_size: int = 32,
    num_classes: int = 7,
    num_tokens: int = 2,
    frame_size: Sequence[int] = (1024, 1280),
    steps: int = 3,
    encoder_frames: int = 2,
    device: str | torch.device | None = None,
    inference_frames: int = 8,
    sam_variant: str = "vit_b",
    seed: int = 0,
    verbose: bool = False,
    distill_batch_size: int = 2,
    distill_sam_variant: str | None = None,
    distill_frame_size: Sequence[int] | None = None,
    distill_pvt: dict | None = None,
) -> dict[str, Any]:
    """Measure training/inference speed, peak memory and cache size; see the module docstring.

    Args:
        batch_size: training batch of (frame, class) samples.
        num_classes: C.
        num_tokens: n, sparse tokens per class.
        frame_size: (H, W) of the frames; logits and the Dice loss are at this size.
        steps: timed repetitions of each measurement, after one untimed warm-up.
        encoder_frames: frames through the image encoder in part 3 (0 skips part 3).
        device: ``cpu``, ``cuda[:N]``; None picks cuda when available.
        inference_frames: frames per inference call in part 2.
        sam_variant: SAM variant of the network (``vit_b``: the official 256 x 64 x 64 embeddings;
            ``tiny`` for quick tests: 256 x 16 x 16).
        seed: seed of the random weights and data.
        verbose: print progress lines.
        distill_batch_size: frames per Distillation-SAM training step in part 6 (0 skips part 6).
        distill_sam_variant: SAM variant of part 6 (None: ``sam_variant``; default taps).
        distill_frame_size: (H, W) of part 6's frames (None: ``frame_size``).
        distill_pvt: PVT keyword arguments of part 6 (None: PVT-tiny).

    Returns:
        dict with ``settings``, ``train`` (per path: s/step, samples/s, warm-up loss; the speed-up),
        ``inference_cached``, ``inference_encoder`` (frames/s; None when skipped), ``memory``
        (peak RSS MiB after each part; CUDA peak MiB per part on a GPU), ``cache`` and ``distill``
        (None when skipped).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    steps = max(1, int(steps))
    frame_hw = (int(frame_size[0]), int(frame_size[1]))
    variant = get_variant(sam_variant)
    grid, embed_dim = variant.grid_size, variant.prompt_embed_dim
    on_cuda = device.type == "cuda"

    def say(message: str) -> None:
        if verbose:
            print(f"[benchmark] {message}", flush=True)

    def cuda_peak_mb() -> float | None:
        if not on_cuda:
            return None
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak

    result: dict[str, Any] = {
        "settings": {
            "batch_size": int(batch_size),
            "num_classes": int(num_classes),
            "num_tokens": int(num_tokens),
            "frame_size": list(frame_hw),
            "embedding_shape": [embed_dim, grid, grid],
            "sam_variant": sam_variant,
            "steps": steps,
            "inference_frames": int(inference_frames),
            "encoder_frames": int(encoder_frames),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        },
        "memory": {"peak_rss_mb": {}, "cuda_peak_mb": {}},
    }
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result["memory"]["peak_rss_mb"]["start"] = _peak_rss_mb()

    # ---------------------------------------------------------------- 1. training step, batched vs loop
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch_size, embed_dim, grid, grid, generator=generator).to(device)
    targets = _random_targets(generator, batch_size, num_classes, frame_hw, variant.image_size, (grid, grid), device)
    torch.manual_seed(seed)
    base = SurgicalSAM(num_classes, num_tokens, frame_hw, sam_variant=sam_variant, sam_checkpoint=None,
                       with_image_encoder=False)
    train: dict[str, Any] = {}
    for name, forward in (("batched", _batched_forward), ("loop", _original_loop_forward)):
        model = copy.deepcopy(base).to(device).train()  # both paths start from the same weights
        loss_fn = SurgicalSAMLoss()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
        say(f"training step ({name}): warm-up")
        warmup_loss = _training_step(model, forward, loss_fn, optimizer, embeddings, targets)
        say(f"training step ({name}): {steps} timed step(s)")
        seconds, _ = _timed(lambda: _training_step(model, forward, loss_fn, optimizer, embeddings, targets),
                            device, steps)
        train[name] = {"s_per_step": seconds, "samples_per_s": batch_size / seconds, "warmup_loss": warmup_loss}
        del model, optimizer
    train["speedup"] = train["loop"]["s_per_step"] / train["batched"]["s_per_step"]
    # same weights, same data: the two paths must give the same first loss
    train["warmup_loss_difference"] = abs(train["batched"]["warmup_loss"] - train["loop"]["warmup_loss"])
    result["train"] = train
    result["memory"]["peak_rss_mb"]["train"] = _peak_rss_mb()
    result["memory"]["cuda_peak_mb"]["train"] = cuda_peak_mb()
    del embeddings, targets

    # ------------------------------------------------------------ 2. inference from cached embeddings
    model = base.to(device).eval()
    frames = torch.randn(inference_frames, embed_dim, grid, grid, generator=generator).to(device)
    every_class = torch.ones(inference_frames, num_classes, dtype=torch.bool, device=device)
    with torch.no_grad():
        say(f"inference from cached embeddings: warm-up, then {steps} call(s) of {inference_frames} frame(s)")
        model.predict_classes(frames[:1], every_class[:1])
        seconds, (logits, _quality) = _timed(lambda: model.predict_classes(frames, every_class), device, steps)
    result["inference_cached"] = {
        "s_per_frame": seconds / inference_frames,
        "frames_per_s": inference_frames / seconds,
        "pairs_per_frame": num_classes,
        "logits_shape": list(logits.shape),
    }
    del logits, frames, model, base
    result["memory"]["peak_rss_mb"]["inference_cached"] = _peak_rss_mb()
    result["memory"]["cuda_peak_mb"]["inference_cached"] = cuda_peak_mb()

    # ------------------------------------------------------------------ 3. inference with the encoder
    result["inference_encoder"] = None
    if encoder_frames > 0:
        torch.manual_seed(seed)
        model = SurgicalSAM(num_classes, num_tokens, frame_hw, sam_variant=sam_variant, sam_checkpoint=None,
                            with_image_encoder=True).to(device).eval()
        raw = (torch.rand(encoder_frames, 3, *frame_hw, generator=generator) * 255).to(device)
        every_class = torch.ones(encoder_frames, num_classes, dtype=torch.bool, device=device)
        with torch.no_grad():
            say("inference with the image encoder: warm-up on 1 frame")
            model.predict_classes(raw[:1], every_class[:1])
            say(f"inference with the image encoder: {encoder_frames} frame(s)")
            seconds, _ = _timed(lambda: model.predict_classes(raw, every_class), device, 1)
        result["inference_encoder"] = {"s_per_frame": seconds / encoder_frames, "frames_per_s": encoder_frames / seconds}
        del model, raw
        result["memory"]["peak_rss_mb"]["inference_encoder"] = _peak_rss_mb()
        result["memory"]["cuda_peak_mb"]["inference_encoder"] = cuda_peak_mb()

    # ------------------------------------------------------------------------------- 5. cache size
    result["cache"] = _cache_sizes(embed_dim, grid, frame_hw)

    # ---------------------------------------------------------------------- 6. Distillation-SAM
    result["distill"] = None
    if distill_batch_size > 0:
        result["distill"] = _distill_benchmark(
            int(distill_batch_size), num_classes, distill_sam_variant or sam_variant,
            tuple(distill_frame_size or frame_hw), distill_pvt, steps, device, seed, say,
        )
        result["memory"]["peak_rss_mb"]["distill"] = _peak_rss_mb()
        result["memory"]["cuda_peak_mb"]["distill"] = cuda_peak_mb()
    if not on_cuda:
        result["memory"]["cuda_peak_mb"] = None
    return result


# --------------------------------------------------------------------------------------------- table
def format_benchmark_table(result: dict[str, Any]) -> str:
    """A plain-text report of :func:`run_benchmark`'s result."""
    s = result["settings"]
    train = result["train"]
    d, h, w = s["embedding_shape"]
    lines = [
        "SurgicalSAM benchmark",
        f"  batch {s['batch_size']}, C={s['num_classes']}, n={s['num_tokens']}, frame {s['frame_size'][0]}x"
        f"{s['frame_size'][1]}, embeddings {d}x{h}x{w}, device {s['device']} ({s['device_name']}), "
        f"torch {s['torch_version']} with {s['torch_threads']} thread(s), {s['steps']} timed step(s) after a warm-up",
        f"  network: SurgicalSAM on SAM {s['sam_variant']} sizes, random weights; parts 1-2 run without the image "
        f"encoder, on cached-embedding-sized inputs" + (" (the prompt side is identical for vit_h)" if h == 64 else ""),
        "",
        f"  {'measurement':<58}{'value':>14}",
        f"  {'-' * 72}",
        f"  {'1. training, batched decoder call      samples/s':<58}{train['batched']['samples_per_s']:>14.2f}",
        f"  {'   (s per step of ' + str(s['batch_size']) + ')':<58}{train['batched']['s_per_step']:>14.3f}",
        f"  {'   training, per-sample loop (original) samples/s':<58}{train['loop']['samples_per_s']:>14.2f}",
        f"  {'   (s per step of ' + str(s['batch_size']) + ')':<58}{train['loop']['s_per_step']:>14.3f}",
        f"  {'   speed-up of the batched call':<58}{train['speedup']:>13.2f}x",
        f"  {'   |loss batched - loss loop| at the warm-up step':<58}{train['warmup_loss_difference']:>14.2e}",
    ]
    cached = result["inference_cached"]
    lines.append(
        f"  {'2. inference from cached embeddings, all C prompted  fr/s':<58}{cached['frames_per_s']:>14.2f}"
    )
    encoder = result.get("inference_encoder")
    if encoder is None:
        lines.append(f"  {'3. inference with the image encoder               fr/s':<58}{'skipped':>14}")
    else:
        lines.append(f"  {'3. inference with the image encoder (' + s['sam_variant'] + ')':<52}{'fr/s':<6}"
                     f"{encoder['frames_per_s']:>14.3f}")
        lines.append(f"  {'   (s per frame, ' + str(s['encoder_frames']) + ' frame(s))':<58}{encoder['s_per_frame']:>14.2f}")
    for part, value in result["memory"]["peak_rss_mb"].items():
        lines.append(f"  {'4. peak RSS after ' + part + ' (MiB, process so far)':<58}{value:>14.0f}")
    for part, value in (result["memory"].get("cuda_peak_mb") or {}).items():
        if value is not None:
            lines.append(f"  {'   CUDA max allocated in ' + part + ' (MiB)':<58}{value:>14.0f}")
    cache = result["cache"]
    lines += [
        f"  {'5. cache per frame: embedding .npy (float16, bytes)':<58}{cache['embedding_npy_bytes']:>14,d}",
        f"  {'   of which header (bytes)':<58}{cache['embedding_npy_bytes'] - cache['embedding_raw_bytes']:>14,d}",
        f"  {'   label PNG of a demo-like label map (bytes)':<58}{cache['label_png_bytes']:>14,d}",
    ]
    distill = result.get("distill")
    if distill is None:
        lines.append(f"  {'6. Distillation-SAM training':<58}{'skipped':>14}")
    else:
        h, w = distill["frame_size"]
        lines += [
            f"  6. Distillation-SAM on SAM {distill['sam_variant']} (taps {distill['taps']}, "
            f"{distill['trainable_parameters']:,d} trainable), batch {distill['batch_size']}, frame {h}x{w}",
            f"  {'   training from raw frames (encoder each step)  samples/s':<58}"
            f"{distill['raw_frames']['samples_per_s']:>14.3f}",
            f"  {'   training from the tap cache                   samples/s':<58}"
            f"{distill['tap_cache']['samples_per_s']:>14.3f}",
            f"  {'   speed-up of the tap cache (reads not counted)':<58}{distill['cache_speedup']:>13.2f}x",
            f"  {'   tap cache read per entry, float16 .npy -> float32 (s)':<58}"
            f"{distill['cache']['read_s_per_entry']:>14.4f}",
            f"  {'   tap cache per (frame, version): arrays (bytes)':<58}"
            f"{distill['cache']['array_bytes_per_entry']:>14,d}",
            f"  {'   the two .npy files with headers (bytes)':<58}{distill['cache']['npy_bytes_per_entry']:>14,d}",
            f"  {'   + the augmented frame PNG and label PNG (at most H*W*4 bytes)':<58}{h * w * 4:>14,d}",
        ]
    return "\n".join(lines)
