"""`surgical-sam demo_distill` end to end on a fresh bundle copy, with few epochs.

Slow (a few minutes on 2 CPU cores): demo data, random tiny SAM and the tap cache are made from nothing,
Distillation-SAM trains for 6 epochs (about 2.5 minutes with one thread) and is evaluated (auto
protocol) on the held-out demo videos. It reached Challenge IoU 30.3 on the build machine; the floor
(15; after one epoch the demo is at about 4.5) checks that the demo still learns. The full demo's
figures (20 epochs: 70.79) are in bundle/docs/distillation_sam.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import bundle_copy_ignore

from scripts import BUNDLE_ROOT


@pytest.mark.slow
def test_demo_distill_from_a_fresh_bundle_copy(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, bundle, ignore=bundle_copy_ignore(BUNDLE_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "demo_distill", "--epochs", "6"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    with open(bundle / "eval" / "demo_distill" / "auto" / "metrics.json") as handle:
        metrics = json.load(handle)
    assert metrics["protocol"] == "auto" and metrics["method"] == "distillation_sam" and metrics["num_frames"] == 48
    assert "demo_distill: auto Challenge IoU" in output
    assert (bundle / "data" / "demo_taps").is_dir() and not (bundle / "data" / "demo_embeddings").exists()
    assert metrics["challenge_iou"] >= 15.0, metrics
    assert os.path.isfile(bundle / "models" / "distill_model.pt")
