"""The demo commands, ``demo`` (SurgicalSAM) and ``demo_distill`` (Distillation-SAM): one flow, train then evaluate
on the generated demo data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .registry import command, fail, positive_int


# ------------------------------------------------------------------------------------------------- demo
def _demo(name: str, bundle_root: Any, configs: Sequence[str], trained_by: int, protocols: Sequence[str], **settings):
    """A demo's flow: the bundle folder's ``configs`` (the first ``trained_by`` train, all of them evaluate),
    training then evaluating under each of ``protocols`` (scripts.engine.workflows), the metric tables and a
    summary line. Returns {protocol: metrics, ..., "summary": the summary line}."""
    import scripts
    from scripts.engine.workflows import train_then_evaluate
    from scripts.evaluation.report import format_metric, format_metrics_table

    root = Path(str(bundle_root) if bundle_root not in (None, "") else scripts.BUNDLE_ROOT).expanduser().resolve()
    files = [root / "configs" / name for name in configs]
    absent = [str(path) for path in files if not path.is_file()]
    if absent:
        raise fail(f"--bundle_root {root} is not a bundle folder: missing {', '.join(absent)}.")
    overrides = {"bundle_root": str(root), **{key: value for key, value in settings.items() if value is not None}}
    results: dict[str, Any] = train_then_evaluate(
        name, [str(f) for f in files[:trained_by]], [str(f) for f in files], overrides, protocols
    )
    print()
    for protocol in protocols:
        print(format_metrics_table(results[protocol]))
        print(f"  (written to {results[protocol]['metrics_file']})")
        print()
    figures = "; ".join(
        f"{protocol} Challenge IoU {format_metric(results[protocol].get('challenge_iou'), 0, 1)}, IoU "
        f"{format_metric(results[protocol].get('iou'), 0, 1)}, mcIoU {format_metric(results[protocol].get('mc_iou'), 0, 1)}"
        for protocol in protocols
    )
    results["summary"] = f"{name}: {figures} (held-out demo frames)"
    print(results["summary"])
    return results


@command(FileNotFoundError)
def demo(epochs: int | None = None, bundle_root: str | None = None, fresh: bool = False) -> dict:
    """The README's main job on the demo data: train, then evaluate under both protocols.

    Equivalent to
    ``python -m monai.bundle run training --config_file "['<bundle>/configs/train.yaml','<bundle>/configs/demo.yaml']"``
    followed by ``run evaluating`` with ``evaluate.yaml`` merged on top, once with ``--protocol oracle`` and
    once with ``--protocol auto``. The demo data, the random-weight SAM and the embedding cache are made
    on first use (demo.yaml's ``prepare`` and ``prepare_cache``, which train.yaml's ``initialize`` runs).

    Args:
        epochs: training epochs (default: demo.yaml's num_epochs).
        bundle_root: the bundle folder (holding configs/); default: the installed bundle.
        fresh: start training from scratch instead of resuming the demo's last training state.

    Returns:
        {"oracle": metrics, "auto": metrics, "summary": the summary line}.
    """
    from scripts.evaluation.metrics import PROTOCOLS

    configs = ("train.yaml", "demo.yaml", "evaluate.yaml")
    return _demo("demo", bundle_root, configs, 2, PROTOCOLS, **_demo_settings(epochs, fresh))


@command(FileNotFoundError)
def demo_distill(
    epochs: int | None = None, bundle_root: str | None = None, fresh: bool = False, cache_taps: bool | None = None
) -> dict:
    """Distillation-SAM on the demo data: train, then evaluate (auto protocol: it needs no class prompt).

    Equivalent to ``python -m monai.bundle run training --config_file`` with ``train.yaml``, ``train_distill.yaml``,
    ``demo.yaml`` and ``demo_distill.yaml`` of ``<bundle>/configs`` merged in this order, followed by
    ``run evaluating`` with ``evaluate.yaml`` and ``evaluate_distill.yaml`` merged on top. The demo data, the
    random-weight SAM (demo.yaml's ``prepare``) and, with the tap cache on (demo_distill.yaml's default), the tap
    cache are made on first use.

    Args:
        epochs: training epochs (default: demo_distill.yaml's num_epochs).
        bundle_root: the bundle folder (holding configs/); default: the installed bundle.
        fresh: start training from scratch instead of resuming the demo's last training state.
        cache_taps: read the encoder's embedding and taps from the tap cache (default: demo_distill.yaml's).

    Returns:
        {"auto": metrics, "summary": the summary line}.
    """
    if cache_taps is not None and not isinstance(cache_taps, bool):
        raise fail(f"--cache_taps must be true or false, got {cache_taps!r}.")
    configs = ("train.yaml", "train_distill.yaml", "demo.yaml", "demo_distill.yaml")
    configs += ("evaluate.yaml", "evaluate_distill.yaml")
    settings = _demo_settings(epochs, fresh, cache_taps=cache_taps)
    return _demo("demo_distill", bundle_root, configs, 4, ("auto",), **settings)


def _demo_settings(epochs: Any, fresh: bool, **more: Any) -> dict[str, Any]:
    """The settings a demo command changes in its configs (None: the configs' own)."""
    return {
        "num_epochs": None if epochs is None else positive_int(epochs, "epochs"),
        "resume": False if fresh else None,
        **more,
    }
