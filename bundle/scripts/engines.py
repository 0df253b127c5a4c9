"""Glue between the bundle's parts and MONAI's engines: batch preparation, handlers, input checks.

Everything here is referenced from the YAML configs; the engines themselves are MONAI's
``SupervisedTrainer`` / ``SupervisedEvaluator``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import zipfile

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from monai.handlers import CheckpointLoader, CheckpointSaver

from .data.layout import raise_input_problems
from .metrics import FRAME_STATS_FILE, SCALAR_METRIC_KEYS, format_metrics_table
from .networks.sam_backbone import missing_sam_weights

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ batch preparation
class PromptedSampleBatch(PrepareBatch):
    """Training batch of (frame, class) samples -> (embeddings, targets, (), {"class_ids": ...}).

    ``targets`` is a dict with ``mask`` (B, 1, H, W) float32, ``grid_mask`` (B, h, w) bool and ``class_id``
    (B,), what ``scripts.losses.SurgicalSAMLoss`` takes beside the network's output; the embeddings are
    float32. The cache's items come compact (float16 embeddings, boolean masks: ``prompt_sample``) and are
    widened here, once, after the move to the device (a no-op for items already float32).
    """

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        def to(tensor):
            return tensor.to(device=device, non_blocking=non_blocking, **kwargs)

        targets = {key: to(batchdata[key]) for key in ("mask", "grid_mask", "class_id")}
        targets["mask"] = targets["mask"].float()
        return to(batchdata["image_embeddings"]).float(), targets, (), {"class_ids": targets["class_id"]}


class FrameBatch(PrepareBatch):
    """Validation batch of whole frames -> (inputs, label, (), {"gt_label": label}).

    The ground truth goes to the inferer, which uses it only under the ``oracle`` protocol.
    ``label_lut`` (256 entries) maps the dataset's label values to the model's (cross-dataset
    evaluation, see ``scripts.class_mapping``); None leaves them as they are.
    """

    def __init__(self, image_key: str = "image_embeddings", label_key: str = "label",
                 label_lut: list[int] | None = None) -> None:
        self.image_key, self.label_key, self.label_lut = image_key, label_key, label_lut
        if label_lut is not None and len(label_lut) != 256:
            raise ValueError(f"label_lut must have 256 entries (one per uint8 label value), got {len(label_lut)}")

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        inputs = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        if self.label_lut is not None:
            from .class_mapping import remap_labels

            label = remap_labels(label, self.label_lut)
        return inputs, label, (), {"gt_label": label}


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


def micro_batched_backward(network, loss_function, inputs: torch.Tensor, targets: dict, forward_kwargs: dict,
                           micro_batch_size: int | None, forward=None, backward=None) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one SurgicalSAM training batch, in slices of ``micro_batch_size`` samples.

    The gradients are those of ``loss_function(network(inputs), targets)`` on the whole batch: the loss
    is a sum over samples divided by counts of the whole batch (``SurgicalSAMLoss.sample_terms``) plus
    the prototype contrastive term, which compares the batch's samples with each other and is added
    once, to the last slice, from the whole batch's class embeddings. So only one slice's activations
    are alive at a time: the batch-32 step at 1024x1280 keeps about a quarter of the memory with
    slices of 8 (model card, "What makes it faster"). The image embeddings enter the prototype term
    detached: they are the frozen encoder's (or the cache's), nothing trainable is upstream.

    Args:
        network: called as ``forward(inputs_slice, network, **forward_kwargs_slice)``.
        loss_function: a ``scripts.losses.SurgicalSAMLoss``.
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
        raise TypeError(f"micro_batch_size needs a loss that splits over samples (scripts.losses.SurgicalSAMLoss), "
                        f"got {type(loss_function).__name__}; set micro_batch_size: null for this loss")
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
    merged = {key: outputs[-1][key] if key == "prototypes" else torch.cat([out[key] for out in outputs])
              for key in outputs[0]}
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
            engine.network, engine.loss_function, inputs, targets, kwargs, self.micro_batch_size,
            forward=forward, backward=(lambda part: scaler.scale(part).backward()) if scaler else None)
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


def endovis_metric_inputs(output: dict) -> tuple:
    """Evaluator output -> (predicted label maps, GT label maps, has_entry) for ``EndoVisMetric``."""
    return output["pred"]["label_map"], output["label"], output["pred"]["has_entry"]


# ---------------------------------------------------------------------------------------------- handlers
def _epoch_length_that_cannot_end_the_run(engine: Engine) -> None:
    """After an epoch of its own length: an ``epoch_length`` for ignite's checks that cannot end the run early.

    ignite ends a run once ``iteration >= epoch_length * max_epochs`` as well as once ``epoch >= max_epochs``;
    with epochs of different lengths the first test, made with the last epoch's length, could stop a run
    whose last epochs were shorter. The mean length so far, rounded up, keeps it false until the epoch count
    ends the run.
    """
    state = engine.state
    if state.epoch and state.iteration:
        state.epoch_length = max(int(state.epoch_length or 1), math.ceil(state.iteration / state.epoch))


class AugmentationVersionHandler:
    """At each epoch start, tell the training dataset the epoch (it picks the augmentation version) and run
    the epoch over that version's samples: its length follows the version's number of samples.

    The original SurgicalSAM rebuilds its loader every epoch, so an epoch reads each (frame, class) sample of
    its version once; a version can hold more or fewer samples than the previous one (a crop or rotation
    drops an instrument). ignite fixes the epoch length at the first epoch's, and torch's ``RandomSampler``
    sizes the tail of a running permutation by the dataset's *current* length, so the engine gets a fresh
    iterator over the new list at every epoch start and ``epoch_length`` is set to the loader's length then.
    At the epoch's end ``epoch_length`` is raised to the mean so far
    (:func:`_epoch_length_that_cannot_end_the_run`); ``TrainingState`` saves the epoch and iteration
    themselves, since ignite's resume would derive the epoch as ``iteration // epoch_length``.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, _epoch_length_that_cannot_end_the_run)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch - 1)
        loader = engine.state.dataloader
        if loader is not None:
            engine.set_data(loader)
            if hasattr(loader, "__len__") and len(loader):
                engine.state.epoch_length = len(loader)
        logger.info("epoch %d: augmentation version %d, %d samples", engine.state.epoch,
                    self.dataset.version, len(self.dataset))


