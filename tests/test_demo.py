"""The README's main job, end to end: `surgical-sam demo` on a fresh copy of the bundle.

Slow (about twenty minutes on 2 CPU cores): it trains SurgicalSAM on the generated demo data from
nothing (demo data, random tiny SAM, embedding cache all made on first use) and evaluates both
protocols on the held-out demo videos.

The run is deterministic for a given thread count and CPU; on the build machines (default threads) it
reaches oracle Challenge IoU 77.7 and auto 75.5 (0.4.0, fresh clone; see the model card). The floor
asserted is the project's target for the demo, 70, and a change that stops the demo from learning
(about 13 after one epoch) fails here.
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
def test_demo_from_a_fresh_bundle_copy(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, bundle, ignore=bundle_copy_ignore(BUNDLE_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "demo"], cwd=bundle, capture_output=True, text=True, timeout=1800,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    metrics = {}
    for protocol in ("oracle", "auto"):
        with open(bundle / "eval" / "demo" / protocol / "metrics.json") as handle:
            metrics[protocol] = json.load(handle)
        assert metrics[protocol]["protocol"] == protocol
        assert set(metrics[protocol]["class_iou"]) == {
            "Bipolar Forceps", "Prograsp Forceps", "Large Needle Driver", "Monopolar Curved Scissors",
            "Ultrasound Probe", "Suction Instrument", "Clip Applier"}
    assert "demo: oracle Challenge IoU" in output
    assert metrics["oracle"]["challenge_iou"] >= 70.0, metrics["oracle"]
    assert metrics["oracle"]["iou"] == pytest.approx(metrics["oracle"]["challenge_iou"])  # true by construction
    assert metrics["auto"]["challenge_iou"] >= 50.0 and metrics["auto"]["num_frames"] == 48
    assert os.path.isfile(bundle / "models" / "model.pt")
