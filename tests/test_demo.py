"""The README's main job, end to end: `surgical-sam demo` on a fresh copy of the bundle.

Slow (about twenty minutes on 2 CPU cores): it trains SurgicalSAM on the generated demo data from
nothing (demo data, random tiny SAM, embedding cache all made on first use) and evaluates both
protocols on the held-out demo videos.

The run is deterministic for a given thread count and CPU; on the build machines (default threads) it
reaches oracle Challenge IoU 76.80 and auto 74.89 (fresh clone; the model card's "Results"). The floor
asserted is the project's target for the demo, 70, and a change that stops the demo from learning
(about 13 after one epoch) fails here.

The trained demo model then goes through the ONNX export and ONNX Runtime
(:func:`check_onnx_on_demo_model`, which also runs on its own on any bundle folder holding a trained demo
model, e.g. ``python -c "import sys; sys.path[:0] = ['tests', 'bundle']; import test_demo;
test_demo.check_onnx_on_demo_model('bundle', '/tmp/onnx_check')"``).
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


def check_onnx_on_demo_model(bundle_dir, work_dir) -> dict:
    """Export ``bundle_dir``'s trained demo model (``models/model.pt``) to ONNX in ``work_dir`` and check ONNX
    Runtime against torch on the demo's held-out frames (all of its validation split, every class prompted,
    automatic protocol, logits at the frame size): the checks of ``scripts.measurement.backend_comparison.agreement_failures``
    (>= 99.9% equal label pixels, encoders equal to float32 rounding, logits within 1e-3 of torch or, where the
    network amplifies float32 rounding beyond that, no further from the float64 evaluation of the same graphs
    than torch's own float32 path is, times 2 in RMS and 4 in max). Returns compare_backends' figures."""
    import torch
    from monai.bundle import ConfigParser

    from scripts.data.frame_files import read_frame
    from scripts.deploy.onnx_backend import OnnxSurgicalSAM, export_model_file
    from scripts.measurement.backend_comparison import agreement_failures, compare_backends

    bundle_dir = os.path.abspath(str(bundle_dir))
    parser = ConfigParser()
    parser.read_config(
        [os.path.join(bundle_dir, "configs", name) for name in ("inference.yaml", "demo_inference.yaml")]
    )
    parser["bundle_root"] = bundle_dir
    parser["device"] = "$torch.device('cpu')"
    network, inferer = parser.get_parsed_content("network_def"), parser.get_parsed_content("inferer")
    onnx_dir = os.path.join(str(work_dir), "onnx")
    export_model_file(network, parser.get_parsed_content("model_file"), onnx_dir, "tiny", parser["class_names"])
    demo = os.path.join(bundle_dir, "data", "demo")
    with open(os.path.join(demo, "dataset.json")) as handle:
        held_out = [os.path.join(demo, item["image"]) for item in json.load(handle)["validation"]]
    frames = torch.stack([torch.from_numpy(read_frame(path)).permute(2, 0, 1).float() for path in held_out])
    result = compare_backends(network.eval(), OnnxSurgicalSAM(onnx_dir), frames, inferer, reference=True)
    assert agreement_failures(result) == [], (agreement_failures(result), result)
    return result


@pytest.mark.slow
def test_demo_from_a_fresh_bundle_copy(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, bundle, ignore=bundle_copy_ignore(BUNDLE_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "demo"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    metrics = {}
    for protocol in ("oracle", "auto"):
        with open(bundle / "eval" / "demo" / protocol / "metrics.json") as handle:
            metrics[protocol] = json.load(handle)
        assert metrics[protocol]["protocol"] == protocol
        assert set(metrics[protocol]["class_iou"]) == {
            "Bipolar Forceps",
            "Prograsp Forceps",
            "Large Needle Driver",
            "Monopolar Curved Scissors",
            "Ultrasound Probe",
            "Suction Instrument",
            "Clip Applier",
        }
    assert "demo: oracle Challenge IoU" in output
    assert metrics["oracle"]["challenge_iou"] >= 70.0, metrics["oracle"]
    assert metrics["oracle"]["iou"] == pytest.approx(metrics["oracle"]["challenge_iou"])  # true by construction
    assert metrics["auto"]["challenge_iou"] >= 50.0 and metrics["auto"]["num_frames"] == 48
    assert os.path.isfile(bundle / "models" / "model.pt")
    check_onnx_on_demo_model(bundle, tmp_path / "onnx_check")
