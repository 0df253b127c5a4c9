"""The benchmark's worker processes: ``python -m scripts.measurement.benchmark_workers KIND CONFIG_JSON``.

Each path (the original's operations, the bundle's) runs parts 1, 2 and 4 of the benchmark in a process of its
own (:func:`path_worker`), with the allocator setting the configuration names, so that each has its own peak
memory and process settings; the workers of part 3 are in
:mod:`scripts.measurement.encoder_speed`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..sam.backbone import get_variant
from ..sam.geometry import masks_to_embedding_grid
from ..surgical_sam.batches import PromptedSampleBatch, micro_batched_backward
from ..surgical_sam.loss import SurgicalSAMLoss
from ..surgical_sam.network import SurgicalSAM
from .original_operations import original_batch, original_inference, original_training_step
from .timing import peak_rss_mb, sync, timed

WORKER_MARK = "SURGICAL_SAM_BENCHMARK_RESULT "
#: Allocator settings a worker can run under: glibc's defaults (with a plain environment: the original as a new
#: user runs it), the bundle's ``mallopt`` (:mod:`scripts.engine.process_settings`), or a never-trimming glibc
#: heap set through the environment before the process starts (:data:`NEVER_TRIM_ENVIRONMENT`).
ALLOCATORS = ("default", "mallopt", "never_trim")
#: glibc's allocator variables for a heap that never trims and never maps a block of its own (read at start).
NEVER_TRIM_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1)}


def random_targets(
    generator: torch.Generator,
    batch: int,
    num_classes: int,
    frame_hw: Sequence[int],
    image_size: int,
    grid_hw: Sequence[int],
    device: torch.device,
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


def model_and_data(cfg: dict, device: torch.device):
    """The benchmark's network (random weights, ``cfg["seed"]``) and data: training embeddings (B, d, h, w),
    their targets (:func:`random_targets`) and the inference frames' embeddings (F, d, h, w)."""
    variant = get_variant(cfg["sam_variant"])
    grid = variant.grid_size
    generator = torch.Generator().manual_seed(cfg["seed"])
    embeddings = torch.randn(cfg["batch_size"], variant.prompt_embed_dim, grid, grid, generator=generator).to(device)
    targets = random_targets(
        generator, cfg["batch_size"], cfg["num_classes"], cfg["frame_size"], variant.image_size, (grid, grid), device
    )
    frames = torch.randn(cfg["inference_frames"], variant.prompt_embed_dim, grid, grid, generator=generator).to(device)
    torch.manual_seed(cfg["seed"])
    model = SurgicalSAM(
        cfg["num_classes"],
        cfg["num_tokens"],
        cfg["frame_size"],
        sam_variant=cfg["sam_variant"],
        sam_checkpoint=None,
        with_image_encoder=False,
    ).to(device)
    return model, embeddings, targets, frames


def bundle_training_step(
    model, optimizer, loss_fn, embeddings, targets, autocast: bool = False, micro_batch_size: int | None = None
) -> torch.Tensor:
    """One training step as the bundle's trainer runs it (``MicroBatchIteration``); -> the loss as a tensor
    (no host sync)."""
    optimizer.zero_grad(set_to_none=True)

    def forward(data, network, class_ids):
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=autocast):
            output = network(data, class_ids)
        return {k: v.float() for k, v in output.items()} if autocast else output  # as AutocastInferer

    loss, _ = micro_batched_backward(
        model, loss_fn, embeddings, targets, {"class_ids": targets["class_id"]}, micro_batch_size, forward=forward
    )
    optimizer.step()
    return loss


