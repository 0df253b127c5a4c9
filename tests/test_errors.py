"""The bundle's user errors end a ``python -m monai.bundle run`` with their message and its fix as the last lines
(not sixty lines of traceback ending in MONAI's ``Failed to evaluate ConfigExpression``); the full traceback
only with SURGICAL_SAM_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import bundle_run_command
from PIL import Image

from scripts.data.layout import DatasetError
from scripts.errors import BundleError, MissingInputError, user_error_in

BUNDLE = Path(__file__).resolve().parent.parent / "bundle"


def test_the_bundles_errors_keep_their_usual_bases_and_are_found_behind_monais_wrapper():
    assert issubclass(DatasetError, BundleError) and issubclass(DatasetError, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError)
    try:
        try:
            raise DatasetError("no dataset.json: prepare one")
        except DatasetError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error
    except RuntimeError as wrapped:
        assert str(user_error_in(wrapped)) == "no dataset.json: prepare one"
    assert user_error_in(RuntimeError("a bug")) is None


def run_training(dataset_dir: Path, tmp_path: Path, **environment) -> subprocess.CompletedProcess:
    command = bundle_run_command(
        "training",
        BUNDLE / "configs" / "train.yaml",
        dataset_dir=dataset_dir,
        bundle_root=tmp_path / "bundle_root",
        sam_variant="tiny",
        device="cpu",
    )
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(BUNDLE), **environment},
    )


@pytest.mark.parametrize("debug", [False, True])
def test_a_run_on_frames_without_dataset_json_ends_with_the_fix_not_a_traceback(tmp_path, debug):
    frames = tmp_path / "my_frames"
    (frames / "images" / "case_1").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / "images" / "case_1" / "0001.png")
    result = run_training(frames, tmp_path, **({"SURGICAL_SAM_DEBUG": "1"} if debug else {}))
    assert result.returncode != 0
    if debug:
        assert "Traceback" in result.stderr and "Failed to evaluate ConfigExpression" in result.stderr
        return
    assert "Traceback" not in result.stderr and "ConfigExpression" not in result.stderr
    last_lines = result.stderr.strip().splitlines()[-3:]
    assert "prepare_custom" in "\n".join(last_lines) and str(frames) in "\n".join(last_lines)
    assert "SURGICAL_SAM_DEBUG=1" in result.stderr
