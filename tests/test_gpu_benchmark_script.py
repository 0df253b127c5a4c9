"""tools/gpu_benchmark.py, the prepared GPU check, run end to end on CPU with its device argument and short
settings; tools/gpu_wheels.py's list of what that machine needs besides torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_the_benchmark_and_a_demo_training_on_the_device_it_is_given(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_benchmark.py"), "--device", "cpu", "--short", "--out_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["mode"] == "short"
    assert summary["benchmark"]["encoder_speedup_fp32"] > 0 and summary["benchmark"]["encoder_peak_rss_gib"] > 0
    benchmark = json.loads((out / "benchmark.json").read_text())
    assert benchmark["device"] == "cpu" and benchmark["settings"]["sam_variant"] == "tiny"
    demo = summary["demo_training"]
    assert demo["model_file_written"] and "$torch.device('cpu')" in demo["overrides"]["device"]
    assert (out / "benchmark.txt").read_text().startswith("SurgicalSAM benchmark")


def test_the_wheel_list_holds_the_bundles_dependencies_and_leaves_torch_to_the_gpu_machine(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_wheels.py"), "--dest", str(tmp_path), "--list_only"], check=True
    )
    names = {line.split("==")[0] for line in (tmp_path / "requirements.txt").read_text().split()}
    assert {"monai", "segment-anything", "pytorch-ignite", "onnxruntime", "av"} <= names
    assert not {name for name in names if name == "torch" or name.startswith("nvidia-") or name == "triton"}
