"""Speed, memory and cache-size benchmark of SurgicalSAM (``surgical-sam benchmark``).

One run measures, on random data and random weights (speed does not depend on the values):

1. training samples/s of a full step (forward, full-frame Dice + PCL, backward, Adam) on cached
   embeddings, for this bundle's path and for a faithful copy of the original SurgicalSAM's operations
   (:func:`original_forward`: its prompt encoder with the per-class features stacked and cloned, one SAM
   ``MaskDecoder`` call and one postprocess per sample, its Dice, its NTXent contrastive loss), with the
   loss and the parameters after one step compared between the two;
2. inference from cached embeddings, every class prompted and the label map merged (the automatic
   protocol), in masks/s, for both;
3. precompute frames/s of the frozen image encoder (fp32; bf16 autocast beside it);
4. the peak resident memory of each part;
5. the bytes a frame takes in the embedding cache (float16 ``.npy``) and its label PNG;
6. Distillation-SAM (``distill_batch_size`` > 0): training samples/s from raw frames and from the tap
   cache, the tap cache's read time and bytes per entry.

Parts 1-4 run in their own processes, so each has its own peak memory and process settings:
the original *out of the box* (a plain environment, glibc's default allocator), the original *on equal
terms* (the process settings of :mod:`scripts.engine.process_settings`, which the bundle applies to itself)
and the bundle's path as users get it. The speed-ups are the ratios of figures of one run.

The prompt side (prototypes, class prompt encoder, mask decoder) is the same for every SAM variant
(d = 256 on a 64x64 grid), so ``vit_b`` without a checkpoint stands in for ``vit_h`` in parts 1-2;
part 3 does depend on the encoder and is measured with the variant asked for.
"""

from __future__ import annotations

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

from .distillation_sam.loss import DistillationSAMLoss
from .sam.backbone import get_variant
from .sam.geometry import masks_to_embedding_grid, resize_by_interpolation
from .surgical_sam.batches import PromptedSampleBatch, micro_batched_backward
from .surgical_sam.loss import SurgicalSAMLoss
from .surgical_sam.network import SurgicalSAM

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


# ------------------------------------------------------------------- the original's operations
def original_prompt_encoder(encoder, features: torch.Tensor, prototypes: torch.Tensor, class_ids: torch.Tensor):
    """The original SurgicalSAM's prototype-based prompt encoder, operation for operation, on this bundle's
    weights (``PrototypePromptEncoder``): the features stacked once per class, the class-activated tensor
    (B, C, h*w, d) and its clone for the sparse path, the prompted class picked with a one-hot mask.

    Args:
        encoder: a ``PrototypePromptEncoder`` (its weights only are used).
        features: (B, h*w, d) flattened image embeddings; prototypes: (C, d); class_ids: (B,) in 1..C.

    Returns:
        dense (B, d, h, w) and sparse (B, C*n, d) prompt embeddings.
    """
    height, width = encoder.grid_size
    num_classes = encoder.num_classes
    class_prompts = torch.stack([prototypes.unsqueeze(-1) for _ in range(features.shape[0])], dim=0)  # (B, C, d, 1)
    features = torch.stack([features for _ in range(num_classes)], dim=1)  # (B, C, h*w, d)
    similarity = torch.matmul(features, class_prompts)  # (B, C, h*w, 1)
    features = features + features * similarity
    features_sparse = features.clone()
    one_hot = torch.nn.functional.one_hot(class_ids - 1, num_classes)
    prompted = features[one_hot == 1]  # (B, h*w, d)
    prompted = prompted.reshape(-1, height, width, prompted.shape[-1]).permute(0, 3, 1, 2)
    dense = encoder.dense_fc_2(encoder.relu(encoder.dense_fc_1(prompted)))
    features_sparse = features_sparse.reshape(-1, height * width, features_sparse.shape[-1])
    sparse = encoder.sparse_fc_2(encoder.relu(encoder.sparse_fc_1(features_sparse)))
    sparse = sparse.reshape(-1, num_classes, *sparse.shape[1:])
    positive = encoder.pn_cls_embeddings[1].weight.unsqueeze(0).unsqueeze(0) * one_hot.unsqueeze(-1).unsqueeze(-1)
    negative = encoder.pn_cls_embeddings[0].weight.unsqueeze(0).unsqueeze(0) * (1 - one_hot).unsqueeze(-1).unsqueeze(-1)
    sparse = sparse + positive.detach() + negative.detach()
    return dense, sparse.reshape(sparse.shape[0], -1, sparse.shape[-1])


