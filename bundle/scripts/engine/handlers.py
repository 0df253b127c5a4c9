"""Handlers of MONAI's engines: augmentation versions, progress, gradient clipping, the best model, the
training state to resume from, the metrics report, inference past unreadable frames.

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
from monai.handlers import CheckpointLoader

from ..errors import BundleError
from ..evaluation.metrics import FRAME_STATS_FILE, SCALAR_METRIC_KEYS
from ..evaluation.report import format_metrics_table
from ..files import TEMPORARY_SUFFIX, keep_aside
from .checkpoints import AtomicCheckpointSaver

logger = logging.getLogger(__name__)


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
        logger.info(
            "epoch %d: augmentation version %d, %d samples", engine.state.epoch, self.dataset.version, len(self.dataset)
        )


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
            raise ValueError(
                "GradientNormClipping does not support gradient accumulation: set "
                "accumulation_steps to 1 or disable clipping (max_norm null)"
            )
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # kept as a tensor: reading it every step would wait for the device
        self._last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)


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
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "saver": record,
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.best_model_saver.load_state_dict(state["saver"])


#: Key of the ``EngineProgress`` in the training state.
PROGRESS_KEY = "trainer_progress"
#: Key of the run's settings (:class:`RunSettings`) in the training state.
SETTINGS_KEY = "run_settings"


class ResumeSettingsError(BundleError, ValueError):
    """A run would resume a training state saved with other settings."""


class RunSettings:
    """The settings of a training run (learning rate, batch size, method, classes, ...), saved with its state so
    that a resumed run can say which of its own differ. Plain values only (JSON's types)."""

    def __init__(self, settings: dict) -> None:
        self.settings = json.loads(json.dumps(settings or {}))  # tuples -> lists, as they come back

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, state: dict) -> None:  # compared when attaching (TrainingState), never loaded
        pass

    def differences(self, saved: dict) -> list[str]:
        """``name: the training state has X, this run has Y`` for every setting both know and that differs."""
        return [
            f"{name}: the training state has {saved[name]!r}, this run has {value!r}"
            for name, value in self.settings.items()
            if name in saved and saved[name] != value
        ]


