"""A "new site" for the demo: one video drawn as the demo draws its videos, seen at another hospital.

The demo's videos (:mod:`scripts.data.demo`) all share one look: pink tissue under warm light and shiny
instruments. A new site changes what a model trained on them never saw: bluish-green tissue under a cold,
dimmer light with more contrast, and matte instruments (their shading flattened towards grey). Instruments,
classes, motion and label maps are drawn exactly as in the demo, so the label maps say the same thing;
only the look differs. The demo model scores clearly lower on it, and a few labelled frames of it are
what the app's fine-tuning is meant to learn from (monailabel_app/README.md "Training").

The video is written in the dataset layout of :mod:`scripts.data.layout` with its frames as the
``validation`` split (held out from the demo's training), so the tools that score a dataset's validation
frames score it as they are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import numpy as np

from ..frame_files import write_sample
from ..layout import DEFAULT_IGNORE_INDEX, DatasetError, name_files, write_dataset_description
from .dataset import DEMO_ENTRIES, DEMO_FRAME_SIZE, DEMO_MARKER, DEMO_NUM_CLASSES
from .scene import demo_class_names, render_sequence

NEW_SITE_GENERATOR = "surgical-sam-demo-new-site"
NEW_SITE_VERSION = "1"
#: The new site's video name (its sequence folder and the prefix of its frames' image ids).
NEW_SITE_VIDEO = "newsite"
NEW_SITE_FRAMES = 40
#: The new site's tissue: each output channel a mix of the demo's (R, G, B); pink becomes bluish green.
TISSUE_MIX = np.array([[0.35, 0.45, 0.2], [0.55, 0.3, 0.15], [0.45, 0.2, 0.35]])
#: The new site's light: a cold tint per channel, a gain and a gamma (> 1: more contrast, darker mid-tones).
LIGHT_TINT = np.array([0.85, 1.0, 1.15])
LIGHT_GAIN = 0.9
LIGHT_GAMMA = 1.3
#: How far matte instruments are pulled towards their own grey (0: the demo's finish, 1: grey).
MATTE = 0.45


def new_site_look(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """A demo frame (H, W, 3) uint8 as the new site shows it: its tissue (label 0) recoloured, its
    instruments (labels > 0) matte, the whole frame under the new light. Returns (H, W, 3) uint8."""
    frame = image.astype(np.float64)
    tissue = label_map == 0
    frame[tissue] = frame[tissue] @ TISSUE_MIX.T
    instruments = ~tissue
    grey = frame[instruments].mean(axis=-1, keepdims=True)
    frame[instruments] = (1 - MATTE) * frame[instruments] + MATTE * grey
    frame = 255.0 * (np.clip(frame * LIGHT_TINT * LIGHT_GAIN, 0, 255) / 255.0) ** LIGHT_GAMMA
    return np.clip(np.round(frame), 0, 255).astype(np.uint8)


def make_new_site_video(
    out_dir: str,
    frame_size: Sequence[int] = DEMO_FRAME_SIZE,
    num_classes: int = DEMO_NUM_CLASSES,
    num_frames: int = NEW_SITE_FRAMES,
    seed: int = 0,
) -> str:
    """Write the new site's video (frames and label maps of ``frame_size``) to ``out_dir``; return ``out_dir``.

    Every class of ``num_classes`` appears (instruments exchanged along the video, at most three at once);
    the same arguments give byte-identical files. ``out_dir`` must be empty or hold an earlier demo folder.

    Raises:
        DatasetError: ``out_dir`` holds files the demo did not make.
    """
    if num_frames < 2:
        raise ValueError(f"a new-site video needs at least 2 frames, got {num_frames}")
    out_dir = str(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        entries = sorted(os.listdir(out_dir))
        if set(entries) - DEMO_ENTRIES or not os.path.isfile(os.path.join(out_dir, DEMO_MARKER)):
            raise DatasetError(
                f"{out_dir} holds files the demo did not make ({name_files(entries)}): the new-site video is only "
                "written into an empty folder or one the demo made; choose another folder"
            )
        for entry in entries:  # only the demo's own entries, checked above
            path = os.path.join(out_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, DEMO_MARKER), "w") as handle:
        handle.write("made by surgical-sam's demo generator (scripts.data.demo.new_site); it may replace this folder\n")
    rng = np.random.default_rng([seed, 7919])  # a stream none of the demo's own videos draws from
    classes = [int(c) for c in rng.permutation(np.arange(1, num_classes + 1))]
    height, width = (int(v) for v in frame_size)
    entries = []
    for index, (image, label_map) in enumerate(render_sequence(rng, classes, (height, width), num_frames)):
        entry = write_sample(
            out_dir, NEW_SITE_VIDEO, f"{index:05d}", new_site_look(image, label_map), label_map, num_classes
        )
        entries.append(entry)
    write_dataset_description(
        out_dir,
        {
            "name": NEW_SITE_GENERATOR,
            "description": "One synthetic surgical video at a new site (other light, tissue, instrument finish).",
            "classes": {str(k): name for k, name in enumerate(demo_class_names(num_classes), start=1)},
            "ignore_index": DEFAULT_IGNORE_INDEX,
            "frame_size": [height, width],
            "generator": {
                "name": NEW_SITE_GENERATOR,
                "version": NEW_SITE_VERSION,
                "frame_size": [height, width],
                "num_classes": int(num_classes),
                "num_frames": int(num_frames),
                "seed": int(seed),
            },
            "training": [],
            "validation": entries,
        },
    )
    return out_dir