def original_forward(model: SurgicalSAM, embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple:
    """The original's forward: prompts for the batch, then per sample one decoder call and one postprocess.

    Returns:
        logits (B, 1, H, W) at frame size and the prototypes (C, d).
    """
    prototypes = model.prototypes()
    features = embeddings.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
    dense, sparse = original_prompt_encoder(model.class_prompt_encoder, features, prototypes, class_ids)
    logits = []
    for index in range(embeddings.shape[0]):
        low_res, _quality = model.mask_decoder(
            image_embeddings=embeddings[index : index + 1],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse[index : index + 1],
            dense_prompt_embeddings=dense[index : index + 1],
            multimask_output=False,
        )
        logits.append(resize_by_interpolation(low_res, model.image_size, model.frame_size))
    return torch.cat(logits), prototypes


def original_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's Dice: per sample 2 sum(p t) / ((sum p^2 + 1e-3) + (sum t^2 + 1e-3)), 1 - mean."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 2 * (p * t).sum(1) / ((p * p).sum(1) + 1e-3 + ((t * t).sum(1) + 1e-3))
    return 1 - dice.mean()


def original_ntxent_loss(
    prototypes: torch.Tensor, class_embeddings: torch.Tensor, class_ids: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """The original's contrastive loss, NTXent with the prototypes (labels 1..C) as anchors and the
    samples' class embeddings as references: for each (prototype c, sample b of class c) pair,
    -log(exp(s/t) / (exp(s/t) + sum over samples b' of another class of exp(s(c, b')/t))), mean over pairs.
    """
    cosine = (
        torch.nn.functional.normalize(prototypes, dim=1) @ torch.nn.functional.normalize(class_embeddings, dim=1).t()
    )
    scaled = cosine / temperature  # (C, B)
    anchor_labels = torch.arange(1, prototypes.shape[0] + 1, device=prototypes.device)
    positive_pairs = anchor_labels[:, None] == class_ids[None, :]  # (C, B)
    largest = scaled.detach().amax(dim=1, keepdim=True)  # subtracted for stability, as NTXent implementations do
    exp = torch.exp(scaled - largest)
    negatives = (exp * ~positive_pairs).sum(dim=1, keepdim=True)  # (C, 1)
    per_pair = -torch.log(exp / (exp + negatives))
    return per_pair[positive_pairs].mean()


def original_training_step(model, optimizer, embeddings, targets, class_embeddings) -> float:
    """One training step of the original: forward, Dice + NTXent, backward, Adam step; -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    logits, prototypes = original_forward(model, embeddings, targets["class_id"])
    loss = original_dice_loss(logits, targets["mask"]) + original_ntxent_loss(
        prototypes, class_embeddings, targets["class_id"]
    )
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def original_merge(masks: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """The original's label map of one frame: each prompted class's mask (logit > 0) painted in class order."""
    label_map = torch.zeros(masks.shape[-2:], dtype=torch.long, device=masks.device)
    for mask, class_id in zip(masks, class_ids):
        label_map[mask] = class_id
    return label_map


def original_inference(model: SurgicalSAM, embeddings: torch.Tensor, pairs_per_batch: int) -> torch.Tensor:
    """The original's automatic inference: every (frame, class) pair through :func:`original_forward`
    in batches, then the label map of each frame. -> (B, H, W) long."""
    frames, classes = torch.meshgrid(
        torch.arange(embeddings.shape[0]), torch.arange(1, model.num_classes + 1), indexing="ij"
    )
    frames, classes = frames.reshape(-1), classes.reshape(-1)
    masks = []
    for start in range(0, frames.numel(), pairs_per_batch):
        batch = slice(start, start + pairs_per_batch)
        logits, _ = original_forward(model, embeddings[frames[batch]], classes[batch].to(embeddings.device))
        masks.append(logits[:, 0] > 0)
    masks = torch.cat(masks).reshape(embeddings.shape[0], model.num_classes, *masks[0].shape[-2:])
    class_ids = torch.arange(1, model.num_classes + 1)
    return torch.stack([original_merge(frame_masks, class_ids) for frame_masks in masks])


# ----------------------------------------------------------------------------------- the bundle's
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
    from .distillation_sam.network import DistillationSAM

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
    out["cache"] = {
        "array_bytes_per_entry": entry_bytes(identity),
        "npy_bytes_per_entry": npy_bytes,
        "read_s_per_entry": read_seconds,
    }
    model = optimizer = frames = embedding = taps = None  # released before the next measurement
    return out


# ---------------------------------------------------------------------------------- worker process
WORKER_MARK = "SURGICAL_SAM_BENCHMARK_RESULT "
PATHS = ("original_out_of_the_box", "original_equal_terms", "bundle")


def _model_and_data(cfg: dict, device: torch.device):
    variant = get_variant(cfg["sam_variant"])
    grid = variant.grid_size
    generator = torch.Generator().manual_seed(cfg["seed"])
    embeddings = torch.randn(cfg["batch_size"], variant.prompt_embed_dim, grid, grid, generator=generator).to(device)
    targets = _random_targets(
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


def _batch_read_seconds(cfg: dict, embedding: torch.Tensor, label_hw: Sequence[int]) -> float:
    """Seconds to read a training batch from the embedding cache as ``CachedPromptDataset`` does, up to
    the tensors the step takes: per sample the float16 ``.npy`` and the label PNG (``EmbeddingCache.load``
    as stored), the sample's masks (``prompt_sample``), then the collate and ``PromptedSampleBatch``'s
    widening to float32 on the device (one process; the trainer's loader workers read ahead of the step)."""
    from types import SimpleNamespace

    from .data.embedding_cache import EmbeddingCache
    from .data.layout import write_label_map
    from .surgical_sam.datasets import prompt_sample

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
        _sync(device)
        return time.perf_counter() - start


def _worker(cfg: dict) -> dict[str, Any]:
    """Parts 1, 2 and 4 for one path (``cfg["path"]``), in this process; parameters after the first step
    are written to ``cfg["params_file"]`` for the comparison between paths."""
    from .engine.process_settings import apply_process_settings, current_process_settings
    from .surgical_sam.loss import class_embeddings_from_masks

    path = cfg["path"]
    if path != "original_out_of_the_box":
        apply_process_settings()
    device = torch.device(cfg["device"])
    model, embeddings, targets, frames = _model_and_data(cfg, device)
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

        def step():
            return original_training_step(model, optimizer, embeddings, targets, class_embeddings)

    out: dict[str, Any] = {"path": path, "process_settings": current_process_settings()}
    out["first_loss"] = float(step())  # warm-up, also the step whose loss and parameters are compared
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg["params_file"])
    seconds, _ = _timed(step, device, cfg["steps"])
    out["train"] = {"s_per_step": seconds, "samples_per_s": cfg["batch_size"] / seconds}
    out["train_peak_rss_gib"] = _peak_rss_mb() / 1024
    if path == "bundle":
        read = _batch_read_seconds(cfg, embeddings[0], cfg["frame_size"])
        out["data"] = {"batch_read_s": read, "batch_read_share_of_step": read / seconds}
    optimizer = None  # released before inference is measured
    model.eval()
    num_classes = cfg["num_classes"]
    with torch.no_grad():
        if path == "bundle":
            from .surgical_sam.inferer import ClassPromptInferer

            inferer = ClassPromptInferer(num_classes, protocol="auto", output="label_map")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.get("amp", False)):
                infer = lambda: inferer(frames, model)  # noqa: E731
                infer()  # warm-up
                seconds, label_map = _timed(infer, device, cfg["steps"])
        else:

            def infer():
                return original_inference(model, frames, cfg["batch_size"])

            infer()
            seconds, label_map = _timed(infer, device, cfg["steps"])
    masks = cfg["inference_frames"] * num_classes
    out["inference_cached"] = {
        "s_per_call": seconds,
        "masks_per_s": masks / seconds,
        "frames_per_s": cfg["inference_frames"] / seconds,
        "label_map_shape": list(label_map.shape),
    }
    out["peak_rss_gib"] = _peak_rss_mb() / 1024
    return out


def _encoder_worker(cfg: dict) -> dict[str, Any]:
    """Part 3: precompute frames/s of the frozen image encoder, fp32 and (not quick) bf16 autocast."""
    from .engine.process_settings import apply_process_settings

    apply_process_settings()
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model = (
        SurgicalSAM(
            cfg["num_classes"],
            cfg["num_tokens"],
            cfg["frame_size"],
            sam_variant=cfg["sam_variant"],
            sam_checkpoint=None,
            with_image_encoder=True,
        )
        .to(device)
        .eval()
    )
    raw = torch.rand(cfg["encoder_frames"], 3, *cfg["frame_size"], generator=torch.Generator().manual_seed(1)) * 255
    raw = raw.to(device)
    out: dict[str, Any] = {}
    settings = [("fp32", False)] + ([] if cfg["quick"] else [("bf16_autocast", True)])
    reference = None
    for name, autocast in settings:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model.embed_frames(raw[:1])  # warm-up
            seconds, embedding = _timed(lambda: model.embed_frames(raw), device, 1)
        embedding = embedding.float()
        out[name] = {"frames_per_s": cfg["encoder_frames"] / seconds, "s_per_frame": seconds / cfg["encoder_frames"]}
        if reference is None:
            reference = embedding
        else:
            out[name]["max_abs_diff_from_fp32"] = float((embedding - reference).abs().max())
    out["peak_rss_gib"] = _peak_rss_mb() / 1024
    return out


def worker_environment(plain: bool) -> dict[str, str]:
    """The environment of a benchmark worker: this process's (with the bundle's OpenMP variables, which a
    worker's OpenMP reads when it loads), or with ``plain`` one without allocator variables and without the
    variables of ``process_settings.OPENMP_ENVIRONMENT``."""
    from .engine.process_settings import OPENMP_ENVIRONMENT, set_openmp_environment

    set_openmp_environment()
    env = dict(os.environ)
    if plain:
        dropped = {"LD_PRELOAD", "GLIBC_TUNABLES"} | {name for name, _ in OPENMP_ENVIRONMENT}
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k not in dropped}
    return env