class EngineProgress:
    """An engine's epoch and iteration, saved beside its state (``TrainingState`` adds it).

    ignite saves the iteration and the epoch length and derives the epoch on loading as ``iteration //
    epoch_length``, which is wrong once epochs differ in length (``AugmentationVersionHandler``); this
    object, loaded after the engine, restores both as they were.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return {"epoch": int(self.engine.state.epoch), "iteration": int(self.engine.state.iteration)}

    def load_state_dict(self, state: dict) -> None:
        self.engine.state.epoch, self.engine.state.iteration = int(state["epoch"]), int(state["iteration"])
        _epoch_length_that_cannot_end_the_run(self.engine)


class GradientNormClipping:
    """Clip the gradients' global norm to ``max_norm`` between ``loss.backward()`` and the optimizer step.

    Attached to MONAI's ``IterationEvents.BACKWARD_COMPLETED``; with AMP the gradients are unscaled
    first (``GradScaler.unscale_``), as torch's recipe for clipping under a scaler says. Only the
    parameters the optimizer updates are clipped. Not for gradient accumulation (the norm of a partial
    sum means nothing): attaching to a trainer with ``accumulation_steps > 1`` raises.

    Args:
        max_norm: largest allowed global norm of the gradients; ``None`` or ``0`` disables clipping.
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float | None, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm) if max_norm else None
        self.norm_type = float(norm_type)
        self._last_norm: torch.Tensor | None = None

    @property
    def last_norm(self) -> float | None:
        """The norm of the last step's gradients before clipping (None before the first step)."""
        return None if self._last_norm is None else float(self._last_norm)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        if self.max_norm is None:
            return
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("GradientNormClipping does not support gradient accumulation: set "
                             "accumulation_steps to 1 or disable clipping (max_norm null)")
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # kept as a tensor: reading it every step would wait for the device
        self._last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)


class EpochDistributedSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` for a dataset whose length changes from epoch to epoch.

    The training dataset rebuilds its (frame, class) samples at each epoch (``AugmentationVersionHandler``:
    another augmentation version, other classes on the embedding grid). torch's sampler fixes its length
    when built; this one recomputes it whenever it is iterated, so each of the ``num_replicas`` ranks gets
    ``ceil(len(dataset) / num_replicas)`` samples of the current epoch (padded by repeating, as torch does)
    and every rank runs the same number of iterations. MONAI's engines call :meth:`set_epoch` at each epoch
    start (a new shuffle per epoch, the same on every rank).
    """

    def _resize(self) -> None:
        size = len(self.dataset)
        if self.drop_last and size % self.num_replicas:
            self.num_samples = size // self.num_replicas
        else:
            self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        self._resize()
        return super().__iter__()

    def __len__(self) -> int:
        self._resize()
        return self.num_samples


class BestModelState:
    """The evaluator's best metric and the best-model saver's record, as one checkpointable object.

    Saved with the training state, so a resumed run neither forgets its best Challenge IoU nor
    overwrites models/model.pt with a worse model.
    """

    def __init__(self, evaluator: Engine, best_model_saver) -> None:
        self.evaluator, self.best_model_saver = evaluator, best_model_saver

    def state_dict(self) -> dict:
        state = self.evaluator.state
        # MONAI's CheckpointSaver loads its key-metric record but has no state_dict(): read ignite's.
        record = self.best_model_saver._key_metric_checkpoint.state_dict()
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch),
                "saver": record}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.best_model_saver.load_state_dict(state["saver"])


#: Key of the ``EngineProgress`` in the training state.
PROGRESS_KEY = "trainer_progress"


class TrainingState:
    """Save the training state every epoch into ``checkpoint_dir`` and resume from it on start.

    The saved dict is ``save_dict`` plus the trainer itself (added at attach time, so the config
    needs no reference from the trainer's handlers back to the trainer). A killed run started again
    with the same command continues from the newest ``checkpoint_epoch=N.pt``; ``resume=False``
    starts afresh (the old state is then replaced).
    """

    def __init__(self, checkpoint_dir: str, save_dict: dict, resume: bool = True) -> None:
        self.checkpoint_dir, self.save_dict, self.resume = checkpoint_dir, dict(save_dict), resume

    def numbered_checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, path) of every ``checkpoint_epoch=N.pt`` in the folder, newest first."""
        found = []
        for path in glob.glob(os.path.join(self.checkpoint_dir, "checkpoint_epoch=*.pt")):
            match = re.search(r"checkpoint_epoch=(\d+)\.pt$", path)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def latest_checkpoint(self) -> str | None:
        # MONAI's CheckpointSaver writes in place (not atomically): a run killed while saving leaves a
        # truncated file, which must not block resuming from the previous, complete one.
        for _, path in self.numbered_checkpoints():
            if zipfile.is_zipfile(path):  # torch.save's format; a truncated file lacks the zip directory
                return path
            logger.warning("skipping the incomplete training state %s (the run was killed while saving it)", path)
        return None

    def attach(self, engine: Engine) -> None:
        # the progress after the trainer: it corrects the epoch ignite derives from a variable epoch length
        state = {**self.save_dict, "trainer": engine, PROGRESS_KEY: EngineProgress(engine)}
        latest = self.latest_checkpoint() if self.resume else None
        if latest is not None:
            logger.info("resuming training from %s", latest)
            load = state
            if PROGRESS_KEY not in torch.load(latest, map_location="cpu", weights_only=True):
                # saved by a bundle before 0.4, whose epochs all had the first one's length: ignite's own
                # epoch = iteration // epoch_length is right for it
                load = {k: v for k, v in state.items() if k != PROGRESS_KEY}
            CheckpointLoader(load_path=latest, load_dict=load, map_location="cpu").attach(engine)
        # n_saved=None: ignite's own pruning deletes the previous file BEFORE writing the next one (in
        # place), so a kill in between would leave no complete state. Older files (also those of
        # earlier, killed runs) are removed below, once this epoch's file is written (handlers run in
        # the order they were attached).
        CheckpointSaver(save_dir=self.checkpoint_dir, save_dict=state, save_interval=1, n_saved=None,
                        epoch_level=True).attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remove_older_checkpoints)

    def _remove_older_checkpoints(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        for epoch, path in self.numbered_checkpoints():
            if epoch < engine.state.epoch:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


class MetricsReport:
    """When an evaluator completes: write ``metrics.json`` and print a table of the metrics.

    Beside it, ``frame_stats.json`` holds the per-frame statistics (N frames x C classes x [I, U, pred
    has class, GT has class] and has_entry) that ``surgical-sam pool_metrics`` pools folds from.

    Args:
        output_file: where to write; the folder is created.
        protocol: the prompting protocol the numbers were measured under (written beside them).
        extra: anything else to record (dataset, checkpoint, ...).
    """

    def __init__(self, output_file: str, protocol: str, extra: dict | None = None) -> None:
        self.output_file, self.protocol = output_file, protocol
        self.extra = extra or {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def report(self, metrics: dict) -> dict:
        result = {"protocol": self.protocol, **{k: metrics.get(k) for k in SCALAR_METRIC_KEYS}}
        result["class_iou"] = metrics.get("class_iou", {})
        result["num_frames"] = metrics.get("num_frames")
        result.update(self.extra)
        return result

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:  # the metrics are gathered across ranks: rank 0 writes them
            return
        result = self.report(engine.state.metrics)
        folder = os.path.dirname(os.path.abspath(self.output_file))
        os.makedirs(folder, exist_ok=True)
        frame_stats = getattr(engine.state, "endovis_frame_statistics", None)
        if frame_stats is not None:
            result["frame_stats_file"] = FRAME_STATS_FILE
            with open(os.path.join(folder, FRAME_STATS_FILE), "w") as handle:
                json.dump({**frame_stats, "protocol": self.protocol}, handle)
        with open(self.output_file, "w") as handle:
            json.dump(result, handle, indent=2)
        print(format_metrics_table(result))
        logger.info("metrics written to %s", self.output_file)


# ------------------------------------------------------------------------------------------- distributed
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _check_torchrun(backend: str) -> None:
    """A clear error when the process was not started by torchrun or there are more processes on this node than
    GPUs (``nccl``)."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.yaml runs one process per GPU started by torchrun, but {', '.join(missing)} "
            "is not set: start it with `torchrun --standalone --nproc_per_node N -m monai.bundle run training "
            "--config_file \"[..., 'configs/multi_gpu_train.yaml']\"`, or leave multi_gpu_train.yaml out for one "
            "process."
        )
    if backend == "nccl" and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
        raise RuntimeError(
            f"process LOCAL_RANK={os.environ['LOCAL_RANK']} has no GPU of its own: this node has "
            f"{torch.cuda.device_count()} GPU(s); start at most that many processes (--nproc_per_node)."
        )


