"""How a cache entry stores its embedding: the bytes of one ``.npy`` file and the float32 embedding they give back.

Two encodings, each a plain ``.npy`` file that :func:`decode_embedding` tells apart by its dtype:

- ``"uint8"`` (the default for new caches): one structured record with ``codes`` (d, h, w) uint8 and, per
  channel, ``scale`` (d,) and ``offset`` (d,) float32; embedding = codes * scale + offset, with each channel's
  codes spanning its own minimum..maximum in 255 steps (error at most half a step: a 256x64x64 SAM embedding,
  whose channels span up to about 7, comes back within about 0.014; 1.05 MB per entry).
- ``"float16"``: the embedding (d, h, w) float16 (2.1 MB per 256x64x64 entry); every cache of bundles up to 0.7.

The manifest records the encoding of its entries (``embedding_encoding``; a manifest without it is a float16
cache), and precompute keeps extending a cache in the encoding it was made with.
"""

from __future__ import annotations

import numpy as np

#: The encoding precompute writes a new cache in.
DEFAULT_EMBEDDING_ENCODING = "uint8"
#: The encoding of a cache whose manifest names none (bundles up to 0.7).
FLOAT16 = "float16"
EMBEDDING_ENCODINGS = ("uint8", FLOAT16)
#: Steps of the uint8 codes between a channel's minimum and maximum.
CODE_STEPS = 255


def check_embedding_encoding(encoding: str) -> str:
    """``encoding`` when it is one of :data:`EMBEDDING_ENCODINGS`, else ValueError naming them."""
    if encoding not in EMBEDDING_ENCODINGS:
        raise ValueError(f"embedding_encoding must be one of {list(EMBEDDING_ENCODINGS)}, got {encoding!r}")
    return encoding


def manifest_encoding(manifest: dict) -> str:
    """The encoding of a cache's entries, as its manifest records it (float16 where it records none)."""
    return manifest.get("embedding_encoding", FLOAT16)


def stored_dtype(shape: tuple[int, ...], encoding: str) -> np.dtype:
    """The dtype of the ``.npy`` file of an embedding of ``shape`` (d, h, w) in ``encoding``: a structured dtype
    (one record) for uint8, float16 (of ``shape``) for float16."""
    if check_embedding_encoding(encoding) == FLOAT16:
        return np.dtype(np.float16)
    return np.dtype([("codes", np.uint8, shape), ("scale", np.float32, shape[:1]), ("offset", np.float32, shape[:1])])


def stored_shape(shape: tuple[int, ...], encoding: str) -> tuple[int, ...]:
    """The array shape of the ``.npy`` file of an embedding of ``shape``: ``shape`` for float16, () (one record)
    for uint8."""
    return tuple(shape) if check_embedding_encoding(encoding) == FLOAT16 else ()


def encode_embedding(embedding: np.ndarray, encoding: str) -> np.ndarray:
    """Embedding (d, h, w), any float dtype -> the array :func:`numpy.save` writes as the entry's ``.npy``."""
    if check_embedding_encoding(encoding) == FLOAT16:
        return embedding.astype(np.float16)
    values = embedding.astype(np.float32)
    low = values.min(axis=(1, 2))
    span = values.max(axis=(1, 2)) - low
    scale = np.where(span > 0, span / CODE_STEPS, 1.0).astype(np.float32)
    record = np.zeros((), dtype=stored_dtype(values.shape, encoding))
    record["codes"] = np.clip(np.rint((values - low[:, None, None]) / scale[:, None, None]), 0, CODE_STEPS)
    record["scale"], record["offset"] = scale, low
    return record


def decode_embedding(stored: np.ndarray) -> np.ndarray:
    """What :func:`encode_embedding` made (in either encoding) -> embedding (d, h, w) float32."""
    if stored.dtype.names is None:
        return stored.astype(np.float32)
    codes, scale, offset = stored["codes"], stored["scale"], stored["offset"]
    return codes.astype(np.float32) * scale[:, None, None] + offset[:, None, None]
