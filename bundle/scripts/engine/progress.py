"""A training run's progress in the log: one line per epoch with its mean loss and rate, instead of one per
iteration (the demo's 45 epochs printed 1,845 lines). TensorBoard keeps the per-iteration losses."""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochProgress"]

logger = logging.getLogger(__name__)


def _batch_size(batch) -> int:
    """Samples in a batch: the length of a decollated batch (a list of per-sample dicts, as MONAI's engines leave
    ``engine.state.batch`` after an iteration), else the first dimension of its first tensor (0 when it has none)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(item, dict) for item in batch):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


class EpochProgress:
    """At each epoch's end, log ``epoch E/N: loss L (mean of I iterations), S samples/s, T s``.

    Args:
        loss_key: the key of the loss in the trainer's output (MONAI's ``loss``).
    """

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.loss_sum, self.iterations, self.samples, self.started = 0.0, 0, 0, time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, dict) else output
        if isinstance(output, list) and output and isinstance(output[0], dict):  # decollated
            loss = output[0].get(self.loss_key)
        if loss is not None:
            self.loss_sum += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            self.iterations += 1
        self.samples += _batch_size(engine.state.batch)

    def _epoch(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self.started
        loss = self.loss_sum / self.iterations if self.iterations else math.nan
        rate = self.samples / seconds if seconds > 0 else math.nan
        logger.info(
            "epoch %d/%s: loss %.4f (mean of %d iterations), %.1f samples/s, %.1f s",
            engine.state.epoch,
            engine.state.max_epochs,
            loss,
            self.iterations,
            rate,
            seconds,
        )
