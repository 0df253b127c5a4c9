"""Writing a file atomically: the bundle's one way.

Every file that a reader may open while it is being made, or that a killed run may leave half written (a
checkpoint, dataset.json, a cache entry, a video, a zip), is written under a temporary name beside its
final one and moved into place with ``os.replace`` (atomic on one file system: the file is either the old
or the new one). The temporary name is ``<path>.tmp``, or ``<path>.tmp<suffix>`` (``x.png.tmp.png``) for a
writer that picks the format from the suffix (PIL, PyAV, ``np.save``). When writing fails, the temporary
file is removed and the error raised.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "TEMPORARY_SUFFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "keep_aside",
    "temporary_path",
]

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: str | os.PathLike, keep_suffix: bool = False) -> str:
    """Where :func:`atomic_write` writes ``path`` before moving it into place."""
    path = os.fspath(path)
    return path + TEMPORARY_SUFFIX + (os.path.splitext(path)[1] if keep_suffix else "")


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], Any], keep_suffix: bool = False, make_dirs: bool = True
) -> str:
    """Call ``write(temporary)`` to make the file, then move it to ``path``; returns ``path``.

    Args:
        path: the final file.
        write: writes the whole file at the path it is given (e.g. ``lambda p: torch.save(state, p)``).
        keep_suffix: end the temporary name with ``path``'s suffix, for writers that choose the format by it.
        make_dirs: create ``path``'s folder first.
    """
    path = os.fspath(path)
    if make_dirs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path, keep_suffix)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, content: Any, indent: int | None = 2, newline: bool = True) -> str:
    """Write ``content`` as JSON to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(content, indent=indent) + ("\n" if newline else ""))


def keep_aside(path: str | os.PathLike) -> str:
    """Move the file ``path`` to a new name beside it, ``<name>.kept-<date>-<time>[-N]<suffix>``; returns the new path.

    For a command about to write a file where one it did not write already is: the old file is kept, never
    replaced (the suffix stays, so a kept ``model.pt`` still loads as one).
    """
    path = os.fspath(path)
    stem, suffix = os.path.splitext(path)
    base = f"{stem}.kept-{time.strftime('%Y%m%d-%H%M%S')}"
    target, number = base + suffix, 1
    while os.path.lexists(target):
        target, number = f"{base}-{number}{suffix}", number + 1
    os.rename(path, target)
    return target
