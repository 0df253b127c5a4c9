"""Timing and memory helpers of the measurements: wall time of a repeated call, peak resident memory."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Mean seconds per call of ``fn`` over ``repeats`` calls (the caller warms up first); last result."""
    sync(device)
    start = time.perf_counter()
    result = None
    for _ in range(repeats):
        result = fn()
    sync(device)
    return (time.perf_counter() - start) / repeats, result