def batch_read_seconds(cfg: dict, embedding: torch.Tensor, label_hw: Sequence[int]) -> float:
    """Seconds to read a training batch from the embedding cache as ``CachedPromptDataset`` does, up to
    the tensors the step takes: per sample the float16 ``.npy`` and the label PNG (``EmbeddingCache.load``
    as stored), the sample's masks (``prompt_sample``), then the collate and ``PromptedSampleBatch``'s
    widening to float32 on the device (one process; the trainer's loader workers read ahead of the step)."""
    from types import SimpleNamespace

    from ..data.frame_files import write_label_map
    from ..embedding_cache import EmbeddingCache
    from ..surgical_sam.datasets import prompt_sample

    variant = get_variant(cfg["sam_variant"])
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "frame.npy"), "wb") as handle:
            np.save(handle, embedding.cpu().numpy().astype(np.float16))
        label = np.zeros(tuple(label_hw), dtype=np.uint8)
        label[: label_hw[0] // 2, : label_hw[1] // 2] = 1
        write_label_map(os.path.join(folder, "label.png"), label)
        cache = SimpleNamespace(cache_dir=folder)
        entry = {"embedding": "frame.npy", "label": "label.png"}
        device = torch.device(cfg["device"])
        start = time.perf_counter()
        items = []
        for _ in range(cfg["batch_size"]):
            frame_embedding, frame_label = EmbeddingCache.load(cache, entry, as_stored=True)
            items.append(
                prompt_sample(
                    frame_embedding, frame_label, 1, variant.image_size, (variant.grid_size, variant.grid_size)
                )
            )
        PromptedSampleBatch()(torch.utils.data.default_collate(items), device)
        sync(device)
        return time.perf_counter() - start


def path_worker(cfg: dict) -> dict[str, Any]:
    """Parts 1, 2 and 4 for one path (``cfg["path"]``: ``original`` or ``bundle``) under ``cfg["allocator"]``
    (:data:`ALLOCATORS`), in this process; parameters after the first step are written to
    ``cfg["params_file"]`` for the comparison between paths."""
    from ..engine.process_settings import apply_process_settings, current_process_settings
    from ..surgical_sam.loss import class_embeddings_from_masks

    path, allocator = cfg["path"], cfg["allocator"]
    if allocator != "default":
        apply_process_settings(allocator=allocator == "mallopt")
    device = torch.device(cfg["device"])
    model, embeddings, targets, frames = model_and_data(cfg, device)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    if path == "bundle":
        loss_fn = SurgicalSAMLoss()
        network = torch.compile(model) if cfg.get("compile") else model

        def step():
            return bundle_training_step(
                network, optimizer, loss_fn, embeddings, targets, cfg.get("amp", False), cfg.get("micro_batch_size")
            )
    else:
        # the original loads the class embeddings with each sample: data, not part of the step
        class_embeddings, _valid = class_embeddings_from_masks(embeddings, targets["grid_mask"])
        embeddings, masks = original_batch(embeddings, targets["mask"])
        frames = frames.permute(0, 2, 3, 1).contiguous()  # channels-last, as the original's loader hands them

        def step():
            return original_training_step(model, optimizer, embeddings, masks, targets["class_id"], class_embeddings)

    out: dict[str, Any] = {"path": path, "allocator": allocator, "process_settings": current_process_settings()}
    out["allocator_environment"] = {name: os.environ.get(name) for name in NEVER_TRIM_ENVIRONMENT}
    out["first_loss"] = float(step())  # warm-up, also the step whose loss and parameters are compared
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg["params_file"])
    seconds, _ = timed(step, device, cfg["steps"])
    out["train"] = {"s_per_step": seconds, "samples_per_s": cfg["batch_size"] / seconds}
    out["train_peak_rss_gib"] = peak_rss_mb() / 1024
    if path == "bundle":
        read = batch_read_seconds(cfg, embeddings[0], cfg["frame_size"])
        out["data"] = {"batch_read_s": read, "batch_read_share_of_step": read / seconds}
    optimizer = None  # released before inference is measured
    model.eval()
    num_classes = cfg["num_classes"]
    with torch.no_grad():
        if path == "bundle":
            from ..surgical_sam.inferer import ClassPromptInferer

            inferer = ClassPromptInferer(num_classes, protocol="auto", output="label_map")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.get("amp", False)):
                infer = lambda: inferer(frames, model)  # noqa: E731
                infer()  # warm-up
                seconds, label_map = timed(infer, device, cfg["steps"])
        else:

            def infer():
                return original_inference(model, frames, cfg["batch_size"])

            infer()
            seconds, label_map = timed(infer, device, cfg["steps"])
    masks_made = cfg["inference_frames"] * num_classes
    out["inference_cached"] = {
        "s_per_call": seconds,
        "masks_per_s": masks_made / seconds,
        "frames_per_s": cfg["inference_frames"] / seconds,
        "label_map_shape": list(label_map.shape),
    }
    out["peak_rss_gib"] = peak_rss_mb() / 1024
    return out


def main(argv: Sequence[str]) -> None:
    """``python -m scripts.measurement.benchmark_workers KIND CONFIG_JSON``: one worker; its record is printed
    as one JSON line after :data:`WORKER_MARK`."""
    import json

    from .encoder_speed import encoder_memory_worker, encoder_speed_worker

    kind, cfg = argv[0], json.loads(argv[1])
    workers = {
        "path": path_worker,
        "encoder_speed": encoder_speed_worker,
        "encoder_memory": encoder_memory_worker,
    }
    print(WORKER_MARK + json.dumps(workers[kind](cfg)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
