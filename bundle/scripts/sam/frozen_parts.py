"""SAM parts a method keeps frozen: what both methods' networks do with them, written once.

A network built on SAM (:class:`~scripts.surgical_sam.network.SurgicalSAM`,
:class:`~scripts.distillation_sam.network.DistillationSAM`) inherits :class:`FrozenSamParts` and names

- ``frozen_parts``: its SAM modules that never train: :meth:`FrozenSamParts.train` keeps them in eval mode
  (a part set to None, e.g. an image encoder the network was built without, is skipped);
- ``unsaved_prefixes``: the state-dict prefixes of the parts whose weights are the SAM checkpoint's: never
  saved with the model (:meth:`FrozenSamParts.state_dict`) and never loaded from a model file;
- ``network_name`` and ``mismatch_hint``: how a mismatch error names the network, and what a model file that does not fit most likely is, said after the mismatch.

:meth:`FrozenSamParts.load_state_dict` is strict about every other key, and checks before it loads anything:
``nn.Module.load_state_dict(strict=False)`` would copy the matching keys first and leave the network half
loaded when the check fails afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .checkpoint import state_dict_mismatch

__all__ = ["FrozenSamParts"]


class FrozenSamParts(nn.Module):
    """Train mode, saving and loading of a network with frozen SAM parts (see the module docstring)."""

    network_name: str = "SAM network"
    frozen_parts: tuple[str, ...] = ()
    unsaved_prefixes: tuple[str, ...] = ()
    mismatch_hint: str = ""

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name, None)
            if part is not None:
                part.eval()  # frozen: never in training mode
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k[len(prefix) :].startswith(self.unsaved_prefixes)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Load every part but the SAM checkpoint's; missing, unexpected or reshaped keys always raise, before
        anything is loaded (``strict`` is always on for those keys)."""
        details = state_dict_mismatch(state_dict, super().state_dict(), optional_prefixes=self.unsaved_prefixes)
        if details:
            raise RuntimeError(
                f"{self.network_name} checkpoint does not fit this network: {'; '.join(details)}. "
                f"{self.mismatch_hint}; nothing was loaded."
            )
        trained = {k: v for k, v in state_dict.items() if not k.startswith(self.unsaved_prefixes)}
        return super().load_state_dict(trained, strict=False, assign=assign)
