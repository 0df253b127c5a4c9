"""``surgical-sam``: the bundle's command-line tool.

    surgical-sam make_demo_data --out_dir DIR [--frame_size 128,160 --num_classes 7 --seed 0 --overwrite]
    surgical-sam make_sam_checkpoint --path PATH [--variant tiny --seed 0 --overwrite]
    surgical-sam score --pred_dir P --gt_dir G [--dataset_dir D | --class_names a,b,c]
                       [--protocol auto|oracle] [--output_file metrics.json] [--ignore_index 255]
    surgical-sam benchmark [--batch_size 32 --num_classes 7 --num_tokens 2 --frame_size 1024,1280
                            --steps 3 --encoder_frames 2 --device cpu|cuda|auto
                            --distill_batch_size 2 --distill_sam_variant V --distill_frame_size H,W
                            --quick --amp --compile --micro_batch_size 8 --output_json FILE]
    surgical-sam demo [--epochs N] [--bundle_root DIR] [--fresh]
    surgical-sam demo_distill [--epochs N] [--bundle_root DIR] [--fresh] [--cache_taps true|false]
    surgical-sam prepare_endovis2017 --raw_dir R --out_dir O [--nocheck]
    surgical-sam prepare_endovis2018 --raw_dir R --out_dir O [--labels_dir L --numbering auto|2018|2017 --nocheck]
    surgical-sam prepare_cholecseg8k --raw_dir R --out_dir O [--val_videos video12,video20 --nocheck]
    surgical-sam prepare_custom --config C.yaml --out_dir O [--nocheck]
    surgical-sam convert_original_checkpoint --src ckpt.pth --dst bundle/models/model.pt
                       [--sam_checkpoint bundle/models/sam_vit_h_4b8939.pth --num_classes 7 --num_tokens 2]
    surgical-sam pool_metrics --inputs fold0/oracle/metrics.json,fold1/oracle/metrics.json,...
                       [--output pooled.json]
    surgical-sam pack --out_dir DIR [--bundle_root DIR] [--with_onnx]

Also ``python -m scripts.cli ...`` from the bundle folder (or the repository root). The installed ``surgical-sam``
runs the bundle of the current folder when it is one, else the checkout's bundle/ (surgical_sam_bundle).
Every command is a plain function of this module, so Python code and tests can call it directly;
user errors (a missing folder, bad arguments) end with ``SystemExit`` and a one-paragraph message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS",
    "benchmark",
    "convert_original_checkpoint",
    "demo",
    "demo_distill",
    "main",
    "make_demo_data",
    "make_sam_checkpoint",
    "monailabel_bundle",
    "pack",
    "pool_metrics",
    "prepare_cholecseg8k",
    "prepare_custom",
    "prepare_endovis2017",
    "prepare_endovis2018",
    "score",
]

PROG = "surgical-sam"


# ------------------------------------------------------------------------------------------- helpers
def _fail(message: str) -> SystemExit:
    """A user error: fire lets ``SystemExit`` through, Python prints the message and exits with 1."""
    return SystemExit(f"{PROG}: error: {message}")


def _int_pair(value: Any, name: str) -> tuple[int, int]:
    """``128,160`` / ``"128,160"`` / ``"128x160"`` / ``[128, 160]`` / ``128`` -> (128, 160) / (128, 128)."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace("X", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (int, float)):
        parts = [value, value]
    else:
        parts = list(value)
    try:
        pair = tuple(int(p) for p in parts)
        if len(pair) != 2 or any(float(p) != int(float(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise _fail(f"--{name} must be two integers H,W (e.g. 128,160), got {value!r}.") from None
    if min(pair) < 1:
        raise _fail(f"--{name} must be positive, got {value!r}.")
    return pair  # type: ignore[return-value]


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(f"--{name} must be an integer, got {value!r}.")
    try:
        number = int(value)
        if float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise _fail(f"--{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise _fail(f"--{name} must be at least {minimum}, got {number}.")
    return number


def _names(value: Any) -> list[str]:
    """``--class_names a,b,c`` arrives as a tuple from fire, or as one string when a name has spaces."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [str(n).strip() for n in value]
    else:
        names = [str(value).strip()]
    if not names or any(not n for n in names):
        raise _fail(f"--class_names must be a comma-separated list of non-empty names, got {value!r}.")
    return names


def _existing_dir(path: Any, name: str) -> Path:
    if path is None or path == "":
        raise _fail(f"--{name} is required.")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise _fail(f"--{name} {folder}: {what}.")
    return folder


# --------------------------------------------------------------------------------------- make_demo_data
def make_demo_data(
    out_dir: str,
    frame_size: Any = None,
    num_classes: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the deterministic EndoVis-like demo dataset (frames, label maps, dataset.json, preview.png).

    With the defaults it is the set that ``surgical-sam demo`` (demo.yaml) trains on, so the demo keeps it.

    Args:
        out_dir: folder to write (made if needed; must be empty or hold demo data only).
        frame_size: H,W of the frames (default: the demo's, scripts.data.demo.DEMO_FRAME_SIZE).
        num_classes: C, instrument classes (EndoVis2018 names when C <= 7; default: the demo's 7).
        seed: seed of every random draw (same arguments give byte-identical files).
        overwrite: replace demo data already in out_dir (never anything else).

    Returns:
        {"out_dir", "frames" (per split), "classes", "preview"}.
    """
    from scripts.data.demo import DEMO_FRAME_SIZE, DEMO_NUM_CLASSES, PREVIEW_FILE, make_demo_dataset
    from scripts.data.layout import DatasetError, available_splits, class_names, read_dataset_description

    if out_dir is None or out_dir == "":
        raise _fail("--out_dir is required.")
    size = _int_pair(DEMO_FRAME_SIZE if frame_size is None else frame_size, "frame_size")
    classes = _positive_int(DEMO_NUM_CLASSES if num_classes is None else num_classes, "num_classes")
    try:
        written = make_demo_dataset(
            str(out_dir), frame_size=size, num_classes=classes, seed=int(seed), overwrite=bool(overwrite)
        )
    except (DatasetError, ValueError) as error:
        raise _fail(str(error)) from None
    description = read_dataset_description(written)
    frames = {split: len(description[split]) for split in available_splits(description)}
    summary = {
        "out_dir": str(written),
        "frames": frames,
        "classes": class_names(description),
        "preview": os.path.join(str(written), PREVIEW_FILE),
    }
    print(f"demo dataset written to {written} ({size[0]}x{size[1]} frames, {classes} classes, seed {seed})")
    for split, count in frames.items():
        print(f"  {split:<12}{count:5d} frames")
    print(f"  classes     {', '.join(summary['classes'])}")
    print(f"  preview     {summary['preview']}")
    return summary


# ---------------------------------------------------------------------------------- make_sam_checkpoint
def make_sam_checkpoint(path: str, variant: str = "tiny", seed: int = 0, overwrite: bool = False) -> str:
    """Write a SAM checkpoint with seeded RANDOM weights (for tests and the demo only, never for results).

    Args:
        path: file to write.
        variant: SAM variant (tiny, vit_b, vit_l, vit_h); ``tiny`` is the demo's.
        seed: seed of the random weights.
        overwrite: write although ``path`` exists; the existing file is kept beside it under a new name (said).
    """
    from scripts.files import keep_aside
    from scripts.sam.backbone import SAM_VARIANTS, save_random_sam_checkpoint

    if path is None or path == "":
        raise _fail("--path is required.")
    if variant not in SAM_VARIANTS:
        raise _fail(f"unknown --variant {variant!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}.")
    official = SAM_VARIANTS[variant].checkpoint_name
    if official is not None and os.path.basename(str(path)) == official:
        raise _fail(
            f"{path} is the name of the official {variant} weights; random weights under that name would be "
            "mistaken for them. Choose another file name."
        )
    kept = None
    if os.path.exists(str(path)):
        if not overwrite:
            raise _fail(f"{path} exists: pass --overwrite to write a new one there (the old file is kept beside it).")
        if os.path.isdir(str(path)):
            raise _fail(f"{path} is a folder: give a file name for the checkpoint.")
        kept = keep_aside(str(path))
    written = save_random_sam_checkpoint(str(path), variant=variant, seed=int(seed))
    if kept is not None:
        print(f"the file that was at {path} is kept as {kept}")
    size_mb = os.path.getsize(written) / 2**20
    print(f"wrote a random-weight SAM {variant} checkpoint (seed {seed}, {size_mb:.1f} MiB) to {written}")
    print("  random weights: for tests and the demo only; real results need the official SAM weights.")
    return written


# ------------------------------------------------------------------------------------------------ score
def score(
    pred_dir: str,
    gt_dir: str,
    dataset_dir: str | None = None,
    class_names: Any = None,
    protocol: str = "auto",
    output_file: str | None = "metrics.json",
    ignore_index: int | None = None,
) -> dict:
    """Score a folder of predicted PNG label maps against ground truth (the EndoVis/ISINet protocol).

    Args:
        pred_dir: predicted label maps (0 = background, 1..C), paired with gt_dir by relative path.
        gt_dir: ground-truth label maps.
        dataset_dir: a prepared dataset whose dataset.json gives the class names (and ignore index).
        class_names: the C class names, comma separated (instead of dataset_dir).
        protocol: ``auto`` (every frame has an entry) or ``oracle`` (frames without instruments have none).
        output_file: where to write the metrics as JSON; None to write nothing.
        ignore_index: ground-truth value to ignore (default: dataset.json's, else 255).

    Returns:
        the metrics dict (see scripts.evaluation.metrics.score_label_map_folders).
    """
    from scripts.data.layout import DESCRIPTION_FILE, DatasetError, read_dataset_description
    from scripts.data.layout import class_names as description_class_names
    from scripts.evaluation.metrics import PROTOCOLS, score_label_map_folders
    from scripts.evaluation.report import format_metrics_table

    pred_folder = _existing_dir(pred_dir, "pred_dir")
    gt_folder = _existing_dir(gt_dir, "gt_dir")
    if protocol not in PROTOCOLS:
        raise _fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    if dataset_dir is not None and class_names is not None:
        raise _fail("pass either --dataset_dir or --class_names, not both.")
    description_ignore = None
    if class_names is not None:
        names = _names(class_names)
    elif dataset_dir is not None:
        folder = _existing_dir(dataset_dir, "dataset_dir")
        try:
            description = read_dataset_description(folder)
        except (DatasetError, FileNotFoundError, ValueError) as error:
            raise _fail(f"cannot read the class names from {folder / DESCRIPTION_FILE}: {error}") from None
        names = description_class_names(description)
        description_ignore = description.get("ignore_index")
    else:
        raise _fail(
            "the class names are needed: pass --dataset_dir DIR (a prepared dataset with dataset.json) "
            "or --class_names 'name 1,name 2,...' (label values 1..C in order)."
        )
    if ignore_index is None:
        ignore_index = 255 if description_ignore is None else int(description_ignore)
    if output_file == "":
        output_file = None
    try:
        result = score_label_map_folders(
            pred_folder, gt_folder, names, ignore_index=ignore_index, protocol=protocol, output_file=output_file
        )
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    table = {
        "protocol": result.get("protocol"),
        "num_frames": result.get("num_frames"),
        **{key: result.get(key) for key in ("challenge_iou", "iou", "mc_iou", "miou")},
        "class_iou": result.get("class_iou"),
    }
    print(format_metrics_table(table))
    missing = result.get("missing_predictions") or []
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"  {len(missing)} ground-truth file(s) had no prediction and count as empty: {shown}")
    if output_file is not None:
        print(f"metrics written to {os.path.abspath(str(output_file))}")
    return result


# -------------------------------------------------------------------------------------------- benchmark
def benchmark(
    batch_size: int = 32,
    num_classes: int = 7,
    num_tokens: int = 2,
    frame_size: Any = (1024, 1280),
    steps: int = 3,
    encoder_frames: int = 2,
    device: str = "auto",
    inference_frames: int = 8,
    sam_variant: str = "vit_b",
    distill_batch_size: int = 2,
    distill_sam_variant: str | None = None,
    distill_frame_size: Any = None,
    quick: bool = False,
    amp: bool = False,
    compile: bool = False,
    micro_batch_size: int | None = 8,
    output_json: str | None = None,
) -> dict:
    """Training and inference speed, peak memory and cache size (see scripts.benchmark.run_benchmark).

    Args:
        batch_size: training batch (the paper's 32).
        num_classes: C.
        num_tokens: n, sparse tokens per class.
        frame_size: H,W of the frames (EndoVis 1024,1280).
        steps: timed steps per measurement (after one untimed warm-up).
        encoder_frames: frames through the image encoder (0 skips that part; vit_b is slow on CPU).
        device: cpu, cuda or auto (cuda when available).
        inference_frames: frames per inference call from cached embeddings.
        sam_variant: SAM sizes of the prompt side and encoder (vit_b; its prompt side equals vit_h's).
        distill_batch_size: Distillation-SAM frames per training step, without and with the tap cache (0 skips).
        distill_sam_variant: SAM variant of the Distillation-SAM part (default: --sam_variant).
        distill_frame_size: H,W of the Distillation-SAM part (default: --frame_size).
        quick: batch 8, one timed step, 2 inference frames, 1 encoder frame, no Distillation-SAM part.
        amp: also measure the bundle's path under bf16 autocast.
        compile: run the bundle's training step through torch.compile.
        micro_batch_size: the bundle's step in slices of this many samples (train.yaml's default 8); 0: one piece.
        output_json: write every figure to this JSON file.
    """
    from scripts.benchmark import format_benchmark_table, run_benchmark
    from scripts.sam.backbone import SAM_VARIANTS

    for flag, value in (("sam_variant", sam_variant), ("distill_sam_variant", distill_sam_variant)):
        if value not in (None, "") and value not in SAM_VARIANTS:
            raise _fail(f"unknown --{flag} {value!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}.")
    if str(device) not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise _fail(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}.")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise _fail("--device cuda was asked for, but torch sees no CUDA device.")
    result = run_benchmark(
        batch_size=_positive_int(batch_size, "batch_size"),
        num_classes=_positive_int(num_classes, "num_classes"),
        num_tokens=_positive_int(num_tokens, "num_tokens"),
        frame_size=_int_pair(frame_size, "frame_size"),
        steps=_positive_int(steps, "steps"),
        encoder_frames=_positive_int(encoder_frames, "encoder_frames", minimum=0),
        device=None if device == "auto" else str(device),
        inference_frames=_positive_int(inference_frames, "inference_frames"),
        sam_variant=sam_variant,
        verbose=True,
        distill_batch_size=_positive_int(distill_batch_size, "distill_batch_size", minimum=0),
        distill_sam_variant=None if distill_sam_variant in (None, "") else str(distill_sam_variant),
        distill_frame_size=None
        if distill_frame_size in (None, "")
        else _int_pair(distill_frame_size, "distill_frame_size"),
        quick=bool(quick),
        amp=bool(amp),
        compile=bool(compile),
        micro_batch_size=_positive_int(micro_batch_size, "micro_batch_size", minimum=0) or None,
    )
    print(format_benchmark_table(result))
    if output_json:
        import json

        folder = os.path.dirname(os.path.abspath(str(output_json)))
        os.makedirs(folder, exist_ok=True)
        with open(str(output_json), "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"figures written to {os.path.abspath(str(output_json))}")
    return result


# ------------------------------------------------------------------------------------------------- demo
def _workflow(config_files: list[str], workflow_type: str | None, run_id: str, **overrides):
    from monai.bundle import ConfigWorkflow

    configs_dir = Path(config_files[0]).parent
    meta_file = configs_dir / "metadata.json"
    logging_file = configs_dir / "logging.conf"
    if not logging_file.is_file():
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    return ConfigWorkflow(
        config_file=config_files,
        meta_file=str(meta_file) if meta_file.is_file() else None,
        logging_file=str(logging_file) if logging_file.is_file() else False,
        workflow_type=workflow_type,
        run_id=run_id,
        **overrides,
    )


def _run_workflow(workflow) -> None:
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()


def _demo_setup(bundle_root: str | None, config_names: Sequence[str], epochs: Any, fresh: bool):
    """The bundle folder, its config files (checked to exist) and the workflow overrides of a demo command."""
    import scripts

    root = Path(str(bundle_root) if bundle_root not in (None, "") else scripts.BUNDLE_ROOT).expanduser().resolve()
    needed = [root / "configs" / name for name in config_names]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        raise _fail(f"--bundle_root {root} is not a bundle folder: missing {', '.join(absent)}.")
    overrides: dict[str, Any] = {"bundle_root": str(root)}
    if epochs is not None:
        overrides["num_epochs"] = _positive_int(epochs, "epochs")
    if fresh:
        overrides["resume"] = False
    return root, needed, overrides


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
    from scripts.data.embedding_cache import StaleCacheError
    from scripts.data.layout import DatasetError
    from scripts.evaluation.metrics import PROTOCOLS
    from scripts.evaluation.report import format_metric, format_metrics_table

    root, needed, overrides = _demo_setup(bundle_root, ("train.yaml", "demo.yaml", "evaluate.yaml"), epochs, fresh)
    train_files = [str(needed[0]), str(needed[1])]
    eval_files = train_files + [str(needed[2])]

    try:
        print(f"demo: training ({' + '.join(Path(f).name for f in train_files)}, bundle {root})", flush=True)
        _run_workflow(_workflow(train_files, "train", "training", **overrides))
        results: dict[str, Any] = {}
        for protocol in PROTOCOLS:
            print(f"demo: evaluating, protocol {protocol}", flush=True)
            workflow = _workflow(eval_files, None, "evaluating", **{**overrides, "protocol": protocol})
            _run_workflow(workflow)
            metrics_file = workflow.parser.get_parsed_content("metrics_file")
            with open(metrics_file) as handle:
                results[protocol] = json.load(handle)
            results[protocol]["metrics_file"] = str(metrics_file)
    except (FileNotFoundError, DatasetError, StaleCacheError) as error:
        raise _fail(str(error)) from None

    print()
    for protocol in PROTOCOLS:
        print(format_metrics_table(results[protocol]))
        print(f"  (written to {results[protocol]['metrics_file']})")
        print()
    summary = (
        f"demo: oracle Challenge IoU {format_metric(results['oracle'].get('challenge_iou'), 0, 1)}, "
        f"auto Challenge IoU {format_metric(results['auto'].get('challenge_iou'), 0, 1)}, "
        f"IoU {format_metric(results['auto'].get('iou'), 0, 1)} (held-out demo frames)"
    )
    print(summary)
    results["summary"] = summary
    return results


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
    from scripts.data.embedding_cache import CacheSpaceError, StaleCacheError
    from scripts.data.layout import DatasetError
    from scripts.evaluation.report import format_metric, format_metrics_table

    root, needed, overrides = _demo_setup(
        bundle_root,
        (
            "train.yaml",
            "train_distill.yaml",
            "demo.yaml",
            "demo_distill.yaml",
            "evaluate.yaml",
            "evaluate_distill.yaml",
        ),
        epochs,
        fresh,
    )
    if cache_taps is not None:
        if not isinstance(cache_taps, bool):
            raise _fail(f"--cache_taps must be true or false, got {cache_taps!r}.")
        overrides["cache_taps"] = cache_taps
    train_files, eval_files = [str(path) for path in needed[:4]], [str(path) for path in needed]
    try:
        print(f"demo_distill: training ({' + '.join(Path(f).name for f in train_files)}, bundle {root})", flush=True)
        _run_workflow(_workflow(train_files, "train", "training", **overrides))
        print("demo_distill: evaluating, protocol auto", flush=True)
        workflow = _workflow(eval_files, None, "evaluating", **overrides)
        _run_workflow(workflow)
        metrics_file = workflow.parser.get_parsed_content("metrics_file")
        with open(metrics_file) as handle:
            result = json.load(handle)
    except (FileNotFoundError, DatasetError, StaleCacheError, CacheSpaceError) as error:
        raise _fail(str(error)) from None
    result["metrics_file"] = str(metrics_file)

    print()
    print(format_metrics_table(result))
    print(f"  (written to {metrics_file})")
    print()
    summary = (
        f"demo_distill: auto Challenge IoU {format_metric(result.get('challenge_iou'), 0, 1)}, "
        f"IoU {format_metric(result.get('iou'), 0, 1)}, mcIoU {format_metric(result.get('mc_iou'), 0, 1)} "
        "(held-out demo frames)"
    )
    print(summary)
    return {"auto": result, "summary": summary}


# -------------------------------------------------------------------------------------------- prepare_*
def _prepare(function, out_dir: Any, **kwargs) -> dict:
    """Run a preparation function of scripts.data.prepare; its DatasetErrors become user errors."""
    from scripts.data.layout import DatasetError

    if out_dir is None or out_dir == "":
        raise _fail("--out_dir is required.")
    try:
        return function(out_dir=str(Path(str(out_dir)).expanduser()), **kwargs)
    except DatasetError as error:
        raise _fail(str(error)) from None


def prepare_endovis2017(raw_dir: str, out_dir: str, check: bool = True) -> dict:
    """Prepare raw EndoVis2017 (instrument_dataset_K/...) into the bundle layout with 4 folds.

    Args:
        raw_dir: the folder holding instrument_dataset_1 ... instrument_dataset_8.
        out_dir: the prepared dataset folder (empty, new, or an earlier run's: re-runs resume).
        check: read the result back with check_dataset.

    Splits: fold0_training, fold0_validation ... fold3_validation, and training/validation = fold 0.
    Raw layout: see scripts.data.prepare.endovis2017.
    """
    from scripts.data.prepare.endovis2017 import prepare_endovis2017 as run

    folder = _existing_dir(raw_dir, "raw_dir")
    return _prepare(run, out_dir, raw_dir=str(folder), check=bool(check))


def prepare_endovis2018(
    raw_dir: str, out_dir: str, labels_dir: str | None = None, numbering: str = "auto", check: bool = True
) -> dict:
    """Prepare EndoVis2018 frames with ISINet instrument-type labels into the bundle layout.

    Args:
        raw_dir: the folder holding seq_N/left_frames (and ISINet's seq_N/instrument_labels).
        out_dir: the prepared dataset folder.
        labels_dir: labels kept apart: L/seq_N/<frame>.png type label maps (0..7) or ISINet instance masks.
        numbering: class ids of ISINet instance masks: 2018 (1..7 as the bundle's table), 2017
            (ISINet's 2017-compatible ids 1..9) or auto (2017 for instrument_labels_2017 folders).
        check: read the result back with check_dataset.

    Splits: validation = seq 2, 5, 9, 15; training = the other 11. Raw layout: see
    scripts.data.prepare.endovis2018.
    """
    from scripts.data.prepare.endovis2018 import NUMBERINGS
    from scripts.data.prepare.endovis2018 import prepare_endovis2018 as run

    folder = _existing_dir(raw_dir, "raw_dir")
    labels = None if labels_dir in (None, "") else str(_existing_dir(labels_dir, "labels_dir"))
    if str(numbering) not in NUMBERINGS:
        raise _fail(f"--numbering must be one of {', '.join(NUMBERINGS)}, got {numbering!r}.")
    return _prepare(run, out_dir, raw_dir=str(folder), labels_dir=labels, numbering=str(numbering), check=bool(check))


def prepare_cholecseg8k(raw_dir: str, out_dir: str, val_videos: Any = None, check: bool = True) -> dict:
    """Prepare CholecSeg8k (videoNN/videoNN_XXXXX/frame_K_endo*.png) into the bundle layout.

    Args:
        raw_dir: the folder holding video01 ... video55.
        out_dir: the prepared dataset folder.
        val_videos: validation videos, comma separated (video12,video20 or 12,20); default
            video12, video20, video48, video55.
        check: read the result back with check_dataset.
    """
    from scripts.data.prepare.cholecseg8k import prepare_cholecseg8k as run

    folder = _existing_dir(raw_dir, "raw_dir")
    videos = None if val_videos in (None, "") else _names(val_videos)
    return _prepare(run, out_dir, raw_dir=str(folder), val_videos=videos, check=bool(check))


def prepare_custom(config: str, out_dir: str, check: bool = True) -> dict:
    """Prepare a folder of frames and PNG label maps described by a YAML file (see scripts.data.prepare.custom).

    Args:
        config: YAML with frames_dir, labels_dir, classes {1: name, ...} and optionally ignore_index,
            validation_sequences or validation_fraction, resize [H, W], name.
        out_dir: the prepared dataset folder.
        check: read the result back with check_dataset.
    """
    from scripts.data.prepare.custom import prepare_custom as run

    if config is None or config == "":
        raise _fail("--config is required.")
    return _prepare(run, out_dir, config_path=str(Path(str(config)).expanduser()), check=bool(check))


CUSTOM_CONFIG_EXAMPLE = """\
  frames_dir: frames                 # required (paths relative to the YAML file)
  labels_dir: labels                 # required
  classes: {1: Grasper, 2: Hook}     # required: ids 1..C -> names (0 is background)
  validation_sequences: [case_3]     # or validation_fraction: 0.2 (default)
  ignore_index: 255                  # optional; resize: [480, 640] and name: my_data optional"""


def _document_raw_layouts() -> None:
    """Put the raw layout each ``prepare_*`` command expects into its docstring, shown by ``--help`` (taken from
    the preparation modules, so help and error messages say the same)."""
    from scripts.data.prepare import cholecseg8k, custom, endovis2017, endovis2018

    extra = {
        prepare_endovis2017: endovis2017.EXPECTED_LAYOUT,
        prepare_endovis2018: endovis2018.EXPECTED_LAYOUT,
        prepare_cholecseg8k: cholecseg8k.EXPECTED_LAYOUT,
        prepare_custom: custom.EXPECTED_LAYOUT + "\n\nThe YAML (--config):\n" + CUSTOM_CONFIG_EXAMPLE,
    }
    for function, layout in extra.items():
        summary, _, rest = (function.__doc__ or "").partition("\n\n")
        layout = "\n".join("    " + line for line in layout.splitlines())
        function.__doc__ = f"{summary}\n\n    Raw layout expected:\n{layout}\n\n{rest}"


_document_raw_layouts()


# ------------------------------------------------------------------- original checkpoints and pooled folds
def convert_original_checkpoint(
    src: str, dst: str, sam_checkpoint: str | None = None, num_classes: Any = None, num_tokens: Any = None
) -> dict:
    """Convert a checkpoint of the original SurgicalSAM code into the bundle's models/model.pt.

    Args:
        src: the original checkpoint (dict of prototype_prompt_encoder_state_dict, sam_decoder_state_dict,
            prototypes_state_dict).
        dst: where to write ``{"model": state_dict}`` (e.g. bundle/models/model.pt).
        sam_checkpoint: the SAM checkpoint the model was trained with; its frozen prompt encoder
            (positional encoding) is copied in. Default: the bundle's models/sam_vit_h_4b8939.pth.
        num_classes, num_tokens: what the run's config expects; checked against the checkpoint's shapes.

    Returns:
        the inferred num_classes, num_tokens, grid positions and embedding size.
    """
    from scripts import BUNDLE_ROOT
    from scripts.surgical_sam.original_checkpoint import OriginalCheckpointError
    from scripts.surgical_sam.original_checkpoint import convert_original_checkpoint as convert

    if not src or not dst:
        raise _fail("--src (the original checkpoint) and --dst (e.g. bundle/models/model.pt) are required.")
    if sam_checkpoint is None:
        sam_checkpoint = os.path.join(BUNDLE_ROOT, "models", "sam_vit_h_4b8939.pth")
    classes = None if num_classes is None else _positive_int(num_classes, "num_classes")
    tokens = None if num_tokens is None else _positive_int(num_tokens, "num_tokens")
    try:
        info = convert(str(src), str(dst), str(sam_checkpoint), classes, tokens)
    except FileNotFoundError as error:
        hint = " (the SAM weights: pass --sam_checkpoint PATH)" if "SAM" in str(error) else ""
        raise _fail(f"{error}{hint}") from None
    except OriginalCheckpointError as error:
        raise _fail(str(error)) from None
    print(
        f"converted {src} -> {dst}: num_classes {info['num_classes']}, num_tokens {info['num_tokens']}; "
        "set the same num_classes / num_tokens (and class_names) in the config that loads it."
    )
    return info


def pool_metrics(inputs: Any, output: str | None = "pooled_metrics.json") -> dict:
    """Pool the evaluations of several folds (EndoVis2017 4-fold cross-validation, as the SurgicalSAM paper reports it).

    Pooled numbers run over all frames of all folds (per-frame lists concatenated, cumulative I/U summed),
    not a mean of the per-fold numbers. Each input is a metrics.json with the frame_stats.json that
    evaluation writes beside it (or that frame_stats.json itself).

    Args:
        inputs: comma-separated paths.
        output: where to write the pooled metrics (JSON); "" to write nothing.
    """
    from scripts.evaluation.metrics import json_safe
    from scripts.evaluation.pooling import pool_frame_statistics
    from scripts.evaluation.report import format_pooled_table

    paths = [p.strip() for p in inputs.split(",")] if isinstance(inputs, str) else [str(p) for p in (inputs or [])]
    paths = [p for p in paths if p]
    if not paths:
        raise _fail("--inputs needs the metrics.json of each fold, comma separated.")
    try:
        result = pool_frame_statistics(paths)
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    print(format_pooled_table(result))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as handle:
            json.dump(json_safe(result), handle, indent=2)
        print(f"pooled metrics written to {os.path.abspath(output)}")
    return result


# ------------------------------------------------------------------------------------------- MONAI Label
def monailabel_bundle(
    out_dir: str,
    model_file: str | None = None,
    sam_checkpoint: str | None = None,
    sam_variant: str | None = None,
    frame_size: Any = None,
    num_tokens: Any = None,
    train_overlays: Any = None,
    inference_overlays: Any = None,
    reference_dataset: str | None = None,
) -> str:
    """Make the bundle folder a MONAI Label app serves: ``<app>/model/<name>``.

    Copies configs/scripts/docs, the model (``models/model.pt``, checked to load into the network) and the
    SAM checkpoint, and writes configs/inference.json (inference.yaml + overlays) and configs/train.json
    (train.yaml + monailabel_train.yaml + overlays), which MONAI Label reads before the YAML files.

    Args:
        out_dir: the new folder, e.g. monailabel_app/model/surgicalsam.
        model_file: SurgicalSAM weights (default: the bundle's models/model.pt).
        sam_checkpoint: SAM weights (default: the config's, bundle/models/sam_vit_h_4b8939.pth).
        sam_variant, frame_size (H,W), num_tokens: set in both configs when given.
        train_overlays, inference_overlays: comma-separated config files merged on top (e.g. a dataset overlay).
        reference_dataset: the prepared dataset the model was trained on (e.g. data/demo): the app's /train
            then replays its training frames and refuses a model that gets worse on its validation frames.
    """
    from scripts import BUNDLE_ROOT
    from scripts.monailabel_glue.bundle_folder import make_monailabel_bundle

    if not out_dir:
        raise _fail("give the output folder, e.g. monailabel_app/model/surgicalsam")
    settings: dict = {}
    if sam_variant is not None:
        settings["sam_variant"] = str(sam_variant)
    if frame_size is not None:
        settings["frame_size"] = list(_int_pair(frame_size, "frame_size"))
    if num_tokens is not None:
        settings["num_tokens"] = _positive_int(num_tokens, "num_tokens")
    if reference_dataset is not None:
        if not os.path.isfile(os.path.join(str(reference_dataset), "dataset.json")):
            raise _fail(f"--reference_dataset: {reference_dataset} holds no dataset.json (a prepared dataset folder)")
        settings["monailabel_reference_dataset"] = os.path.abspath(str(reference_dataset))
    if sam_checkpoint is None:
        sam_checkpoint = os.path.join(BUNDLE_ROOT, "models", "sam_vit_h_4b8939.pth")
    overlays = {}
    for name, value in (("train", train_overlays), ("inference", inference_overlays)):
        overlays[name] = [str(p) for p in (value.split(",") if isinstance(value, str) else (value or [])) if str(p)]
        for path in overlays[name]:
            if not os.path.isfile(path):
                raise _fail(f"--{name}_overlays: {path} does not exist")
    try:
        out = make_monailabel_bundle(
            str(out_dir),
            model_file=model_file,
            sam_checkpoint=str(sam_checkpoint),
            settings=settings,
            train_overlays=overlays["train"],
            inference_overlays=overlays["inference"],
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    print(
        f"MONAI Label bundle written to {out}; start the server with\n"
        f"  monailabel start_server --app {os.path.dirname(os.path.dirname(os.path.abspath(out)))} --studies FRAMES "
        "--host 127.0.0.1 --port 8000"
    )
    return out


def pack(out_dir: str, bundle_root: str | None = None, with_onnx: bool = False) -> str:
    """Pack the bundle into ``<out_dir>/<name>_v<version>.zip`` with one top-level folder ``<name>``.

    Name (:func:`~scripts.deploy.packing.bundle_name`) and version come from ``configs/metadata.json``. The zip
    holds configs/, scripts/, docs/, large_files.yml and, when present, the trained ``models/model.pt``; not the
    data, evaluation output, embedding caches or SAM weights (``download_large_files`` fetches those).
    ``with_onnx``: also the ONNX export in ``models/onnx`` (``run export_onnx``; metadata.json's ``onnx_export``
    describes it). Unpack it with ``python -m monai.bundle download --name NAME --version VERSION --url file://<zip> --bundle_dir DIR``.
    Returns the zip's path.
    """
    import scripts
    from scripts.deploy.packing import PackError, pack_bundle

    root = Path(str(bundle_root) if bundle_root not in (None, "") else scripts.BUNDLE_ROOT).expanduser().resolve()
    if isinstance(with_onnx, str) and with_onnx.lower() in ("true", "false"):
        with_onnx = with_onnx.lower() == "true"
    if not isinstance(with_onnx, bool):
        raise _fail(f"--with_onnx must be true or false, got {with_onnx!r}.")
    try:
        target, files, name, version = pack_bundle(root, out_dir, with_onnx=with_onnx)
    except PackError as error:
        raise _fail(str(error)) from None
    has_model = "models/model.pt" in files
    print(
        f"packed {len(files)} files of {root} into {target} ({target.stat().st_size / 2**20:.1f} MiB"
        f"{', with models/model.pt' if has_model else ', no trained models/model.pt'}"
        f"{', with the ONNX graphs' if with_onnx else ''})"
    )
    print(
        f"unpack with: python -m monai.bundle download --name {name} --version {version} --url file://{target} "
        "--bundle_dir DIR"
    )
    return str(target)


# ------------------------------------------------------------------------------------------------- main
COMMANDS = {
    "make_demo_data": make_demo_data,
    "make_sam_checkpoint": make_sam_checkpoint,
    "score": score,
    "benchmark": benchmark,
    "demo": demo,
    "demo_distill": demo_distill,
    "prepare_endovis2017": prepare_endovis2017,
    "prepare_endovis2018": prepare_endovis2018,
    "prepare_cholecseg8k": prepare_cholecseg8k,
    "prepare_custom": prepare_custom,
    "convert_original_checkpoint": convert_original_checkpoint,
    "pool_metrics": pool_metrics,
    "monailabel_bundle": monailabel_bundle,
    "pack": pack,
}


def _quiet(result: Any) -> Any:
    """Commands print their own report; fire shows only help (the command table or a function)."""
    return result if result is COMMANDS or callable(result) else None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``surgical-sam`` (and ``python -m scripts.cli``)."""
    from scripts.engine.process_settings import apply_process_settings, set_openmp_environment

    set_openmp_environment()  # before anything loads torch (OpenMP reads it once, when it loads)
    import fire

    apply_process_settings()
    from scripts.errors import DEBUG_ENVIRONMENT, user_error_in

    try:
        fire.Fire(COMMANDS, command=None if argv is None else list(argv), name=PROG, serialize=_quiet)
    except Exception as error:  # a user error (also one MONAI wrapped) that no command turned into its own message
        found = user_error_in(error)
        if found is None or os.environ.get(DEBUG_ENVIRONMENT, "").strip() not in ("", "0"):
            raise
        raise _fail(str(found)) from None


if __name__ == "__main__":
    main()
