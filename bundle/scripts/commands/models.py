"""The commands that write model files and bundles: a random-weight SAM checkpoint, the conversion of an original
SurgicalSAM checkpoint, the bundle folder MONAI Label serves, and the packed bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .registry import command, fail, int_pair, positive_int


# ---------------------------------------------------------------------------------- make_sam_checkpoint
@command()
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
        raise fail("--path is required.")
    if variant not in SAM_VARIANTS:
        raise fail(f"unknown --variant {variant!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}.")
    official = SAM_VARIANTS[variant].checkpoint_name
    if official is not None and os.path.basename(str(path)) == official:
        raise fail(
            f"{path} is the name of the official {variant} weights; random weights under that name would be "
            "mistaken for them. Choose another file name."
        )
    kept = None
    if os.path.exists(str(path)):
        if not overwrite:
            raise fail(f"{path} exists: pass --overwrite to write a new one there (the old file is kept beside it).")
        if os.path.isdir(str(path)):
            raise fail(f"{path} is a folder: give a file name for the checkpoint.")
        kept = keep_aside(str(path))
    written = save_random_sam_checkpoint(str(path), variant=variant, seed=int(seed))
    if kept is not None:
        print(f"the file that was at {path} is kept as {kept}")
    size_mb = os.path.getsize(written) / 2**20
    print(f"wrote a random-weight SAM {variant} checkpoint (seed {seed}, {size_mb:.1f} MiB) to {written}")
    print("  random weights: for tests and the demo only; real results need the official SAM weights.")
    return written


# ------------------------------------------------------------------- original checkpoints and pooled folds
@command()
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
    from scripts.surgical_sam.original_checkpoint import convert_original_checkpoint as convert

    if not src or not dst:
        raise fail("--src (the original checkpoint) and --dst (e.g. bundle/models/model.pt) are required.")
    if sam_checkpoint is None:
        sam_checkpoint = os.path.join(BUNDLE_ROOT, "models", "sam_vit_h_4b8939.pth")
    classes = None if num_classes is None else positive_int(num_classes, "num_classes")
    tokens = None if num_tokens is None else positive_int(num_tokens, "num_tokens")
    for path, what, option in ((src, "original SurgicalSAM", "src"), (sam_checkpoint, "SAM", "sam_checkpoint")):
        if not os.path.isfile(str(path)):
            raise fail(f"{what} checkpoint not found: {path} (pass --{option} PATH)")
    info = convert(str(src), str(dst), str(sam_checkpoint), classes, tokens)
    print(
        f"converted {src} -> {dst}: num_classes {info['num_classes']}, num_tokens {info['num_tokens']}; "
        "set the same num_classes / num_tokens (and class_names) in the config that loads it."
    )
    return info


# ------------------------------------------------------------------------------------------- MONAI Label
@command(ValueError, OSError)
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
        raise fail("give the output folder, e.g. monailabel_app/model/surgicalsam")
    settings: dict = {}
    if sam_variant is not None:
        settings["sam_variant"] = str(sam_variant)
    if frame_size is not None:
        settings["frame_size"] = list(int_pair(frame_size, "frame_size"))
    if num_tokens is not None:
        settings["num_tokens"] = positive_int(num_tokens, "num_tokens")
    if reference_dataset is not None:
        if not os.path.isfile(os.path.join(str(reference_dataset), "dataset.json")):
            raise fail(f"--reference_dataset: {reference_dataset} holds no dataset.json (a prepared dataset folder)")
        settings["monailabel_reference_dataset"] = os.path.abspath(str(reference_dataset))
    if sam_checkpoint is None:
        sam_checkpoint = os.path.join(BUNDLE_ROOT, "models", "sam_vit_h_4b8939.pth")
    overlays = {}
    for name, value in (("train", train_overlays), ("inference", inference_overlays)):
        overlays[name] = [str(p) for p in (value.split(",") if isinstance(value, str) else (value or [])) if str(p)]
        for path in overlays[name]:
            if not os.path.isfile(path):
                raise fail(f"--{name}_overlays: {path} does not exist")
    out = make_monailabel_bundle(
        str(out_dir),
        model_file=model_file,
        sam_checkpoint=str(sam_checkpoint),
        settings=settings,
        train_overlays=overlays["train"],
        inference_overlays=overlays["inference"],
    )
    print(
        f"MONAI Label bundle written to {out}; start the server with\n"
        f"  monailabel start_server --app {os.path.dirname(os.path.dirname(os.path.abspath(out)))} --studies FRAMES "
        "--host 127.0.0.1 --port 8000"
    )
    return out


@command()
def pack(out_dir: str, bundle_root: str | None = None, with_onnx: bool = False) -> str:
    """Pack the bundle into ``<out_dir>/<name>_v<version>.zip`` with one top-level folder ``<name>``.

    Name (:func:`~scripts.deploy.packing.bundle_name`) and version come from ``configs/metadata.json``. The zip
    holds configs/, scripts/, docs/, large_files.yml and, when present, the trained ``models/model.pt``; not the
    data, evaluation output, embedding caches or SAM weights (``download_large_files`` fetches those).
    ``with_onnx``: also the ONNX export in ``models/onnx`` (``run`` with configs/export_onnx.yaml; metadata.json's ``onnx_export``
    describes it). Unpack it with ``python -m monai.bundle download --name NAME --version VERSION --url file://<zip> --bundle_dir DIR``.
    Returns the zip's path.
    """
    import scripts
    from scripts.deploy.packing import pack_bundle

    root = Path(str(bundle_root) if bundle_root not in (None, "") else scripts.BUNDLE_ROOT).expanduser().resolve()
    if isinstance(with_onnx, str) and with_onnx.lower() in ("true", "false"):
        with_onnx = with_onnx.lower() == "true"
    if not isinstance(with_onnx, bool):
        raise fail(f"--with_onnx must be true or false, got {with_onnx!r}.")
    target, files, name, version = pack_bundle(root, out_dir, with_onnx=with_onnx)
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