def default_backend() -> str:
    """The process group's backend: ``nccl`` on a node with GPUs, ``gloo`` on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> None:
    """``init_process_group`` from torchrun's environment (multi_gpu_train.yaml's initialize); ``backend`` None:
    :func:`default_backend`. With ``nccl`` the process's GPU (``cuda:LOCAL_RANK``, :func:`rank_device`) is made
    the current CUDA device first, so collectives never fall back to GPU 0. A clear error when the process was not
    started by torchrun or there are more processes on this node than GPUs."""
    if torch.distributed.is_initialized():
        return
    backend = backend or default_backend()
    _check_torchrun(backend)
    if backend == "nccl":
        rank_device()
    torch.distributed.init_process_group(backend=backend)
    logger.info("process group initialised: rank %d of %d (%s)", torch.distributed.get_rank(),
                torch.distributed.get_world_size(), backend)


def rank_device() -> torch.device:
    """This torchrun process's device (multi_gpu_train.yaml's ``device``): ``cuda:LOCAL_RANK``, made the current
    CUDA device, on a node with GPUs; the CPU otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    _check_torchrun("nccl")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def ddp_device_ids(device: torch.device) -> list[torch.device] | None:
    """``DistributedDataParallel(device_ids=...)`` of a module on ``device``: ``[device]`` on CUDA, None on CPU."""
    return [device] if torch.device(device).type == "cuda" else None


