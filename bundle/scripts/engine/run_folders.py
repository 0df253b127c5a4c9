"""A training run's folders: one run at a time, writable and with room before the first epoch, and a last word
on where the run's model and metrics went.

:class:`RunGuard` is the first handler of the trainer (train.yaml). When it attaches (before the first epoch,
before any resume) it

- takes a lock on each folder the run writes (``<folder>/.training.lock``: pid, host, start time, command). A
  second run into the same folders fails at once, naming the first; the lock of a process that is no longer
  running (killed, machine restarted) is named and taken over;
- checks that each folder can be written and has room for the checkpoints the run writes (their size estimated
  from the network's and the optimizer's tensors);
- says where the best model, the training state and the metrics go.

When the run completes it says where its model and metrics went, and releases the locks (also at exit).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ..errors import BundleError

__all__ = ["LOCK_FILE", "RunFolderError", "RunGuard", "RunLock", "check_room", "checkpoint_bytes"]

logger = logging.getLogger(__name__)

#: The lock of a training run, in each folder it writes.
LOCK_FILE = ".training.lock"


class RunFolderError(BundleError, RuntimeError):
    """A folder of the run is in use by another run, cannot be written or has no room."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` as the kernel counts it (Linux ``/proc``), None where unknown: a pid that
    was reused by a later process has another start."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(record: dict) -> bool:
    """Whether the process that wrote a lock ``record`` still runs (on this host)."""
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    start = record.get("process_start")
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """Locks on the folders of one training run (see the module's docstring).

    Args:
        folders: the folders the run writes (made if needed); duplicates are locked once.
    """

    def __init__(self, folders: list[str]) -> None:
        self.paths = [os.path.join(folder, LOCK_FILE) for folder in dict.fromkeys(os.path.abspath(f) for f in folders)]
        self.held: list[str] = []
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }

    def acquire(self) -> None:
        """Take every lock, or none: RunFolderError naming the run that holds one."""
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)

    def _take(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = json.dumps(self.record, indent=2)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over(path, text)
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
        self.held.append(path)

    def _take_over(self, path: str, text: str) -> None:
        try:
            with open(path) as handle:
                holder = json.load(handle)
        except (OSError, ValueError):
            holder = {}
        here = holder.get("host") == self.record["host"]
        mine = here and holder.get("pid") == self.record["pid"]  # an earlier run of this process (e.g. a notebook)
        if not mine:
            who = (
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                f" ({holder.get('command', 'command unknown')})"
            )
            if not here or _running(holder):
                advice = (
                    "wait for it to end or stop it, or give this run other folders (--output_dir, --ckpt_dir)"
                    if here
                    else f"if that run is over, delete {path}"
                )
                raise RunFolderError(
                    f"another training run is using {os.path.dirname(path)}: {who}. Two runs in "
                    f"one folder would resume each other's state and write the same model: "
                    f"{advice}."
                )
            logger.warning("taking over the lock %s of a run that is no longer running (%s)", path, who)
        with open(path, "w") as handle:
            handle.write(text)

    def release(self, *_) -> None:
        """Remove the locks this process holds."""
        for path in self.held:
            try:
                with open(path) as handle:
                    if json.load(handle).get("pid") != self.record["pid"]:
                        continue
                os.remove(path)
            except (OSError, ValueError):
                pass
        self.held = []


def checkpoint_bytes(network: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of a checkpoint of ``network``'s state dict, plus Adam's two moments of its trainable parameters when
    ``optimizer`` is given (an estimate of the training state's size; the few scalars beside them are left out)."""
    model = sum(t.numel() * t.element_size() for t in network.state_dict().values() if torch.is_tensor(t))
    if optimizer is None:
        return model
    trainable = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return model + 2 * trainable


def check_room(needed: dict[str, int]) -> None:
    """RunFolderError unless every folder (made if needed) can be written and has ``needed[folder]`` bytes free."""
    problems = []
    for folder, size in needed.items():
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
                pass
        except OSError as error:
            problems.append(
                f"{folder} cannot be written ({error.strerror or error}): fix its permissions or pass another folder"
            )
            continue
        free = shutil.disk_usage(folder).free
        if free < size:
            problems.append(
                f"{folder} has {free / 2**20:.0f} MiB free, the run's checkpoints need about "
                f"{size / 2**20:.0f} MiB: free some space or pass another folder"
            )
    if problems:
        raise RunFolderError("cannot train:\n  - " + "\n  - ".join(problems))


class RunGuard:
    """The training run's folders, checked and locked when the trainer is built; its outputs named at the end.

    Args:
        model_file: where the best model goes (its folder is locked and checked).
        training_state_dir: where the training state goes (the same).
        output_dir: metrics and TensorBoard logs (the same).
        network, optimizer: to estimate the checkpoints' size.
        validator: the evaluator that picks the best model (its best metric is reported at the end).
    """

    def __init__(
        self,
        model_file: str,
        training_state_dir: str,
        output_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        validator: Engine | None = None,
    ) -> None:
        self.model_file, self.training_state_dir, self.output_dir = model_file, training_state_dir, output_dir
        self.network, self.optimizer, self.validator = network, optimizer, validator
        model_dir = os.path.dirname(os.path.abspath(model_file))
        self.lock = RunLock([model_dir, training_state_dir, output_dir])

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        self.lock.acquire()
        model = checkpoint_bytes(self.network)
        state = checkpoint_bytes(self.network, self.optimizer)
        needed: dict[str, int] = {}
        # a new file is written beside the old one before the old one goes (atomic writes), with 10 % to spare
        for folder, size in (
            (os.path.dirname(os.path.abspath(self.model_file)), 2 * model),
            (os.path.abspath(self.training_state_dir), 2 * state),
            (os.path.abspath(self.output_dir), 2**20),
        ):
            needed[folder] = needed.get(folder, 0) + int(1.1 * size)
        check_room(needed)
        logger.info(
            "training: the best model goes to %s, the training state to %s, metrics and TensorBoard logs to %s",
            self.model_file,
            self.training_state_dir,
            self.output_dir,
        )
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        best = ""
        if self.validator is not None and getattr(self.validator.state, "best_metric_epoch", -1) not in (-1, None):
            best = (
                f" (best validation {self.validator.state.best_metric:.4f} at epoch "
                f"{self.validator.state.best_metric_epoch})"
            )
        where = self.model_file
        if not os.path.isfile(where):
            where += " (not written: no epoch validated)"
        logger.info(
            "training finished after %d epochs: model %s%s; training state in %s; TensorBoard logs in %s",
            engine.state.epoch,
            where,
            best,
            self.training_state_dir,
            self.output_dir,
        )
        self.lock.release()
