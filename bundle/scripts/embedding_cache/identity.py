"""What a cache's embeddings depend on (its identity), and what one entry of it takes on disk.

An embedding depends on the encoder (SAM variant and the md5 of its weights), SAM's input (size, pixel
normalisation) and the stored dtype of the taps; a tap cache (Distillation-SAM) also on the tapped ViT blocks. The
embedding cache (:mod:`scripts.embedding_cache`) is reused only under an identity equal to the run's.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from ..errors import BundleError
from ..sam.backbone import get_variant, sam_weights_not_found
from ..sam.checkpoint import memoised_md5
from ..sam.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .encoding import DEFAULT_EMBEDDING_ENCODING, stored_dtype, stored_shape

CACHE_FORMAT_VERSION = 2


class StaleCacheError(BundleError, RuntimeError):
    """The cache on disk was made for other inputs than this run's, or is incomplete."""


def checkpoint_fingerprint(path: str | None, sam_variant: str = "vit_h") -> str:
    """md5 of the SAM checkpoint (:func:`~scripts.sam.checkpoint.memoised_md5`), "random-init" for none.

    Raises:
        FileNotFoundError: no file at ``path``; the message says how to get the weights of ``sam_variant``.
    """
    if path is None:
        return "random-init"
    if not os.path.isfile(path):
        raise FileNotFoundError(sam_weights_not_found(sam_variant, path))
    return memoised_md5(path)


def cache_identity(sam_variant: str, sam_checkpoint: str | None, taps: Sequence[int] | None = None) -> dict:
    """What an embedding depends on; a cache is reused only when this matches exactly.

    ``taps`` (1-based ViT blocks, Distillation-SAM) makes it a tap cache's identity: the blocks, in
    order, and the tokens' width are part of it, so a cache of other taps is refused.
    """
    spec = get_variant(sam_variant)
    identity = {
        "format_version": CACHE_FORMAT_VERSION,
        "sam_variant": sam_variant,
        "sam_checkpoint_md5": checkpoint_fingerprint(sam_checkpoint, sam_variant),
        "image_size": spec.image_size,
        "grid_size": [spec.grid_size, spec.grid_size],
        "embed_dim": spec.prompt_embed_dim,
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
        "dtype": "float16",
    }
    if taps is not None:
        blocks = [int(k) for k in taps]
        if not blocks or any(not 1 <= k <= spec.encoder_depth for k in blocks):
            raise ValueError(
                f"taps must be 1-based blocks in 1..{spec.encoder_depth} for {sam_variant}, got {list(taps)}"
            )
        identity.update({"taps": blocks, "tap_dim": spec.encoder_embed_dim, "contents": "embedding+taps+frame"})
    return identity


def entry_arrays(identity: dict, encoding: str = DEFAULT_EMBEDDING_ENCODING) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of the arrays of the ``.npy`` files of one entry written now: the embedding (d, h, w) in
    ``encoding`` (:mod:`.encoding`; uint8 entries of 0.8.0, one scale per channel, are 2 * 4 * d * (tiles - 1)
    bytes smaller), and the taps (n_taps, h, w, C_vit) of a tap cache (of the identity's ``dtype``)."""
    grid_h, grid_w = identity["grid_size"]
    embedding = (identity["embed_dim"], grid_h, grid_w)
    arrays = [(stored_shape(embedding, encoding), stored_dtype(embedding, encoding))]
    if "taps" in identity:
        arrays.append(((len(identity["taps"]), grid_h, grid_w, identity["tap_dim"]), np.dtype(identity["dtype"])))
    return arrays


def entry_bytes(identity: dict, encoding: str = DEFAULT_EMBEDDING_ENCODING) -> int:
    """Bytes of the arrays of one cache entry (embedding in ``encoding``, and the taps of a tap cache), without the
    small ``.npy`` headers and the PNGs."""
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in entry_arrays(identity, encoding))


def entry_npy_bytes(identity: dict, encoding: str = DEFAULT_EMBEDDING_ENCODING) -> int:
    """Bytes of the ``.npy`` files of one entry as written: :func:`entry_bytes` and each file's header."""
    total = 0
    for shape, dtype in entry_arrays(identity, encoding):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        total += header.tell() + int(np.prod(shape)) * dtype.itemsize
    return total