def wait_for_rank_zero() -> None:
    """Ranks other than 0 wait here until rank 0 reaches :func:`release_other_ranks` (multi_gpu_train.yaml: rank 0
    makes the shared files of ``prepare`` first, the other ranks then find them made)."""
    if torch.distributed.get_rank() != 0:
        torch.distributed.barrier()


def release_other_ranks() -> None:
    """Rank 0, done with the steps before it, lets the ranks waiting in :func:`wait_for_rank_zero` go on."""
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()


def close_distributed() -> None:
    """``destroy_process_group`` when a process group is up (multi_gpu_train.yaml's finalize)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``network`` that train (``requires_grad``), for the optimizer: the frozen SAM parts stay
    out of its state."""
    return [p for p in network.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ input checks
def check_training_inputs(dataset_dir: str, sam_variant: str, sam_checkpoint: str | None, cache_dir: str,
                          config_hint: str = "bundle/configs/train.yaml", job: str = "train",
                          extra_problems: list[str] | None = None, splits: list[str] | None = None) -> None:
    """Fail at once, naming every missing input and the command that makes it.

    ``splits``: the dataset.json splits the run reads (train_split, val_split); each must be in the cache.
    The settings dataset.json states are compared next, by :func:`check_dataset_facts` (they are read from
    dataset.json, so they need it to exist first).

    Raises:
        FileNotFoundError: something is missing (the dataset, the SAM weights, the cache or a split of it).
        StaleCacheError: nothing is missing but the cache was made for other inputs.
    """
    from .data.embedding_cache import StaleCacheError, cache_identity, cache_problems

    missing = list(extra_problems or [])  # FileNotFoundError: something to make or fetch
    stale: list[str] = []  # StaleCacheError: the cache is there but made for other inputs
    if not os.path.isfile(os.path.join(dataset_dir, "dataset.json")):
        missing.append(
            f"dataset: no prepared dataset at {dataset_dir} (dataset.json missing). Prepare one (see the model card) "
            f"or pass --dataset_dir; for the demo data run `surgical-sam make_demo_data --out_dir {dataset_dir}`."
        )
    missing += missing_sam_weights(sam_variant, sam_checkpoint)
    if not missing:  # the cache's own check (the one EmbeddingCache opens it with), in this run's words
        cache_missing, cache_stale = cache_problems(cache_dir, cache_identity(sam_variant, sam_checkpoint),
                                                    splits or [])
        hint = "<the same config files as this run>"
        missing += [f"embeddings: {problem}".replace(hint, config_hint) for problem in cache_missing]
        stale += [f"embeddings: {problem}".replace(hint, config_hint) for problem in cache_stale]
    raise_input_problems(missing + stale, job, FileNotFoundError if missing else StaleCacheError)


def check_dataset_facts(dataset_dir: str, facts: dict, cache_dir: str | None = None, job: str = "train",
                        config_hint: str = "bundle/configs/train.yaml") -> None:
    """Fail before any work when the run's ``class_names`` / ``frame_size`` disagree with dataset.json.

    ``facts``: train.yaml's ``dataset_facts_checked`` (a value None is not compared). Class names are compared
    by id and name, also with the classes the embedding cache at ``cache_dir`` was made for. Runs after
    :func:`check_training_inputs` (these settings are read from dataset.json, so it exists by then).

    Raises:
        DatasetError: a setting disagrees with dataset.json (every disagreement named, with the value found).
        StaleCacheError: the settings agree but the cache was made for other class names.
    """
    from .data.embedding_cache import MANIFEST_NAME, StaleCacheError
    from .data.layout import DatasetError, dataset_fact_problems

    facts = {k: v for k, v in (facts or {}).items() if v is not None}
    raise_input_problems(dataset_fact_problems(dataset_dir, **facts), job, DatasetError)
    names = facts.get("class_names")
    manifest = os.path.join(cache_dir, MANIFEST_NAME) if cache_dir else None
    if names is not None and manifest and os.path.isfile(manifest):
        with open(manifest) as handle:
            cached = (json.load(handle).get("dataset") or {}).get("class_names")
        if cached is not None and list(cached) != [str(n) for n in names]:
            raise_input_problems([
                f"embeddings: the cache at {cache_dir} was made for the classes {cached}, not the run's class_names "
                f"{list(names)}: it is not used. Pass --cache_dir NEW_FOLDER (or delete {cache_dir}) and run "
                f"precompute (python -m monai.bundle run precompute --config_file {config_hint} ...)."], job,
                StaleCacheError)


def check_evaluation_inputs(dataset_dir: str, sam_variant: str, sam_checkpoint: str | None, cache_dir: str,
                            model_file: str, splits: list[str] | None = None) -> None:
    """As :func:`check_training_inputs`, and the trained model must exist."""
    extra = []
    if not os.path.isfile(model_file):
        extra.append(f"model: {model_file} not found. Train first (python -m monai.bundle run training "
                     "--config_file bundle/configs/train.yaml ...) or pass --model_file PATH.")
    check_training_inputs(dataset_dir, sam_variant, sam_checkpoint, cache_dir, job="evaluate", extra_problems=extra,
                          splits=splits)


# ------------------------------------------------------------------------------- inference past bad frames
class UnreadableFramesError(RuntimeError):
    """Some frames of an inference run could not be read (every other frame was segmented and written)."""


class UnreadableFrames:
    """Inference on a folder of frames that does not stop at an unreadable frame.

    Both the evaluator's ``iteration_update`` and one of its handlers (inference.yaml). Items that
    ``scripts.data.transforms.FrameDataset`` marked ``unreadable`` skip the network, postprocessing and
    writer; when the run completes, every skipped frame is named with why, and
    :class:`UnreadableFramesError` ends the run (a non-zero exit of ``monai.bundle run``).

    Args:
        frames_dir: the frame folder (for the message).
        output_dir: where the other frames were written (for the message).
    """

    def __init__(self, frames_dir: str, output_dir: str) -> None:
        self.frames_dir, self.output_dir = frames_dir, output_dir
        self.skipped: list[str] = []
        self.seen = 0

    def __call__(self, engine: Engine, batchdata: dict):
        reasons = batchdata.get("unreadable", []) if isinstance(batchdata, dict) else []
        reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        self.seen += max(1, len(reasons))
        bad = [reason for reason in reasons if reason]
        if bad:
            if len(bad) != len(reasons):
                raise ValueError("UnreadableFrames needs batch_size 1: a batch mixed readable and unreadable frames")
            self.skipped += bad
            for reason in bad:
                logger.error("skipped: %s", reason)
            return {}
        return engine._iteration(engine, batchdata)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def _reset(self, engine: Engine) -> None:
        self.skipped, self.seen = [], 0

    def report(self, engine: Engine | None = None) -> None:
        if not self.skipped:
            return
        raise UnreadableFramesError(
            f"{len(self.skipped)} of {self.seen} frame(s) in {self.frames_dir} could not be read and were not "
            f"segmented; every other frame was written to {self.output_dir}:\n  - " + "\n  - ".join(self.skipped)
            + "\nReplace each file named above with an 8-bit RGB or grey PNG/JPEG (or move it out of the frame folder) "
            "and run the same command again."
        )
