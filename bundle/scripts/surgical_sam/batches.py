"""SurgicalSAM's training batches: (frame, class) samples to the network's inputs, and the micro-batched
training step (gradients accumulated over parts of a batch, equal to the whole batch's)."""

from __future__ import annotations

import torch
from monai.engines.utils import PrepareBatch


# ------------------------------------------------------------------------------------ batch preparation
class PromptedSampleBatch(PrepareBatch):
    """Training batch of (frame, class) samples -> (embeddings, targets, (), {"class_ids": ...}).

    ``targets`` is a dict with ``mask`` (B, 1, H, W) float32, ``grid_mask`` (B, h, w) bool and ``class_id``
    (B,), what ``scripts.surgical_sam.loss.SurgicalSAMLoss`` takes beside the network's output; the embeddings are
    float32. The cache's items come compact (float16 embeddings, boolean masks: ``prompt_sample``) and are
    widened here, once, after the move to the device (a no-op for items already float32).
    """

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        def to(tensor):
            return tensor.to(device=device, non_blocking=non_blocking, **kwargs)

        targets = {key: to(batchdata[key]) for key in ("mask", "grid_mask", "class_id")}
        targets["mask"] = targets["mask"].float()
        return to(batchdata["image_embeddings"]).float(), targets, (), {"class_ids": targets["class_id"]}


# ---------------------------------------------------------------------------------- the training step
def _batch_slice(value, part: slice, batch: int):
    """``value`` with its batch axis sliced: tensors of ``batch`` rows, and dicts / tuples of them."""
    if isinstance(value, torch.Tensor):
        return value[part] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _batch_slice(item, part, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_slice(item, part, batch) for item in value)
    return value


def micro_batched_backward(
    network,
    loss_function,
    inputs: torch.Tensor,
    targets: dict,
    forward_kwargs: dict,
    micro_batch_size: int | None,
    forward=None,
    backward=None,
) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one SurgicalSAM training batch, in slices of ``micro_batch_size`` samples.

    The gradients are those of ``loss_function(network(inputs), targets)`` on the whole batch: the loss
    is a sum over samples divided by counts of the whole batch (``SurgicalSAMLoss.sample_terms``) plus
    the prototype contrastive term, which compares the batch's samples with each other and is added
    once, to the last slice, from the whole batch's class embeddings. So only one slice's activations
    are alive at a time: the batch-32 step at 1024x1280 keeps about a quarter of the memory with
    slices of 8 (bundle/docs/performance.md, "What makes it faster", item 5). The image embeddings enter the prototype term
    detached: they are the frozen encoder's (or the cache's), nothing trainable is upstream.

    Args:
        network: called as ``forward(inputs_slice, network, **forward_kwargs_slice)``.
        loss_function: a ``scripts.surgical_sam.loss.SurgicalSAMLoss``.
        inputs: (B, ...) the batch's inputs (image embeddings or frames).
        targets: the loss's targets, each (B, ...).
        forward_kwargs: the network's keyword arguments (``class_ids`` (B,)).
        micro_batch_size: samples per slice; None (or >= B) runs the batch in one piece.
        forward: ``(inputs, network, **kwargs) -> pred``; default ``network(inputs, **kwargs)``
            (the trainer passes its inferer).
        backward: ``loss -> None``; default ``loss.backward()`` (the trainer passes its GradScaler's).

    Returns:
        the batch's loss (a detached scalar) and its predictions (detached; the slices' concatenated,
        ``prototypes`` the last slice's).
    """
    if not hasattr(loss_function, "sample_terms"):
        raise TypeError(
            f"micro_batch_size needs a loss that splits over samples (scripts.surgical_sam.loss.SurgicalSAMLoss), "
            f"got {type(loss_function).__name__}; set micro_batch_size: null for this loss"
        )
    forward = forward or (lambda data, net, **kwargs: net(data, **kwargs))
    backward = backward or (lambda loss: loss.backward())
    batch = int(inputs.shape[0])
    size = batch if not micro_batch_size or micro_batch_size >= batch else int(micro_batch_size)
    if size < 1:
        raise ValueError(f"micro_batch_size must be a positive number of samples or null, got {micro_batch_size}")
    counts = loss_function.sample_counts(targets["mask"])
    parts = [slice(start, min(start + size, batch)) for start in range(0, batch, size)]
    total, outputs, embeddings = None, [], []
    for number, part in enumerate(parts):
        pred = forward(inputs[part], network, **_batch_slice(forward_kwargs, part, batch))
        loss = loss_function.sample_terms(pred, _batch_slice(targets, part, batch), counts)
        embeddings.append(pred["image_embeddings"].detach())
        if number == len(parts) - 1:
            loss = loss + loss_function.prototype_term(pred["prototypes"], torch.cat(embeddings), targets)
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        outputs.append({key: value.detach() for key, value in pred.items()})
    # every output is per sample except the prototypes (C, d), the same in every slice
    merged = {
        key: outputs[-1][key] if key == "prototypes" else torch.cat([out[key] for out in outputs]) for key in outputs[0]
    }
    return total, merged


class MicroBatchIteration:
    """``SupervisedTrainer(iteration_update=...)``: MONAI's training iteration with the batch's forward
    and backward run by :func:`micro_batched_backward` in slices of ``micro_batch_size`` samples.

    The rest is the trainer's own iteration: ``prepare_batch``, ``inferer`` (AMP autocast), the events
    (``FORWARD_COMPLETED`` and ``LOSS_COMPLETED`` once the whole batch is through,
    ``BACKWARD_COMPLETED`` before the optimizer step, so gradient clipping sees the batch's gradients),
    a GradScaler when the trainer has one, ``engine.state.output`` with the batch's loss and predictions.
    One optimizer step per batch: the trainer's ``accumulation_steps`` must stay 1.
    """

    def __init__(self, micro_batch_size: int | None) -> None:
        if micro_batch_size is not None and int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be a positive number of samples or null, got {micro_batch_size}")
        self.micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)

    def __call__(self, engine, batchdata) -> dict:
        from monai.engines.utils import IterationEvents
        from monai.utils.enums import CommonKeys as Keys

        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("micro_batch_size splits each batch already; set the trainer's accumulation_steps to 1")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        if args:
            raise ValueError("micro-batched training passes the network keyword arguments only (class_ids)")
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None

        def forward(data, network, **forward_kwargs):
            with torch.autocast("cuda", enabled=scaler is not None, **(engine.amp_kwargs if scaler else {})):
                return engine.inferer(data, network, **forward_kwargs)

        loss, pred = micro_batched_backward(
            engine.network,
            engine.loss_function,
            inputs,
            targets,
            kwargs,
            self.micro_batch_size,
            forward=forward,
            backward=(lambda part: scaler.scale(part).backward()) if scaler else None,
        )
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