class TrainingState:
    """Save the training state every epoch into ``checkpoint_dir`` and resume from it on start.

    The saved dict is ``save_dict`` plus the trainer itself (added at attach time, so the config
    needs no reference from the trainer's handlers back to the trainer). A killed run started again
    with the same command continues from the newest ``checkpoint_epoch=N.pt`` (and says so); ``resume=False``
    starts afresh (the old state is then replaced). Files are written atomically (:class:`AtomicCheckpointSaver`).

    ``settings`` (learning rate, batch size, method, classes, ...) are saved with the state; a run that would
    resume a state saved with other settings stops, naming each, unless ``resume_with_changes`` (then it goes on
    with its own settings, the learning rate applied to the resumed optimizer). ``model_file``: the best model's
    file; when the run does not resume, a file already there (which this run did not start from) is kept aside
    under a new name, said, never replaced.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        save_dict: dict,
        resume: bool = True,
        settings: dict | None = None,
        resume_with_changes: bool = False,
        model_file: str | None = None,
    ) -> None:
        self.checkpoint_dir, self.save_dict, self.resume = checkpoint_dir, dict(save_dict), resume
        self.settings = RunSettings(settings or {})
        self.resume_with_changes, self.model_file = bool(resume_with_changes), model_file

    def numbered_checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, path) of every ``checkpoint_epoch=N.pt`` in the folder, newest first."""
        found = []
        for path in glob.glob(os.path.join(self.checkpoint_dir, "checkpoint_epoch=*.pt")):
            match = re.search(r"checkpoint_epoch=(\d+)\.pt$", path)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def latest_checkpoint(self) -> str | None:
        # earlier bundles wrote in place (MONAI's CheckpointSaver): a run killed while saving left a
        # truncated file, which must not block resuming from the previous, complete one.
        for _, path in self.numbered_checkpoints():
            if zipfile.is_zipfile(path):  # torch.save's format; a truncated file lacks the zip directory
                return path
            logger.warning("skipping the incomplete training state %s (the run was killed while saving it)", path)
        return None

    def attach(self, engine: Engine) -> None:
        # the progress after the trainer: it corrects the epoch ignite derives from a variable epoch length
        state = {**self.save_dict, "trainer": engine, PROGRESS_KEY: EngineProgress(engine), SETTINGS_KEY: self.settings}
        latest = self.latest_checkpoint() if self.resume else None
        if latest is not None:
            saved = torch.load(latest, map_location="cpu", weights_only=True)
            self._compare_settings(latest, saved.get(SETTINGS_KEY))
            progress = saved.get(PROGRESS_KEY) or {}
            logger.info(
                "resuming training from %s (after epoch %s; --resume false starts afresh)",
                latest,
                progress.get("epoch", "?"),
            )
            load = {k: v for k, v in state.items() if k != SETTINGS_KEY}
            if PROGRESS_KEY not in saved:
                # saved by a bundle before 0.4, whose epochs all had the first one's length: ignite's own
                # epoch = iteration // epoch_length is right for it
                load = {k: v for k, v in load.items() if k != PROGRESS_KEY}
            CheckpointLoader(load_path=latest, load_dict=load, map_location="cpu").attach(engine)
            if self.resume_with_changes:
                engine.add_event_handler(Events.STARTED, self._apply_learning_rate, saved.get(SETTINGS_KEY) or {})
        elif self.model_file and os.path.isfile(self.model_file) and idist.get_rank() == 0:
            kept = keep_aside(self.model_file)
            logger.warning(
                "%s was there before this run, which does not start from it: kept as %s", self.model_file, kept
            )
        # n_saved=None: ignite's own pruning deletes the previous file BEFORE writing the next one (in
        # place), so a kill in between would leave no complete state. Older files (also those of
        # earlier, killed runs) are removed below, once this epoch's file is written (handlers run in
        # the order they were attached).
        AtomicCheckpointSaver(
            save_dir=self.checkpoint_dir, save_dict=state, save_interval=1, n_saved=None, epoch_level=True
        ).attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remove_older_checkpoints)

    def _compare_settings(self, latest: str, saved: dict | None) -> None:
        if saved is None:
            logger.warning(
                "the training state %s has no record of its settings (saved by an older bundle): this "
                "run's are not compared with it",
                latest,
            )
            return
        differences = self.settings.differences(saved)
        if not differences:
            return
        listed = "\n  - " + "\n  - ".join(differences)
        if self.resume_with_changes:
            logger.warning("resuming %s with this run's settings (--resume_with_changes true):%s", latest, listed)
            return
        raise ResumeSettingsError(
            f"this run would resume the training state {latest}, saved with other settings:{listed}\n"
            "Run with the saved settings to continue it, --resume false to start afresh (its state is then "
            "replaced), --output_dir NEW_FOLDER for a run of its own, or --resume_with_changes true to continue it "
            "with this run's settings."
        )

    def _apply_learning_rate(self, engine: Engine, saved: dict) -> None:
        """After loading (resume_with_changes): the run's learning rate replaces the saved one in the optimizer and
        its schedulers, scaled so that a schedule goes on from where it was."""
        new, old = self.settings.settings.get("learning_rate"), saved.get("learning_rate")
        if not new or not old or new == old:
            return
        scale = float(new) / float(old)
        optimizer, scheduler = self.save_dict.get("optimizer"), self.save_dict.get("lr_scheduler")
        for group in getattr(optimizer, "param_groups", []):
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] *= scale
        for part in [scheduler, *getattr(scheduler, "_schedulers", [])]:
            if hasattr(part, "base_lrs"):
                part.base_lrs = [rate * scale for rate in part.base_lrs]
        logger.info("learning rate %s applied to the resumed optimizer (was %s)", new, old)

    def _remove_older_checkpoints(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        older = [path for epoch, path in self.numbered_checkpoints() if epoch < engine.state.epoch]
        # and what a run killed while writing left under the atomic writer's temporary name (this epoch's is done)
        older += glob.glob(os.path.join(self.checkpoint_dir, "checkpoint_epoch=*.pt" + TEMPORARY_SUFFIX))
        for path in older:
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


# ------------------------------------------------------------------------------- inference past bad frames
class UnreadableFramesError(BundleError, RuntimeError):
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
            logger.info(
                "inference finished: %d frame(s) of %s segmented, written to %s",
                self.seen,
                self.frames_dir,
                self.output_dir,
            )
            return
        raise UnreadableFramesError(
            f"{len(self.skipped)} of {self.seen} frame(s) in {self.frames_dir} could not be read and were not "
            f"segmented; every other frame was written to {self.output_dir}:\n  - "
            + "\n  - ".join(self.skipped)
            + "\nReplace each file named above with an 8-bit RGB or grey PNG/JPEG (or move it out of the frame folder) "
            "and run the same command again."
        )


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``network`` that train (``requires_grad``), for the optimizer: the frozen SAM parts stay
    out of its state."""
    return [p for p in network.parameters() if p.requires_grad]
