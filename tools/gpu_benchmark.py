"""The GPU check of the benchmark, prepared to run from a copy of the repository on a machine with torch already
installed and no network: ``python tools/gpu_benchmark.py --device cuda --out_dir OUT`` (under 8 minutes on one
H100-class GPU).

1. Installs the bundle's other dependencies from the wheels folder made beforehand by ``tools/gpu_wheels.py``
   (``--wheels_dir``, default ``tools/wheels``; skipped when the folder is absent or the imports already work).
2. Runs the benchmark on the device (training step and cached inference of both paths, the fast encoder at
   float32 and bf16 against segment-anything's, a ViT-H precompute batch's memory) -> ``OUT/benchmark.json``
   and ``OUT/benchmark.txt``.
3. Trains the demo on the device in a copy of the bundle folder (``OUT/bundle``), a few epochs, and records its
   time and last figures -> ``OUT/demo_training.json``.

``--short`` runs small settings (tiny SAM, small frames, one demo epoch on a small demo set): the CPU test of
this script (``tests/test_gpu_benchmark_script.py``) uses it with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
#: Python packages the bundle imports at run time besides torch (import names).
RUNTIME_IMPORTS = ("monai", "segment_anything", "ignite", "yaml", "fire", "PIL", "av", "onnx", "onnxruntime")

#: run_benchmark's settings of the GPU run.
FULL_SETTINGS = dict(
    batch_size=32,
    frame_size=(1024, 1280),
    steps=5,
    inference_frames=8,
    sam_variant="vit_b",
    encoder_frames=4,
    encoder_rounds=3,
    encoder_memory_variant="vit_h",
    encoder_memory_frames=4,
    encoder_memory_blocks=0,  # the whole ViT-H pass
    distill_batch_size=2,
    amp=True,
)
#: The full settings and the short ones of the CPU test (tiny SAM, small frames, one of everything).
BENCHMARK_SETTINGS = {
    "full": FULL_SETTINGS,
    "short": FULL_SETTINGS
    | dict(batch_size=2, num_classes=3, frame_size=(64, 80), steps=1, inference_frames=1, sam_variant="tiny")
    | dict(encoder_frames=1, encoder_rounds=1, encoder_memory_variant="tiny", encoder_memory_frames=1)
    | dict(distill_batch_size=0, amp=False),
}
#: Demo training overrides (MONAI bundle ids): a few epochs of the demo, and the short test's small demo set.
DEMO_OVERRIDES = {
    "full": {"num_epochs": 10},
    "short": {
        "num_epochs": 1,
        "augmentation_versions": 0,
        "demo_data#train_sequences": 2,
        "demo_data#val_sequences": 1,
        "demo_data#frames_per_sequence": 3,
    },
}


def dependencies_missing() -> list[str]:
    import importlib.util

    return [name for name in RUNTIME_IMPORTS if importlib.util.find_spec(name) is None]


def install_wheels(wheels_dir: Path) -> str:
    """Install the wheels of ``wheels_dir`` offline (its ``requirements.txt``) when some import is missing."""
    missing = dependencies_missing()
    if not missing:
        return "present"
    requirements = wheels_dir / "requirements.txt"
    if not requirements.is_file():
        raise SystemExit(
            f"missing {', '.join(missing)} and no wheels in {wheels_dir}: run tools/gpu_wheels.py on a machine with "
            "network access first and carry the folder along"
        )
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels_dir)]
    subprocess.run(command + ["-r", str(requirements)], check=True)
    return f"installed from {wheels_dir}"


def run_benchmark_part(device: str, mode: str, out_dir: Path) -> dict:
    sys.path.insert(0, str(BUNDLE))
    from scripts.measurement.benchmark import run_benchmark
    from scripts.measurement.benchmark_report import format_benchmark_table

    result = run_benchmark(device=device, verbose=True, **BENCHMARK_SETTINGS[mode])
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2, default=str))
    table = format_benchmark_table(result)
    (out_dir / "benchmark.txt").write_text(table + "\n")
    print(table, flush=True)
    return result


def run_demo_training(device: str, mode: str, out_dir: Path) -> dict:
    """The demo's training (train.yaml + demo.yaml) on ``device`` in a copy of the bundle folder."""
    root = out_dir / "bundle"
    if root.exists():
        shutil.rmtree(root)  # this script's own copy
    shutil.copytree(BUNDLE / "configs", root / "configs")
    shutil.copytree(BUNDLE / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    configs = [str(root / "configs" / name) for name in ("train.yaml", "demo.yaml")]
    overrides = {"bundle_root": str(root), "device": f"$torch.device('{device}')", **DEMO_OVERRIDES[mode]}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out_dir / "demo_training.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"demo training failed (exit {done.returncode}): see {out_dir / 'demo_training.log'}")
    epoch_lines = [line for line in (done.stdout + done.stderr).splitlines() if "samples/s" in line]
    record = {
        "device": device,
        "overrides": overrides,
        "seconds": seconds,
        "epoch_lines": epoch_lines[-3:],
        "model_file_written": (root / "models" / "model.pt").is_file(),
    }
    (out_dir / "demo_training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--out_dir", default=str(REPO / "gpu_benchmark_out"))
    parser.add_argument("--wheels_dir", default=str(REPO / "tools" / "wheels"))
    parser.add_argument("--short", action="store_true", help="small settings (the CPU test)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "short" if args.short else "full"
    start = time.perf_counter()
    summary: dict = {"device": args.device, "mode": mode, "dependencies": install_wheels(Path(args.wheels_dir))}
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    summary["torch"] = torch.__version__
    summary["device_name"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    benchmark = run_benchmark_part(args.device, mode, out_dir)
    summary["benchmark"] = {
        key: benchmark.get(key)
        for key in (
            "train_samples_per_s",
            "train_speedup_equal_terms",
            "infer_masks_per_s",
            "infer_speedup_equal_terms",
            "encoder_speedup_fp32",
            "encoder_speedup_bf16",
            "encoder_max_rel_diff_fp32",
            "encoder_peak_rss_gib",
        )
    }
    summary["demo_training"] = run_demo_training(args.device, mode, out_dir)
    summary["seconds"] = time.perf_counter() - start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary


if __name__ == "__main__":
    main()