def _run_worker(kind: str, cfg: dict, plain: bool, say) -> dict[str, Any]:
    """Run ``python -m scripts.benchmark KIND CONFIG`` in a fresh process; ``plain``: an environment without
    allocator and OpenMP variables (the original as it runs out of the box)."""
    import json
    import subprocess

    env = worker_environment(plain)
    bundle_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([bundle_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    say(f"{kind} {cfg.get('path', '')}: a fresh process")
    done = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", kind, json.dumps(cfg)], env=env, capture_output=True, text=True
    )
    for line in done.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK) :])
    raise RuntimeError(
        f"benchmark worker {kind} {cfg.get('path', '')} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    )


def _compare_paths(cfg: dict, amp: bool, say) -> dict[str, Any]:
    """Parts 1, 2 and 4 on every path (:data:`PATHS`, and ``bundle_amp`` with ``amp``), each in its own worker;
    -> {path: its record}, each with ``param_max_abs_diff``: the largest parameter difference after the
    first step from the original on equal terms."""
    paths: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        runs = [(name, {}) for name in PATHS] + ([("bundle_amp", {"amp": True})] if amp else [])
        params = {}
        for name, extra in runs:
            path = "bundle" if name.startswith("bundle") else name
            params_file = os.path.join(folder, f"{name}.pt")
            paths[name] = _run_worker(
                "worker",
                {**cfg, **extra, "path": path, "params_file": params_file},
                plain=name == "original_out_of_the_box",
                say=say,
            )
            params[name] = torch.load(params_file)
    reference = params["original_equal_terms"]
    for name, record in paths.items():
        record["param_max_abs_diff"] = max(float((params[name][k] - v).abs().max()) for k, v in reference.items())
    return paths


def _path_figures(paths: dict[str, Any], amp: bool) -> dict[str, Any]:
    """The flat keys of the acceptance from the paths' records (:func:`_compare_paths`)."""
    bundle, plain, equal = paths["bundle"], paths["original_out_of_the_box"], paths["original_equal_terms"]
    figures = {
        "train_param_max_abs_diff": bundle["param_max_abs_diff"],
        "train_param_max_abs_diff_out_of_the_box": plain["param_max_abs_diff"],
        "train_samples_per_s": bundle["train"]["samples_per_s"],
        "train_samples_per_s_original": plain["train"]["samples_per_s"],
        "train_samples_per_s_original_equal_terms": equal["train"]["samples_per_s"],
        "train_speedup": bundle["train"]["samples_per_s"] / plain["train"]["samples_per_s"],
        "train_speedup_equal_terms": bundle["train"]["samples_per_s"] / equal["train"]["samples_per_s"],
        "infer_masks_per_s": bundle["inference_cached"]["masks_per_s"],
        "infer_masks_per_s_original": plain["inference_cached"]["masks_per_s"],
        "infer_masks_per_s_original_equal_terms": equal["inference_cached"]["masks_per_s"],
        "infer_speedup": bundle["inference_cached"]["masks_per_s"] / plain["inference_cached"]["masks_per_s"],
        "infer_speedup_equal_terms": bundle["inference_cached"]["masks_per_s"]
        / equal["inference_cached"]["masks_per_s"],
        "train_peak_rss_gib": bundle["train_peak_rss_gib"],
        "train_peak_rss_gib_original": plain["train_peak_rss_gib"],
        "train_peak_rss_gib_original_equal_terms": equal["train_peak_rss_gib"],
        "train_loss_abs_diff": abs(bundle["first_loss"] - equal["first_loss"]),
        "train_loss_abs_diff_out_of_the_box": abs(plain["first_loss"] - equal["first_loss"]),
        "data_batch_read_s": bundle["data"]["batch_read_s"],
        "data_batch_read_share_of_step": bundle["data"]["batch_read_share_of_step"],
        "process_settings": bundle["process_settings"],
        "paths": paths,
    }
    if amp:
        figures["train_param_max_abs_diff_amp"] = paths["bundle_amp"]["param_max_abs_diff"]
        figures["train_samples_per_s_amp"] = paths["bundle_amp"]["train"]["samples_per_s"]
        figures["infer_masks_per_s_amp"] = paths["bundle_amp"]["inference_cached"]["masks_per_s"]
        figures["train_loss_abs_diff_amp"] = abs(paths["bundle_amp"]["first_loss"] - equal["first_loss"])
    return figures


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
    quick: bool = False,
    amp: bool = False,
    compile: bool = False,
    micro_batch_size: int | None = 8,
) -> dict[str, Any]:
    """Measure training/inference speed, peak memory and cache size; see the module docstring.

    Args:
        batch_size: training batch of (frame, class) samples (also the original's inference batch of pairs).
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
        quick: batch 8, one timed step, 2 inference frames, 1 encoder frame (fp32 only), no part 6.
        amp: also measure the bundle's path under bf16 autocast (``*_amp`` keys).
        compile: run the bundle's training step through ``torch.compile``.
        micro_batch_size: the bundle's step in slices of this many samples (train.yaml's
            ``micro_batch_size``, 8 there too); None: the batch in one piece.

    Returns:
        dict with the flat keys of the issue's acceptance (``train_samples_per_s``,
        ``train_samples_per_s_original``, ``train_samples_per_s_original_equal_terms``, ``train_speedup``,
        ``train_speedup_equal_terms``, ``infer_masks_per_s`` and its ``_original`` / ``_original_equal_terms``
        / speed-ups, ``train_peak_rss_gib``, ``train_loss_abs_diff``, ``train_param_max_abs_diff``,
        ``encoder_frames_per_s``, ``device``, ``threads``, ``torch_version``, ``process_settings``) and the
        details: ``settings``, ``paths`` (each worker's record), ``encoder``, ``cache``, ``distill``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if quick:
        batch_size, steps, inference_frames, encoder_frames = 8, 1, 2, min(int(encoder_frames), 1)
        distill_batch_size = 0
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
    paths = _compare_paths(cfg, amp, say)
    result.update(_path_figures(paths, amp))

    # ------------------------------------------------------------------ 3. the image encoder
    result["encoder"] = None
    result["encoder_frames_per_s"] = None
    if encoder_frames > 0:
        result["encoder"] = _run_worker("encoder", cfg, plain=False, say=say)
        result["encoder_frames_per_s"] = result["encoder"]["fp32"]["frames_per_s"]

    # ------------------------------------------------------------------------------- 5. cache size
    result["cache"] = _cache_sizes(embed_dim, grid, frame_hw)

    # ---------------------------------------------------------------------- 6. Distillation-SAM
    result["distill"] = None
    if distill_batch_size > 0:
        from .engine.process_settings import apply_process_settings

        apply_process_settings()
        result["distill"] = _distill_benchmark(
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
        result["distill"]["peak_rss_gib"] = _peak_rss_mb() / 1024
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------- table
def format_benchmark_table(result: dict[str, Any]) -> str:
    """A plain-text report of :func:`run_benchmark`'s result."""
    s = result["settings"]
    d, h, w = s["embedding_shape"]
    paths = result["paths"]

    def row(label: str, value: str) -> str:
        return f"  {label:<62}{value:>14}"

    lines = [
        "SurgicalSAM benchmark",
        f"  batch {s['batch_size']}, C={s['num_classes']}, n={s['num_tokens']}, frame {s['frame_size'][0]}x"
        f"{s['frame_size'][1]}, embeddings {d}x{h}x{w}, device {s['device']} ({s['device_name']}), "
        f"torch {result['torch_version']} with {result['threads']} thread(s), {s['steps']} timed step(s) after a "
        f"warm-up{' (--quick)' if s['quick'] else ''}",
        f"  network: SurgicalSAM on SAM {s['sam_variant']} sizes, random weights; parts 1-2 on cached-embedding-"
        f"sized inputs" + (" (the prompt side is identical for vit_h)" if h == 64 else ""),
        f"  process settings of the bundle: {result['process_settings']['allocator']}",
        f"  the bundle's training step in slices of {s.get('micro_batch_size') or s['batch_size']} samples "
        f"(micro_batch_size)",
        "",
        row("measurement", "value"),
        f"  {'-' * 76}",
        row("1. training samples/s, this bundle", f"{result['train_samples_per_s']:.2f}"),
        row("   the original, out of the box (plain environment)", f"{result['train_samples_per_s_original']:.2f}"),
        row(
            "   the original on equal terms (the bundle's process settings)",
            f"{result['train_samples_per_s_original_equal_terms']:.2f}",
        ),
        row("   speed-up over the original out of the box", f"{result['train_speedup']:.2f}x"),
        row("   speed-up over the original on equal terms", f"{result['train_speedup_equal_terms']:.2f}x"),
        row("   |loss - original's loss| at the first step", f"{result['train_loss_abs_diff']:.2e}"),
        row("   max |parameter - original's| after the first step", f"{result['train_param_max_abs_diff']:.2e}"),
        row("2. inference from cached embeddings, all C prompted, masks/s", f"{result['infer_masks_per_s']:.2f}"),
        row("   the original, out of the box", f"{result['infer_masks_per_s_original']:.2f}"),
        row("   the original on equal terms", f"{result['infer_masks_per_s_original_equal_terms']:.2f}"),
        row("   speed-up over the original out of the box", f"{result['infer_speedup']:.2f}x"),
        row("   speed-up over the original on equal terms", f"{result['infer_speedup_equal_terms']:.2f}x"),
    ]
    if "train_samples_per_s_amp" in result:
        lines += [
            row("   bf16 autocast: training samples/s", f"{result['train_samples_per_s_amp']:.2f}"),
            row("   bf16 autocast: inference masks/s", f"{result['infer_masks_per_s_amp']:.2f}"),
            row(
                "   bf16 autocast: |loss - fp32 original's| at the first step",
                f"{result['train_loss_abs_diff_amp']:.2e}",
            ),
        ]
    encoder = result.get("encoder")
    if encoder is None:
        lines.append(row("3. precompute with the image encoder, frames/s", "skipped"))
    else:
        lines.append(
            row(
                f"3. precompute with the image encoder ({s['sam_variant']}, fp32), frames/s",
                f"{encoder['fp32']['frames_per_s']:.3f}",
            )
        )
        if "bf16_autocast" in encoder:
            lines.append(row("   bf16 autocast, frames/s", f"{encoder['bf16_autocast']['frames_per_s']:.3f}"))
            lines.append(
                row(
                    "   bf16 autocast, max |embedding - fp32|",
                    f"{encoder['bf16_autocast']['max_abs_diff_from_fp32']:.2e}",
                )
            )
    lines.append(
        row(
            f"   data path: a batch of {s['batch_size']} read from the cache (s; share of a step)",
            f"{result['data_batch_read_s']:.3f}; {100 * result['data_batch_read_share_of_step']:.1f}%",
        )
    )
    lines.append(row("4. peak RSS of the training step, this bundle (GiB)", f"{result['train_peak_rss_gib']:.2f}"))
    lines.append(
        row(
            "   the original out of the box / on equal terms (GiB)",
            f"{result['train_peak_rss_gib_original']:.2f} / {result['train_peak_rss_gib_original_equal_terms']:.2f}",
        )
    )
    if encoder is not None:
        lines.append(row("   peak RSS of the encoder part (GiB)", f"{encoder['peak_rss_gib']:.2f}"))
    cache = result["cache"]
    lines += [
        row("5. cache per frame: embedding .npy (float16, bytes)", f"{cache['embedding_npy_bytes']:,d}"),
        row("   of which header (bytes)", f"{cache['embedding_npy_bytes'] - cache['embedding_raw_bytes']:,d}"),
        row("   label PNG of a demo-like label map (bytes)", f"{cache['label_png_bytes']:,d}"),
    ]
    distill = result.get("distill")
    if distill is None:
        lines.append(row("6. Distillation-SAM training", "skipped"))
    else:
        h, w = distill["frame_size"]
        lines += [
            f"  6. Distillation-SAM on SAM {distill['sam_variant']} (taps {distill['taps']}, "
            f"{distill['trainable_parameters']:,d} trainable), batch {distill['batch_size']}, frame {h}x{w}",
            row(
                "   training from raw frames (encoder each step), samples/s",
                f"{distill['raw_frames']['samples_per_s']:.3f}",
            ),
            row("   training from the tap cache, samples/s", f"{distill['tap_cache']['samples_per_s']:.3f}"),
            row("   speed-up of the tap cache (reads not counted)", f"{distill['cache_speedup']:.2f}x"),
            row(
                "   tap cache read per entry, float16 .npy -> float32 (s)",
                f"{distill['cache']['read_s_per_entry']:.4f}",
            ),
            row("   tap cache per (frame, version): arrays (bytes)", f"{distill['cache']['array_bytes_per_entry']:,d}"),
            row("   the two .npy files with headers (bytes)", f"{distill['cache']['npy_bytes_per_entry']:,d}"),
            row("   + the augmented frame PNG and label PNG (at most H*W*4 bytes)", f"{h * w * 4:,d}"),
        ]
    lines.append(f"  ({result['seconds']:.0f} s in all; paths: {', '.join(paths)})")
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    """``python -m scripts.benchmark worker|encoder CONFIG_JSON``: one worker of :func:`run_benchmark`."""
    import json

    kind, cfg = argv[0], json.loads(argv[1])
    record = {"worker": _worker, "encoder": _encoder_worker}[kind](cfg)
    print(WORKER_MARK + json.dumps(record), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
