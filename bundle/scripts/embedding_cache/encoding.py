"""How a cache entry stores its embedding: the bytes of one ``.npy`` file and the float32 embedding they give back.

Two encodings, each a plain ``.npy`` file that :func:`decode_embedding` tells apart by its dtype:

- ``"uint8"`` (the default for new caches): one structured record with ``codes`` (d, h, w) uint8 and, per
  channel and tile of a :data:`TILE_GRID` grid over (h, w), ``scale`` (d, rows, cols) and ``offset``
  (d, rows, cols) float32; embedding = codes * scale + offset of the element's tile, with the codes of each
  channel's tile spanning the tile's own minimum..maximum in 255 steps (error at most half of the tile's step).
  For a 256x64x64 SAM embedding: 1,081,536 bytes per entry, and SurgicalSAM's decoder logits within 0.0070 of
  those from the float16 entry (``scripts/measurement/cache_size.py``). Records with ``scale`` and ``offset``
  (d,), one per channel (bundle 0.8.0), decode as codes * scale + offset of the channel: a cache of them keeps
  loading, and precompute extends it with entries of tiles (each entry describes itself).
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
#: Steps of the uint8 codes between the minimum and maximum of a channel's tile.
CODE_STEPS = 255
#: (rows, cols) of the tiles of each channel that have their own uint8 scale and offset (fewer where the
#: embedding has fewer rows or columns: :func:`tile_grid`).
TILE_GRID = (4, 4)


def check_embedding_encoding(encoding: str) -> str:
    """``encoding`` when it is one of :data:`EMBEDDING_ENCODINGS`, else ValueError naming them."""
    if encoding not in EMBEDDING_ENCODINGS:
        raise ValueError(f"embedding_encoding must be one of {list(EMBEDDING_ENCODINGS)}, got {encoding!r}")
    return encoding


def manifest_encoding(manifest: dict) -> str:
    """The encoding of a cache's entries, as its manifest records it (float16 where it records none)."""
    return manifest.get("embedding_encoding", FLOAT16)


def tile_bounds(size: int, tiles: int) -> np.ndarray:
    """Edges (tiles + 1,) int of ``tiles`` spans that split 0..``size`` as evenly as possible (edge i at i * size /
    tiles, rounded half up); every span holds at least one element when ``tiles`` <= ``size``."""
    return (np.arange(tiles + 1) * size + tiles // 2) // tiles


def tile_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the uint8 scale/offset grid of an embedding of ``shape`` (d, h, w): :data:`TILE_GRID`, with
    no more rows than h and no more columns than w."""
    return min(TILE_GRID[0], shape[1]), min(TILE_GRID[1], shape[2])


def stored_dtype(shape: tuple[int, ...], encoding: str) -> np.dtype:
    """The dtype of the ``.npy`` file that :func:`encode_embedding` writes for an embedding of ``shape`` (d, h, w)
    in ``encoding``: a structured dtype (one record: codes (d, h, w) uint8, scale and offset (d, rows, cols)
    float32, :func:`tile_grid`) for uint8, float16 (of ``shape``) for float16. Entries of 0.8.0 (scale and offset
    (d,)) have another record dtype, which :func:`decode_embedding` reads too."""
    if check_embedding_encoding(encoding) == FLOAT16:
        return np.dtype(np.float16)
    grid = (shape[0], *tile_grid(shape))
    return np.dtype([("codes", np.uint8, shape), ("scale", np.float32, grid), ("offset", np.float32, grid)])


def stored_shape(shape: tuple[int, ...], encoding: str) -> tuple[int, ...]:
    """The array shape of the ``.npy`` file of an embedding of ``shape``: ``shape`` for float16, () (one record)
    for uint8."""
    return tuple(shape) if check_embedding_encoding(encoding) == FLOAT16 else ()


def _tiles(shape: tuple[int, ...], grid: tuple[int, int]) -> list[tuple[int, int, slice, slice]]:
    """(row, col, rows slice, cols slice) of each tile of ``grid`` over an embedding of ``shape`` (d, h, w)."""
    row_edges, col_edges = tile_bounds(shape[1], grid[0]), tile_bounds(shape[2], grid[1])
    return [
        (row, col, slice(row_edges[row], row_edges[row + 1]), slice(col_edges[col], col_edges[col + 1]))
        for row in range(grid[0])
        for col in range(grid[1])
    ]


def encode_embedding(embedding: np.ndarray, encoding: str) -> np.ndarray:
    """Embedding (d, h, w), any float dtype -> the array :func:`numpy.save` writes as the entry's ``.npy``."""
    if check_embedding_encoding(encoding) == FLOAT16:
        return embedding.astype(np.float16)
    values = embedding.astype(np.float32)
    record = np.zeros((), dtype=stored_dtype(values.shape, encoding))
    codes, scale, offset = record["codes"], record["scale"], record["offset"]
    for row, col, rows, cols in _tiles(values.shape, scale.shape[1:]):
        tile = values[:, rows, cols]
        low = tile.min(axis=(1, 2))
        span = tile.max(axis=(1, 2)) - low
        step = np.where(span > 0, span / CODE_STEPS, 1.0).astype(np.float32)
        codes[:, rows, cols] = np.clip(np.rint((tile - low[:, None, None]) / step[:, None, None]), 0, CODE_STEPS)
        scale[:, row, col], offset[:, row, col] = step, low
    return record


def _per_element(stored: np.ndarray, name: str) -> np.ndarray:
    """A uint8 record's ``scale`` or ``offset`` (d, rows, cols), or (d,) as 0.8.0 wrote it, spread over its tiles
    -> (d, h, w) float32."""
    values, shape = stored[name], stored["codes"].shape
    grid = values.reshape(shape[0], 1, 1) if values.ndim == 1 else values
    row_edges, col_edges = tile_bounds(shape[1], grid.shape[1]), tile_bounds(shape[2], grid.shape[2])
    return np.repeat(np.repeat(grid, np.diff(row_edges), axis=1), np.diff(col_edges), axis=2)


def code_step(stored: np.ndarray) -> np.ndarray:
    """The step between neighbouring codes of each element of a uint8 record (its tile's scale) -> (d, h, w)
    float32; the decoded embedding is within half of it of the encoded one."""
    return _per_element(stored, "scale")


def decode_embedding(stored: np.ndarray) -> np.ndarray:
    """What :func:`encode_embedding` made (in either encoding, and the uint8 records of 0.8.0 with one scale and
    offset (d,) per channel) -> embedding (d, h, w) float32."""
    if stored.dtype.names is None:
        return stored.astype(np.float32)
    return stored["codes"].astype(np.float32) * code_step(stored) + _per_element(stored, "offset")
