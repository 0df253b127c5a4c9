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
Every command is a plain function (scripts.commands, imported here), so Python code and tests can call it directly;
user errors (a missing folder, bad arguments) end with ``SystemExit`` and a one-paragraph message
(scripts.commands.registry.command).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scripts.commands.benchmark import benchmark
from scripts.commands.data import (
    make_demo_data,
    prepare_cholecseg8k,
    prepare_custom,
    prepare_endovis2017,
    prepare_endovis2018,
)
from scripts.commands.demos import demo, demo_distill
from scripts.commands.evaluation import pool_metrics, score
from scripts.commands.models import convert_original_checkpoint, make_sam_checkpoint, monailabel_bundle, pack
from scripts.commands.registry import PROG

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

#: The commands, by name, in the order ``--help`` lists them.
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
    fire.Fire(COMMANDS, command=None if argv is None else list(argv), name=PROG, serialize=_quiet)


if __name__ == "__main__":
    main()
