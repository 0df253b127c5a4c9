"""Part 6 of the benchmark: Distillation-SAM training from raw frames and from the tap cache, and the tap
cache's bytes and read time per entry."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ..distillation_sam.loss import DistillationSAMLoss
from .timing import timed


def tap_cache_entry_files(identity: dict, folder: str) -> tuple[str, str]:
    """Write one tap-cache entry's arrays as the cache does (the embedding in the default encoding, the taps
    float16 .npy); -> (embedding path, taps path)."""
    from ..embedding_cache import DEFAULT_EMBEDDING_ENCODING, encode_embedding

    grid_h, grid_w = identity["grid_size"]
    paths = (os.path.join(folder, "frame.npy"), os.path.join(folder, "frame_taps.npy"))
    embedding = np.zeros((identity["embed_dim"], grid_h, grid_w), dtype=np.float32)
    with open(paths[0], "wb") as handle:
        np.save(handle, encode_embedding(embedding, DEFAULT_EMBEDDING_ENCODING))
    with open(paths[1], "wb") as handle:
        np.save(handle, np.zeros((len(identity["taps"]), grid_h, grid_w, identity["tap_dim"]), dtype=np.float16))
    return paths


def distill_benchmark(batch, num_classes, sam_variant, frame_hw, pvt, steps, device, seed, say) -> dict[str, Any]:
    """Part 6: Distillation-SAM training samples/s without and with the tap cache; tap cache bytes per entry."""
    from ..data.layout import DEFAULT_IGNORE_INDEX
    from ..distillation_sam.network import DistillationSAM
    from ..embedding_cache import cache_identity, decode_embedding, entry_bytes

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
    loss_fn = DistillationSAMLoss(ignore_index=DEFAULT_IGNORE_INDEX)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    out: dict[str, Any] = {
        "sam_variant": sam_variant,
        "batch_size": batch,
        "frame_size": list(frame_hw),
        "taps": list(model.taps),
        "trainable_parameters": model.trainable_parameter_counts()["total"],
    }
    for name, cached in (("raw_frames", {}), ("tap_cache", {"embedding": embedding, "taps": taps})):

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(frames, label=label, **cached), label)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        say(f"Distillation-SAM training ({name}, {sam_variant}, batch {batch}): warm-up, then {steps} step(s)")
        step()
        seconds, _ = timed(step, device, steps)
        out[name] = {"s_per_step": seconds, "samples_per_s": batch / seconds}
    out["cache_speedup"] = out["raw_frames"]["s_per_step"] / out["tap_cache"]["s_per_step"]
    identity = cache_identity(sam_variant, None, model.taps)
    with tempfile.TemporaryDirectory() as folder:
        paths = tap_cache_entry_files(identity, folder)
        npy_bytes = sum(os.path.getsize(p) for p in paths)
        start = time.perf_counter()
        for _ in range(steps):
            for path in paths:
                torch.from_numpy(decode_embedding(np.load(path)))  # float16 taps: widened alike
        read_seconds = (time.perf_counter() - start) / steps
    out["cache"] = {
        "array_bytes_per_entry": entry_bytes(identity),
        "npy_bytes_per_entry": npy_bytes,
        "read_s_per_entry": read_seconds,
    }
    model = optimizer = frames = embedding = taps = None  # released before the next measurement
    return out
