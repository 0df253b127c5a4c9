"""The embedding cache: SAM image embeddings computed once per (frame, augmentation version).

SurgicalSAM trains with the image encoder frozen, so its embeddings are computed once by the
``precompute`` workflow and read back by training and validation. Layout under ``cache_dir``::

    manifest.json                                identity (encoder, checkpoint md5, input size, ...), encoding
    index/<split>_v<NN>.json                     one entry per frame: files, classes present, sources
    entries/v<NN>/<sequence>/<frame>.npy         the (d, h, w) embedding: uint8 codes with a scale and offset
                                                 per channel and tile (the default), or float16 (:mod:`.encoding`)
    entries/v<NN>/<sequence>/<frame>_label.png   the label map after the version's augmentation

Entry files are keyed by (version, sequence/frame) only, not by split: a frame listed in several splits
(the four EndoVis2017 folds list every sequence in three training splits and one validation split) is
encoded once, and precomputing a new split reuses every entry already there. Indexes stay per split.
The training splits (``augmented_splits``) get versions 0..K, the others version 0. Format 1 (entries
under ``<split>/v<NN>/``) is not read: such a cache raises :class:`StaleCacheError` asking for a rebuild.

A *tap cache* (Distillation-SAM, ``taps=`` given) is the same cache with two more files per entry,
and the tap blocks in its identity::

    entries/v<NN>/<sequence>/<frame>_taps.npy   float16 (n_taps, h, w, C_vit) encoder tokens after the tap blocks
    entries/v<NN>/<sequence>/<frame>_frame.png  the frame after the version's augmentation (uint8 RGB; the
                                                adapter's PVT still runs on it)

Before anything is written, precompute states the disk use (bytes per entry x frames x versions: the
encoder's arrays and the PNGs as written) and refuses when it does not fit in the free space of the cache's
disk (:class:`CacheSpaceError`). A cache is used only when its identity (:mod:`.identity`) equals the
one the run expects and no source frame or label map changed since; otherwise :class:`StaleCacheError`
says what differs and the command that rebuilds it. Entries record their sources by path under the dataset
and by content (:mod:`.sources`): a moved or copied dataset keeps its cache, and precompute re-encodes
exactly the entries of files whose bytes changed, naming each. A folder that holds no entry yet (a
precompute that stopped before encoding anything) is bound to no identity. Precompute writes every file
atomically and skips what is already there, so a killed run resumes. Reading: :mod:`.store`.
"""

from .disk_use import CacheSpaceError, check_disk_space
from .encoding import DEFAULT_EMBEDDING_ENCODING, EMBEDDING_ENCODINGS, decode_embedding, encode_embedding
from .identity import CACHE_FORMAT_VERSION, StaleCacheError, cache_identity, checkpoint_fingerprint, entry_bytes
from .precompute import precompute_embeddings
from .store import MANIFEST_NAME, PRECOMPUTE_COMMAND, EmbeddingCache, cache_problems, entry_paths

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_EMBEDDING_ENCODING",
    "EMBEDDING_ENCODINGS",
    "MANIFEST_NAME",
    "PRECOMPUTE_COMMAND",
    "CacheSpaceError",
    "EmbeddingCache",
    "StaleCacheError",
    "cache_identity",
    "cache_problems",
    "check_disk_space",
    "checkpoint_fingerprint",
    "decode_embedding",
    "encode_embedding",
    "entry_bytes",
    "entry_paths",
    "precompute_embeddings",
]
