"""Distillation-SAM's input checks: every missing input named at once, with the command that makes it."""

from __future__ import annotations

import os

from .datasets import TRAIN_CONFIG_FILES


def check_distill_inputs(
    dataset_dir: str | None,
    sam_variant: str,
    sam_checkpoint: str | None,
    model_file: str | None = None,
    job: str = "train",
    tap_cache_dir: str | None = None,
) -> None:
    """Fail at once, naming every missing input (dataset, SAM weights, tap cache when used, trained model)
    and how to make it."""
    from ..data.layout import raise_input_problems
    from ..sam.backbone import missing_sam_weights

    problems = []
    if dataset_dir is not None and not os.path.isfile(os.path.join(dataset_dir, "dataset.json")):
        problems.append(
            f"dataset: no prepared dataset at {dataset_dir} (dataset.json missing). Prepare one (see the "
            "model card) or pass --dataset_dir; for the demo run surgical-sam demo_distill."
        )
    problems += missing_sam_weights(sam_variant, sam_checkpoint)
    if tap_cache_dir is not None and not os.path.isfile(os.path.join(tap_cache_dir, "manifest.json")):
        problems.append(
            f"tap cache: none at {tap_cache_dir} (cache_taps is on). Make it with python -m monai.bundle "
            "run precompute --config_file <the same config files>, or pass --cache_taps false."
        )
    if model_file is not None and not os.path.isfile(model_file):
        problems.append(
            f"model: {model_file} not found. Train first (python -m monai.bundle run training "
            f"--config_file {TRAIN_CONFIG_FILES} ...) or pass --model_file PATH."
        )
    raise_input_problems(problems, job)
