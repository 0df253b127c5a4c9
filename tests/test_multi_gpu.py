"""multi_gpu_train.yaml: two processes on CPU (gloo, loopback) through torchrun on the small
demo; the sampler that follows the training set's per-epoch length; precompute split across ranks."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL_CACHE_VERSIONS, SMALL_DEMO, bundle_run_command

from scripts.embedding_cache import decode_embedding, precompute_embeddings
from scripts.embedding_cache.encoding import code_step
from scripts.engine.distributed import EpochDistributedSampler
from scripts.surgical_sam.network import SurgicalSAM

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundle", "configs")
TRAIN, DEMO, MULTI_GPU = (os.path.join(CONFIGS, f"{name}.yaml") for name in ("train", "demo", "multi_gpu_train"))


class Resizable(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def test_epoch_distributed_sampler_follows_the_dataset_length():
    dataset = Resizable(10)
    ranks = [EpochDistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=3) for r in range(2)]
    for size in (10, 13, 7):  # the training set's length changes from epoch to epoch
        dataset.size = size
        for sampler in ranks:
            sampler.set_epoch(size)
        shares = [list(sampler) for sampler in ranks]
        assert [len(s) for s in shares] == [(size + 1) // 2] * 2 == [len(s) for s in ranks]
        assert set(shares[0]) | set(shares[1]) == set(range(size))  # every sample, padded by repeats only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str], tmp_path, timeout: int = 600) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=os.path.join(REPO_ROOT, "bundle"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "monai.bundle",
        *args,
    ]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def cache_contents(cache_dir: str) -> dict[str, str]:
    """Relative path -> kind of every file of a cache (no temporary files left)."""
    files = sorted(
        os.path.relpath(p, cache_dir)
        for p in glob.glob(os.path.join(cache_dir, "**", "*"), recursive=True)
        if os.path.isfile(p)
    )
    return {path: os.path.splitext(path)[1] for path in files if not path.endswith(".md5")}


@pytest.mark.slow
def test_two_processes_train_the_demo_and_precompute_like_one(tmp_path):
    """torchrun, 2 CPU processes (gloo on 127.0.0.1): demo data, cache (split across ranks) and 2 epochs."""
    run_dir = tmp_path / "run"
    dataset_dir = str(tmp_path / "demo")
    overrides = {
        "dataset_dir": dataset_dir,
        "cache_dir": str(tmp_path / "cache"),
        "sam_checkpoint": str(tmp_path / "sam_tiny.pth"),  # made by demo.yaml's prepare, on rank 0
        "output_dir": str(run_dir / "eval"),
        "ckpt_dir": str(run_dir / "models"),
        "frame_size": list(SMALL_DEMO["frame_size"]),
        "augmentation_versions": SMALL_CACHE_VERSIONS,
        "demo_data": {k: SMALL_DEMO[k] for k in ("train_sequences", "val_sequences", "frames_per_sequence")},
        "num_epochs": 2,
        "batch_size": 4,
    }
    overrides_file = tmp_path / "overrides.yaml"
    overrides_file.write_text(yaml.safe_dump(overrides))
    config_files = str([TRAIN, DEMO, str(overrides_file), MULTI_GPU])
    output = torchrun(
        [
            "run",
            "training",
            "--config_file",
            config_files,
            "--meta_file",
            os.path.join(CONFIGS, "metadata.json"),
            "--logging_file",
            os.path.join(CONFIGS, "logging.conf"),
        ],
        tmp_path,
    )
    assert "rank 1 of 2 encodes" in output and "rank 0 of 2 encodes" in output

    # rank 0 alone wrote the files: one process id in every TensorBoard file name, the newest training state,
    # the best model
    events = glob.glob(str(run_dir / "eval" / "events.out.tfevents.*"))
    assert events and len({os.path.basename(p).split(".")[4] for p in events}) == 1, events
    assert sorted(os.path.basename(p) for p in glob.glob(str(run_dir / "eval" / "training_state" / "*.pt"))) == [
        "checkpoint_epoch=2.pt"
    ]
    saved = torch.load(run_dir / "models" / "model.pt", map_location="cpu")
    state = saved["model"]
    assert saved["model_info"]["class_names"] and saved["model_info"]["frame_size"] == list(SMALL_DEMO["frame_size"])
    assert not [k for k in state if k.startswith("module.")]
    network = SurgicalSAM(7, 2, SMALL_DEMO["frame_size"], "tiny", overrides["sam_checkpoint"])
    network.load_state_dict(state)  # strict: a 'module.' prefix or a missing key would raise

    # the 2-rank cache equals a 1-process precompute of the same data
    single_dir = str(tmp_path / "cache_single")
    precompute_embeddings(
        dataset_dir,
        single_dir,
        "tiny",
        overrides["sam_checkpoint"],
        splits=["training", "validation"],
        augmented_splits=["training"],
        augmentation_versions=SMALL_CACHE_VERSIONS,
        seed=666,
    )
    two, one = cache_contents(overrides["cache_dir"]), cache_contents(single_dir)
    assert two == one
    for path, kind in one.items():
        first, second = os.path.join(single_dir, path), os.path.join(overrides["cache_dir"], path)
        if kind == ".npy":
            stored = np.load(first), np.load(second)
            # an 8-bit entry may round a value to the neighbouring code: one step (its tile's scale) apart
            step = np.maximum(*(code_step(entry) for entry in stored)) if stored[0].dtype.names else 0.0
            difference = np.abs(decode_embedding(stored[0]) - decode_embedding(stored[1]))
            assert (difference <= 2e-3 + 1.01 * step + 2e-3 * np.abs(decode_embedding(stored[1]))).all(), path
        elif kind == ".png":
            with open(first, "rb") as a, open(second, "rb") as b:
                assert a.read() == b.read(), path
        elif kind == ".json":
            with open(first) as a, open(second) as b:
                left, right = json.load(a), json.load(b)
            for content in (left, right):
                content.pop("created", None)
                content.get("dataset", {}).pop("dataset_dir", None)
            assert left == right, path


def test_metrics_report_writes_on_rank_zero_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import scripts.engine.handlers as engines

    metrics = {"challenge_iou": 50.0, "iou": 50.0, "mc_iou": 40.0, "miou": 45.0, "class_iou": {}, "num_frames": 2}
    engine = SimpleNamespace(state=SimpleNamespace(metrics=metrics))
    output_file = tmp_path / "auto" / "metrics.json"
    report = engines.MetricsReport(str(output_file), protocol="auto")
    monkeypatch.setattr(engines.idist, "get_rank", lambda: 1)
    report(engine)
    assert not output_file.exists()
    monkeypatch.setattr(engines.idist, "get_rank", lambda: 0)
    report(engine)
    assert json.loads(output_file.read_text())["challenge_iou"] == 50.0


def test_overlay_without_torchrun_fails_clearly(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO_ROOT, "bundle"))
    command = bundle_run_command("training", [TRAIN, MULTI_GPU], dataset_dir=tmp_path / "none")
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=120, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "started by torchrun" in output and "RANK" in output, output[-3000:]


#: each method's training configs (Distillation-SAM: its overlay over train.yaml)
METHOD_CONFIGS = [("train.yaml",), ("train.yaml", "train_distill.yaml")]


@pytest.mark.parametrize("method_configs", METHOD_CONFIGS)
def test_both_methods_write_logs_and_tensorboard_on_rank_zero_only(tmp_path, method_configs):
    """Every log writer (EpochProgress, StatsHandler, TensorBoardStatsHandler) of training and validation is gated on
    is_main_process, which multi_gpu_train.yaml sets to "rank 0": built with it false they are disabled, with it true
    they exist."""
    from monai.bundle import ConfigParser

    # training logs its epochs through EpochProgress (one line per epoch), validation through StatsHandler
    writers = {
        "train": ("scripts.engine.progress.EpochProgress", "TensorBoardStatsHandler"),
        "validate": ("StatsHandler", "TensorBoardStatsHandler"),
    }
    for is_main_process in (True, False):
        parser = ConfigParser()
        parser.read_config([os.path.join(CONFIGS, name) for name in method_configs] + [MULTI_GPU])
        assert parser["is_main_process"] == "$torch.distributed.get_rank() == 0"  # the overlay's rank-0 rule
        parser["is_main_process"] = is_main_process
        parser["output_dir"] = str(tmp_path / str(is_main_process))
        gated = []
        for section in ("train", "validate"):
            for index, handler in enumerate(parser[f"{section}#handlers"]):
                if isinstance(handler, dict) and handler.get("_target_") in writers[section]:
                    built = parser.get_parsed_content(f"{section}#handlers#{index}")
                    gated.append((section, handler["_target_"], built is not None))
        assert sorted(gated) == sorted(
            (section, writer, is_main_process) for section in ("train", "validate") for writer in writers[section]
        ), gated


@pytest.mark.parametrize("method_configs", METHOD_CONFIGS)
def test_multi_gpu_overlay_finds_every_step_it_runs_in_both_methods(method_configs):
    """multi_gpu_train.yaml's initialize runs `prepare` and `prepare_cache` around its barriers: both methods
    define them (empty unless a demo overlay fills them)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, name) for name in method_configs] + [MULTI_GPU])
    steps = [step[1:] for step in parser["initialize"] if isinstance(step, str) and step.startswith("@")]
    assert steps == ["prepare", "prepare_cache"]
    assert all(isinstance(parser[step], list) for step in steps)


def test_the_distributed_steps_of_the_overlay():
    """multi_gpu_train.yaml's device, DDP device ids and backend, from the factories its expressions call."""
    from scripts.engine.distributed import ddp_device_ids, default_backend, rank_device
    from scripts.engine.handlers import trainable_parameters

    if not torch.cuda.is_available():
        assert rank_device() == torch.device("cpu") and default_backend() == "gloo"
    assert ddp_device_ids(torch.device("cpu")) is None
    assert ddp_device_ids(torch.device("cuda", 1)) == [torch.device("cuda", 1)]
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    network[0].requires_grad_(False)
    assert [id(p) for p in trainable_parameters(network)] == [id(p) for p in network[1].parameters()]
