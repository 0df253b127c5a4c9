"""The bundle's workflows run from Python, as ``python -m monai.bundle run`` runs them: MONAI's ``ConfigWorkflow``
over a list of config files (merged in order), initialized, run and finalized; and the demos' sequence, training
then evaluating under each protocol (``surgical-sam demo`` and ``demo_distill``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["config_workflow", "run_workflow", "train_then_evaluate"]


def _say(line: str) -> None:
    print(line, flush=True)


def config_workflow(config_files: Sequence[str], run_id: str, workflow_type: str | None = None, **overrides):
    """MONAI's ``ConfigWorkflow`` of ``config_files`` (merged in order) for ``run_id``, with the metadata.json and
    logging.conf of the first file's folder when it has them, and ``overrides`` set over the merged configs."""
    from monai.bundle import ConfigWorkflow

    configs_dir = Path(config_files[0]).parent
    meta_file = configs_dir / "metadata.json"
    logging_file = configs_dir / "logging.conf"
    if not logging_file.is_file():
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    return ConfigWorkflow(
        config_file=[str(path) for path in config_files],
        meta_file=str(meta_file) if meta_file.is_file() else None,
        logging_file=str(logging_file) if logging_file.is_file() else False,
        workflow_type=workflow_type,
        run_id=run_id,
        **overrides,
    )


def run_workflow(workflow):
    """Initialize and run ``workflow``; finalize it however the run ends. Returns the workflow."""
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def train_then_evaluate(
    name: str,
    train_files: Sequence[str],
    evaluate_files: Sequence[str],
    overrides: dict[str, Any],
    protocols: Sequence[str],
    say: Callable[[str], None] = _say,
) -> dict[str, dict]:
    """Run ``training`` of ``train_files``, then ``evaluating`` of ``evaluate_files`` once per protocol.

    Args:
        name: the run's name in the progress lines (``demo``).
        train_files, evaluate_files: config files merged in order (the evaluation's hold the training's first).
        overrides: settings over the merged configs of both workflows.
        protocols: the evaluation protocols (``oracle``, ``auto``), each set as ``protocol``.
        say: where the progress lines go.

    Returns:
        {protocol: the metrics the evaluation wrote, with ``metrics_file`` (its path) added}.
    """
    bundle = Path(train_files[0]).resolve().parents[1]
    say(f"{name}: training ({' + '.join(Path(f).name for f in train_files)}, bundle {bundle})")
    run_workflow(config_workflow(train_files, "training", "train", **overrides))
    results = {}
    for protocol in protocols:
        say(f"{name}: evaluating, protocol {protocol}")
        workflow = run_workflow(config_workflow(evaluate_files, "evaluating", **{**overrides, "protocol": protocol}))
        metrics_file = workflow.parser.get_parsed_content("metrics_file")
        with open(metrics_file) as handle:
            results[protocol] = {**json.load(handle), "metrics_file": str(metrics_file)}
    return results
