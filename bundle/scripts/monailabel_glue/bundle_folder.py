"""The bundle folder a MONAI Label app serves (``<app>/model/<name>``): the bundle copied, its merged
``configs/train.json`` and ``configs/inference.json``, and the model file checked to load."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence

from .. import BUNDLE_ROOT

logger = logging.getLogger(__name__)

MONAILABEL_TRAIN_OVERLAY = "monailabel_train.yaml"


#: The overlay whose presence rule over consecutive frames the served bundle carries, and the keys of that rule.
VIDEO_OVERLAY = "inference_video.yaml"
PRESENCE_KEYS = ("temporal_on_fraction", "temporal_off_fraction", "temporal_min_run", "temporal")


def _read_merged(config_files: Sequence[str], settings: Mapping) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    for key, value in settings.items():
        parser[key] = value
    return parser.config


def load_model_state(path: str) -> dict:
    """The state dict in a bundle ``model.pt``: the file itself or its ``"model"`` entry (as MONAI Label reads it)."""
    from ..sam.checkpoint import read_checkpoint_dict

    checkpoint = read_checkpoint_dict(
        path,
        "model file",
        expected="a state dict",
        hint="; pass the trained SurgicalSAM weights (models/model.pt) as --model_file",
    )
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: its 'model' entry is a {type(state).__name__}, not a state dict")
    return state


def make_monailabel_bundle(
    out_dir: str,
    model_file: str | None = None,
    sam_checkpoint: str | None = None,
    settings: Mapping | None = None,
    train_overlays: Sequence[str] = (),
    inference_overlays: Sequence[str] = (),
    check_model: bool = True,
    bundle_root: str = BUNDLE_ROOT,
) -> str:
    """Copy the bundle to ``out_dir`` (a MONAI Label app's ``model/<name>``) ready for MONAI Label.

    Args:
        out_dir: the new bundle folder (must not exist, or be empty).
        model_file: a SurgicalSAM ``model.pt`` to serve (copied to ``models/model.pt``); None copies
            the bundle's own ``models/model.pt`` when there is one.
        sam_checkpoint: the SAM weights (copied into ``models/``; the configs point there).
        settings: config ids set in both configs, e.g. ``{"sam_variant": "tiny", "frame_size": [64, 80]}``.
        train_overlays, inference_overlays: more config files merged (after monailabel_train.yaml for training).
        check_model: build the network and load ``model_file`` into it (strict), so that a checkpoint of
            another configuration or under another key fails here rather than at the first request.

    Returns:
        ``out_dir``.
    """
    settings = dict(settings or {})
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty: give a new folder for the MONAI Label bundle")
    configs = os.path.join(bundle_root, "configs")
    os.makedirs(os.path.join(out_dir, "models"), exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("configs", "scripts", "docs"):
        if os.path.isdir(os.path.join(bundle_root, folder)):
            shutil.copytree(os.path.join(bundle_root, folder), os.path.join(out_dir, folder), ignore=ignore)
    if sam_checkpoint is not None:
        if not os.path.isfile(sam_checkpoint):
            raise FileNotFoundError(f"SAM checkpoint {sam_checkpoint} does not exist")
        name = os.path.basename(sam_checkpoint)
        shutil.copyfile(sam_checkpoint, os.path.join(out_dir, "models", name))
        settings["sam_checkpoint"] = f"$@ckpt_dir + '/{name}'"
    model_file = model_file or os.path.join(bundle_root, "models", "model.pt")
    inference = _read_merged([os.path.join(configs, "inference.yaml"), *inference_overlays], settings)
    # the video task's presence rule (lib/infers.py SurgicalSAMVideo) is the video overlay's
    video = _read_merged(
        [os.path.join(configs, "inference.yaml"), os.path.join(configs, VIDEO_OVERLAY), *inference_overlays], settings
    )
    for key in PRESENCE_KEYS:
        if key in video:
            inference.setdefault(key, video[key])
    train = _read_merged(
        [os.path.join(configs, "train.yaml"), os.path.join(configs, MONAILABEL_TRAIN_OVERLAY), *train_overlays],
        settings,
    )
    for name, config in (("inference.json", inference), ("train.json", train)):
        with open(os.path.join(out_dir, "configs", name), "w") as handle:
            json.dump(config, handle, indent=2)
    if os.path.isfile(model_file):
        if check_model:
            check_model_file(out_dir, model_file)
        shutil.copyfile(model_file, os.path.join(out_dir, "models", "model.pt"))
    else:
        logger.warning(
            "no model file (%s): MONAI Label lists no inference model until models/model.pt exists", model_file
        )
    return out_dir


def check_model_file(bundle_dir: str, model_file: str) -> None:
    """Build the network of ``bundle_dir``'s inference.json and load ``model_file`` into it (strict)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser["bundle_root"] = bundle_dir
    parser["device"] = "cpu"
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(load_model_state(model_file))
    except RuntimeError as error:
        raise ValueError(f"{model_file} does not fit the network of {bundle_dir}: {error}") from error
