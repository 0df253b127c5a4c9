"""Reading a checkpoint and comparing its state dict with a module's, for loaders that refuse a file that
does not fit.

Shared by :meth:`~scripts.distillation_sam.pvt.PyramidVisionTransformer.load_pretrained`,
:func:`~scripts.sam.backbone.load_sam_checkpoint`, :func:`~scripts.sam.prompting.load_sam_mask_decoder`,
the two networks' ``load_state_dict`` and the original-checkpoint conversion, so they read a file, check its
md5 and describe a mismatch alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import torch


def file_md5(path: str, chunk_size: int = 1 << 22) -> str:
    """md5 (hex) of a file, read in chunks of ``chunk_size`` bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def memoised_md5(path: str) -> str:
    """md5 of a (large) file, memoised beside it in ``<path>.md5`` keyed by size and mtime.

    The 2.4 GB vit_h checkpoint is read once; later calls (the md5 check of every ``build_sam``, the
    embedding cache's identity) read the memo. A memo whose size or mtime no longer matches is recomputed;
    a read-only folder just means the md5 is computed again next time.
    """
    stat = os.stat(path)
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    memo = f"{path}.md5"
    try:
        with open(memo) as handle:
            stored_key, stored_md5 = handle.read().split()
        if stored_key == key:
            return stored_md5
    except (OSError, ValueError):
        pass
    digest = file_md5(path)
    try:
        with open(memo, "w") as handle:
            handle.write(f"{key} {digest}\n")
    except OSError:
        pass  # read-only folder: compute again next time
    return digest


def describe_load_failure(cause: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in the bundle's words.

    torch's own message for a file its weights-only unpickler refuses advises re-running with
    ``weights_only=False``: wrong advice for a file that is no checkpoint at all (random bytes, a text file)
    and unsafe advice for one from elsewhere. Only the unpickler's finding is kept.
    """
    text = str(cause)
    if "Weights only load failed" in text and "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        detail = detail.split(" Check the documentation", 1)[0].split(" Please use `torch.serialization", 1)[0]
        if detail.startswith("Unsupported global"):
            return (
                f"it holds Python objects other than tensors ({detail.rstrip('.')}); the bundle reads weights "
                "only: save the state dict alone, torch.save(model.state_dict(), path)"
            )
        return f"it is not a PyTorch weights file, or it is damaged (the unpickler found: {detail.rstrip('.')})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is not a PyTorch weights file, or it is damaged ({type(cause).__name__}: {first})"


def read_checkpoint_dict(
    path: str, what: str, error: type[Exception] = ValueError, hint: str = "", expected: str = "a dict"
) -> dict:
    """``torch.load`` (weights only, on CPU) a file that must hold a dict.

    Raises ``error`` naming ``what`` and ``path`` (and appending ``hint``) when the file cannot be read or
    holds something else; the caller checks beforehand that the file exists (its message says what to get).
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as cause:  # torch raises several types for a truncated or foreign file
        raise error(f"{what} {path} could not be read: {describe_load_failure(cause)}{hint}") from cause
    if not isinstance(content, Mapping):
        raise error(f"{what} {path} holds a {type(content).__name__}, not {expected}{hint}")
    return content


def state_dict_mismatch(
    state_dict: Mapping, expected: Mapping, expected_as: str = "here", optional_prefixes: Sequence[str] = ()
) -> list[str]:
    """What keeps ``state_dict`` (from a file) from loading strictly into a module with ``expected``.

    Args:
        state_dict: the file's state dict.
        expected: the module's ``state_dict()``.
        expected_as: how the message names the expected shape, e.g. "here" or "for vit_b".
        optional_prefixes: keys under these prefixes may be missing or extra (e.g. a frozen encoder that
            the file need not hold); where both have such a key its shape is still compared.

    Returns:
        one phrase per kind of problem, e.g. "2 missing keys (e.g. [...])", "1 unexpected keys (e.g.
        [...])", "3 keys of another shape (e.g. k: (1, 2) in the file, (2, 2) here)"; [] when it fits.
    """
    optional = tuple(optional_prefixes)
    missing = sorted(k for k in set(expected) - set(state_dict) if not (optional and k.startswith(optional)))
    unexpected = sorted(k for k in set(state_dict) - set(expected) if not (optional and k.startswith(optional)))
    wrong_shape = sorted(
        k
        for k in set(expected) & set(state_dict)
        if tuple(getattr(state_dict[k], "shape", ())) != tuple(expected[k].shape)
    )
    details = []
    if missing:
        details.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if wrong_shape:
        k = wrong_shape[0]
        details.append(
            f"{len(wrong_shape)} keys of another shape (e.g. {k}: "
            f"{tuple(getattr(state_dict[k], 'shape', ()))} in the file, {tuple(expected[k].shape)} "
            f"{expected_as})"
        )
    return details
