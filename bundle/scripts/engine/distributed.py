"""Multi-GPU runs (torchrun, multi_gpu_train.yaml): the process group, and a sampler that follows the epoch."""

from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger(__name__)


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
    logger.info(
        "process group initialised: rank %d of %d (%s)",
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        backend,
    )


def default_device() -> torch.device:
    """The device of a one-process run (train.yaml's and inference.yaml's ``device``): the first GPU when torch
    sees one, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
