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

OpenMP (torch's CPU threads, GNU libgomp) makes a thread that waits for work at the end of a parallel
region spin for a while (``GOMP_SPINCOUNT`` 300000) before it sleeps. On cores shared with other
processes a spinning thread takes the core its partner needs to finish, and every small operation
waits for a scheduler time slice: a demo training epoch took 7-12x as long under that (measured on the build machines). With
``OMP_WAIT_POLICY=PASSIVE`` (:data:`OPENMP_ENVIRONMENT`) a waiting thread sleeps at once; the numbers
computed are the same. OpenMP reads the variable once, when it is loaded with torch, so
:func:`set_openmp_environment` must run before ``import torch``: the ``surgical-sam`` command does that
first. Under ``python -m monai.bundle run`` torch is loaded before any config line runs; there the
variable only reaches the processes started afterwards, and the record says that it is not in force in
the process itself (start with ``OMP_WAIT_POLICY=PASSIVE python -m monai.bundle run ...``). A value the
user set is kept.

bundle/docs/performance.md ("What makes it faster", item 1) says what each setting does. The module needs
nothing but the standard library until it is called (the MONAI Label app loads it by its file path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = [
    "MALLOPT_SETTINGS",
    "OPENMP_ENVIRONMENT",
    "apply_process_settings",
    "current_process_settings",
    "set_openmp_environment",
]

# mallopt parameter numbers of glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

#: The allocator settings :func:`apply_process_settings` makes: (name, parameter number, value).
MALLOPT_SETTINGS = (
    ("M_MMAP_MAX", _M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 2**31 - 1),  # int's largest: never trim the heap's top
    ("M_TOP_PAD", _M_TOP_PAD, 64 * 2**20),
)

#: Environment variables for OpenMP that :func:`set_openmp_environment` sets where the user has not: (name, value).
OPENMP_ENVIRONMENT = (("OMP_WAIT_POLICY", "PASSIVE"),)

_applied: dict | None = None
_openmp: dict | None = None


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime (torch's libgomp, or LLVM's/Intel's) is loaded in this process."""
    try:
        with open("/proc/self/maps") as handle:
            maps = handle.read()
    except OSError:  # not Linux: torch brings the runtime
        return "torch" in sys.modules
    return any(name in maps for name in ("libgomp", "libomp", "libiomp"))


def set_openmp_environment() -> dict:
    """Set :data:`OPENMP_ENVIRONMENT` in ``os.environ`` where the user has not set the variable (once).

    Effective in this process only when called before OpenMP is loaded (before ``import torch``); the
    processes this one starts afterwards (benchmark workers, MONAI Label tasks, spawned loader workers)
    inherit the variable either way.

    Returns:
        {name: {"value": the value now in the environment, "set_by": "bundle" or "environment" (the user's
        or a parent process's), "in_force_here": whether this process's OpenMP was loaded with that value}}.
    """
    global _openmp
    if _openmp is not None:
        return _openmp
    loaded = _openmp_loaded()
    record = {}
    for name, value in OPENMP_ENVIRONMENT:
        set_by = "environment" if name in os.environ else "bundle"
        os.environ.setdefault(name, value)
        record[name] = {
            "value": os.environ[name],
            "set_by": set_by,
            # a value found was there when OpenMP loaded; the bundle's only if it came first
            "in_force_here": set_by == "environment" or not loaded,
        }
        if not record[name]["in_force_here"]:
            logging.getLogger(__name__).info(
                "%s=%s reaches only the processes started from here: OpenMP was loaded before it was set (start "
                "with %s=%s python -m monai.bundle run ... to have it in this process too)",
                name,
                value,
                name,
                value,
            )
    _openmp = record
    return record


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
        dict ``allocator`` (the settings made, or why none were), ``openmp`` (the record of
        :func:`set_openmp_environment`, called here if it was not before), ``torch_threads`` and
        ``torch_interop_threads`` (torch's defaults, one intra-op thread per physical core, are kept:
        the benchmark measured no gain from other counts on the build machine).
    """
    openmp = set_openmp_environment()
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
    record["openmp"] = openmp
    record["torch_threads"] = torch.get_num_threads()
    record["torch_interop_threads"] = torch.get_num_interop_threads()
    _applied = record
    return record


def current_process_settings() -> dict:
    """The record of :func:`apply_process_settings` if it ran in this process, else torch's thread counts and
    the OpenMP variables of :data:`OPENMP_ENVIRONMENT` as the environment holds them (None: not set)."""
    import torch

    if _applied is not None:
        return _applied
    openmp = _openmp or {
        name: {
            "value": os.environ.get(name),
            "set_by": "environment" if name in os.environ else None,
            "in_force_here": name in os.environ,
        }
        for name, _ in OPENMP_ENVIRONMENT
    }
    return {
        "allocator": "unchanged (apply_process_settings not called)",
        "openmp": openmp,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
