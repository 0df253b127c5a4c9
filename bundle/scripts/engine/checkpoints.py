"""The checkpoints training writes: atomically, and each model file with what inference needs to interpret it.

A model file (``models/model.pt``) is ``{"model": state_dict, "model_info": {...}}``; ``model_info``
(:class:`ModelInfo`) holds the method, the class names in the order of their ids 1..C, the frame size, the SAM
variant, the md5 of the SAM checkpoint and the number of tokens. Inference and evaluation compare their own
settings with it before any work (:func:`check_model_info`): a disagreeing ``--class_names`` or ``--frame_size``
is an error showing both. A model file without ``model_info`` (saved by an earlier bundle, or converted from
the original code) still loads; that is said once.

:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` writing each file under a temporary name and moving
it into place (:func:`scripts.files.atomic_write`), so a killed or failed save never leaves a half-written
checkpoint; a failed save names the file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from ..errors import BundleError
from ..files import atomic_write
from ..sam.checkpoint import memoised_md5

__all__ = [
    "MODEL_INFO_KEY",
    "AtomicCheckpointSaver",
    "CheckpointWriteError",
    "ModelInfo",
    "ModelInfoError",
    "check_model_info",
    "read_model_info",
]

logger = logging.getLogger(__name__)

#: Key of :class:`ModelInfo` in a model file.
MODEL_INFO_KEY = "model_info"
_said_without_info: set[str] = set()


class ModelInfoError(BundleError, ValueError):
    """The run's settings disagree with what the model file was trained with."""


class CheckpointWriteError(BundleError, OSError):
    """A checkpoint could not be written (the file is named)."""


class ModelInfo:
    """What a model file needs beside its weights to be read: saved with them by the best-model saver.

    Args:
        method: ``surgical_sam`` or ``distillation_sam``.
        class_names: the names of the class ids 1..C, in order.
        frame_size: (H, W) of the frames the model was trained on.
        sam_variant: the SAM variant of the encoder.
        sam_checkpoint: the SAM weights; their md5 is recorded (memoised beside the file).
        num_tokens: SurgicalSAM's tokens per class (None for a method without them).
    """

    def __init__(
        self,
        method: str,
        class_names: Sequence[str],
        frame_size: Sequence[int],
        sam_variant: str,
        sam_checkpoint: str | None = None,
        num_tokens: int | None = None,
    ) -> None:
        self.info = {
            "method": str(method),
            "class_names": [str(n) for n in class_names],
            "frame_size": [int(v) for v in frame_size],
            "sam_variant": str(sam_variant),
            "num_tokens": None if num_tokens is None else int(num_tokens),
        }
        self.sam_checkpoint = sam_checkpoint

    def state_dict(self) -> dict:
        info = dict(self.info)
        path = self.sam_checkpoint
        info["sam_checkpoint_md5"] = memoised_md5(path) if path and os.path.isfile(path) else None
        return info

    def load_state_dict(self, state: Mapping) -> None:  # the run's own settings stay; check_model_info compares
        pass


def read_model_info(model_file: str) -> dict | None:
    """The ``model_info`` of a model file, None when it has none."""
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    info = checkpoint.get(MODEL_INFO_KEY) if isinstance(checkpoint, dict) else None
    return dict(info) if isinstance(info, Mapping) else None


def check_model_info(
    model_file: str,
    class_names: Sequence[str] | None = None,
    frame_size: Sequence[int] | None = None,
    method: str | None = None,
    sam_variant: str | None = None,
    sam_checkpoint: str | None = None,
) -> dict | None:
    """Compare the run's settings with the model file's ``model_info``; returns it (None for an older file).

    Raises:
        ModelInfoError: the method, class names (names and order), frame size or SAM variant differ; every
            difference is shown with both values. A different SAM checkpoint (md5) is warned about.
    """
    if not model_file or not os.path.isfile(model_file):
        return None  # the run's own check names a missing model
    try:
        info = read_model_info(model_file)
    except Exception:  # noqa: BLE001 - an unreadable file is the loader's to report, with its own message
        return None
    if info is None:
        if model_file not in _said_without_info:
            _said_without_info.add(model_file)
            logger.warning(
                "%s has no record of its classes and frame size (saved by an older bundle or converted): "
                "it is loaded as it is, and the run's class_names and frame_size are trusted",
                model_file,
            )
        return None
    wanted = {
        "method": method,
        "class_names": None if class_names is None else [str(n) for n in class_names],
        "frame_size": None if frame_size is None else [int(v) for v in frame_size],
        "sam_variant": sam_variant,
    }
    differences = [
        f"{key}: the model file has {info.get(key)!r}, this run has {value!r}"
        for key, value in wanted.items()
        if value is not None and key in info and info[key] != value
    ]
    if differences:
        raise ModelInfoError(
            f"{model_file} was trained with other settings than this run's:\n  - "
            + "\n  - ".join(differences)
            + f'\nRun with the model\'s settings (e.g. --class_names "{info.get("class_names")}" --frame_size '
            f'"{info.get("frame_size")}" --sam_variant {info.get("sam_variant")}), or pass the model file '
            "trained for these (--model_file PATH)."
        )
    recorded = info.get("sam_checkpoint_md5")
    if recorded and sam_checkpoint and os.path.isfile(sam_checkpoint) and memoised_md5(sam_checkpoint) != recorded:
        logger.warning(
            "%s was trained with a SAM checkpoint of md5 %s, this run uses %s (md5 %s): its results may "
            "differ from the validated ones",
            model_file,
            recorded,
            sam_checkpoint,
            memoised_md5(sam_checkpoint),
        )
    return info


class _AtomicDiskSaver(BaseSaveHandler):
    """The save handler of one of CheckpointSaver's checkpoints, writing through :func:`atomic_write`."""

    def __init__(self, disk_saver) -> None:
        self.disk_saver = disk_saver  # MONAI's _DiskSaver: its folder, fixed file name and remove()

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            return
        name = getattr(self.disk_saver, "filename", None) or filename
        path = os.path.join(str(self.disk_saver.dirname), name)
        try:
            atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as a RuntimeError
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error).strip()
            try:
                free = f"{shutil.disk_usage(os.path.dirname(path)).free / 2**20:.0f} MiB free there"
            except OSError:
                free = "its folder cannot be read"
            raise CheckpointWriteError(
                f"cannot write the checkpoint {path} ({reason}; {free}). Nothing half-written is left. Free space "
                "or fix the folder's permissions, then run the same command again (it resumes from the last "
                "complete checkpoint)."
            ) from error

    def remove(self, filename: str) -> None:
        # ignite removes the previous file before writing the next; a fixed name (model.pt) is instead replaced by
        # the atomic write, so that there is no moment without a model file
        if idist.get_rank() == 0 and getattr(self.disk_saver, "filename", None) is None:
            self.disk_saver.remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically, a failure naming the file."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(checkpoint.save_handler)
