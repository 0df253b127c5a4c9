"""The process settings the bundle runs under, applied by the bundle itself (not by environment variables).

Training and inference on CPU spend up to half their time in page faults when glibc's allocator hands
large temporaries (hundreds of MB: decoder activations, full-frame logits) back to the kernel after
every use and faults them in again at the next step. :func:`apply_process_settings` tells glibc, through
``mallopt``, to serve large blocks from its heap and to keep freed memory for the next step:

- ``M_MMAP_MAX = 0``: no block gets its own ``mmap`` (which ``free`` would ``munmap`` at once);
- ``M_TRIM_THRESHOLD`` large: the heap's free top is not returned to the kernel after each step;
- ``M_TOP_PAD``: the heap grows in steps of 64 MiB instead of page by page.

The memory freed inside a step is then reused by the next step, so the peak resident memory stays the
peak of one step. Every entry point users run calls it once: ``initialize`` of the train/inference/
evaluate configs, the ``surgical-sam`` command and the MONAI Label app. Where the C library is not glibc
(macOS, musl) nothing is changed and the returned settings say so.

The model card's "Speed and memory" section measures what each setting contributes. The module needs
nothing but the standard library until it is called (the MONAI Label app loads it by its file path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MALLOPT_SETTINGS", "apply_process_settings", "current_process_settings"]

# mallopt parameter numbers of glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

#: The allocator settings :func:`apply_process_settings` makes: (name, parameter number, value).
MALLOPT_SETTINGS = (
    ("M_MMAP_MAX", _M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 2**31 - 1),  # int's largest: never trim the heap's top
    ("M_TOP_PAD", _M_TOP_PAD, 64 * 2**20),
)

_applied: dict | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def apply_process_settings(allocator: bool = True) -> dict:
    """Apply the bundle's process settings once (later calls return the first call's record).

    Args:
        allocator: make the glibc ``mallopt`` settings of :data:`MALLOPT_SETTINGS`.

    Returns:
        dict ``allocator`` (the settings made, or why none were), ``torch_threads`` and
        ``torch_interop_threads`` (torch's defaults, one intra-op thread per physical core, are kept:
        the benchmark measured no gain from other counts on the build machine).
    """
    import torch

    global _applied
    if _applied is not None:
        return _applied
    record: dict = {"allocator": "unchanged (not asked for)"}
    if allocator:
        libc = _glibc()
        if libc is None:
            record["allocator"] = "unchanged (the C library is not glibc)"
        else:
            made = {}
            for name, parameter, value in MALLOPT_SETTINGS:
                if libc.mallopt(parameter, value) != 1:
                    raise RuntimeError(f"glibc refused mallopt({name}, {value}); report this with `ldd --version`")
                made[name] = value
            record["allocator"] = {"glibc": libc.gnu_get_libc_version().decode(), "mallopt": made}
    record["torch_threads"] = torch.get_num_threads()
    record["torch_interop_threads"] = torch.get_num_interop_threads()
    _applied = record
    return record


def current_process_settings() -> dict:
    """The record of :func:`apply_process_settings` if it ran in this process, else torch's thread counts."""
    import torch

    if _applied is not None:
        return _applied
    return {"allocator": "unchanged (apply_process_settings not called)", "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}
