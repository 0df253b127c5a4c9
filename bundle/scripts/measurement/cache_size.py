"""What one embedding-cache entry takes on disk in the 8-bit encoding against float16, and what it changes in
SurgicalSAM's decoder logits (issue 24, item 3): :func:`measure_cache_entry`."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from ..data.demo import make_demo_dataset
from ..data.frame_files import read_frame
from ..data.layout import load_datalist
from ..embedding_cache.encoding import DEFAULT_EMBEDDING_ENCODING, FLOAT16, decode_embedding, encode_embedding
from ..surgical_sam.network import SurgicalSAM

#: Demo frames encoded, and their (H, W): small frames, SAM resizes them to its input anyway.
MEASURED_FRAMES = 2
MEASURED_FRAME_SIZE = (256, 320)
#: Classes prompted per frame (the demo's instruments).
MEASURED_CLASSES = 7


def _npy_bytes(folder: str, name: str, array: np.ndarray) -> int:
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        np.save(handle, array)
    return os.path.getsize(path)


@torch.no_grad()
def measure_cache_entry(sam_variant: str = "vit_b", seed: int = 0, device: str = "cpu") -> dict:
    """Encode a couple of demo frames with the frozen encoder of a randomly initialised SAM of ``sam_variant``
    (seeded by ``seed``), store each embedding as the cache does in its default encoding and in float16, and
    run SurgicalSAM's decoder (same random SAM) on both for every class.

    Returns:
        {"cache_entry_bytes": bytes of one entry's embedding ``.npy`` in the default encoding, as on disk,
        "cache_entry_bytes_float16": the same in float16, "cache_encoding": the default encoding's name,
        "cache_logits_max_abs_diff": max |logits(default entry) - logits(float16 entry)| over frames, classes
        and low-res pixels, "cache_logits_max_abs": max |logits(float16 entry)| (the scale of the difference),
        "cache_embedding_max_abs_diff": max |decoded entry - float32 embedding|, "cache_sam_variant",
        "cache_frames"}.
    """
    torch.manual_seed(seed)
    model = SurgicalSAM(MEASURED_CLASSES, 2, MEASURED_FRAME_SIZE, sam_variant=sam_variant, with_image_encoder=True)
    model = model.to(device).eval()
    class_ids = torch.arange(1, MEASURED_CLASSES + 1, device=device)
    with tempfile.TemporaryDirectory() as folder:
        demo = make_demo_dataset(
            os.path.join(folder, "demo"),
            frame_size=MEASURED_FRAME_SIZE,
            train_sequences=1,
            val_sequences=1,
            frames_per_sequence=MEASURED_FRAMES,
            seed=seed,
        )
        items = load_datalist(demo, "validation")[:MEASURED_FRAMES]
        frames = torch.stack([torch.from_numpy(read_frame(item["image"])).permute(2, 0, 1) for item in items])
        embeddings = model.embed_frames(frames.float().to(device)).float().cpu().numpy()
        sizes, logit_diff, logit_scale, embedding_diff = {}, 0.0, 0.0, 0.0
        for embedding in embeddings:
            decoded = {}
            for encoding in (DEFAULT_EMBEDDING_ENCODING, FLOAT16):
                stored = encode_embedding(embedding, encoding)
                sizes[encoding] = _npy_bytes(folder, f"entry_{encoding}.npy", stored)
                decoded[encoding] = torch.from_numpy(decode_embedding(stored)).to(device)
            logits = {
                encoding: model.decode(value[None].expand(len(class_ids), -1, -1, -1), class_ids)[0]
                for encoding, value in decoded.items()
            }
            logit_diff = max(logit_diff, float((logits[DEFAULT_EMBEDDING_ENCODING] - logits[FLOAT16]).abs().max()))
            logit_scale = max(logit_scale, float(logits[FLOAT16].abs().max()))
            embedding_diff = max(
                embedding_diff, float(np.abs(decoded[DEFAULT_EMBEDDING_ENCODING].cpu().numpy() - embedding).max())
            )
    return {
        "cache_entry_bytes": sizes[DEFAULT_EMBEDDING_ENCODING],
        "cache_entry_bytes_float16": sizes[FLOAT16],
        "cache_encoding": DEFAULT_EMBEDDING_ENCODING,
        "cache_logits_max_abs_diff": logit_diff,
        "cache_logits_max_abs": logit_scale,
        "cache_embedding_max_abs_diff": embedding_diff,
        "cache_sam_variant": sam_variant,
        "cache_frames": len(embeddings),
    }
