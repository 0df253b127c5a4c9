"""Mixed precision for the engines: bf16 autocast (the ``amp`` option) and an inferer that runs under it."""

from __future__ import annotations

import torch
from monai.inferers import Inferer


def autocast(device_type: str, enabled: bool):
    """Mixed precision of the ``amp`` option: bf16 autocast on CPU and CUDA (bf16 needs no GradScaler)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bool(enabled))


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


class AutocastInferer(Inferer):
    """Call the network, under bf16 autocast when ``amp`` is on; floating outputs come back as float32
    (so the loss runs in float32). ``amp=False``: MONAI's ``SimpleInferer``, unchanged numbers."""

    def __init__(self, amp: bool = False) -> None:
        self.amp = bool(amp)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        with autocast(inputs.device.type, self.amp):
            output = network(inputs, *args, **kwargs)
        return _to_float32(output) if self.amp else output
