"""The commands that write datasets: the demo data and the preparations of EndoVis2017, EndoVis2018,
CholecSeg8k and a custom folder of frames and label maps into the bundle layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .registry import command, existing_dir, fail, int_pair, name_list, positive_int


# --------------------------------------------------------------------------------------- make_demo_data
@command(ValueError)
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
    from scripts.data.layout import available_splits, class_names, read_dataset_description

    if out_dir is None or out_dir == "":
        raise fail("--out_dir is required.")
    size = int_pair(DEMO_FRAME_SIZE if frame_size is None else frame_size, "frame_size")
    classes = positive_int(DEMO_NUM_CLASSES if num_classes is None else num_classes, "num_classes")
    written = make_demo_dataset(
        str(out_dir), frame_size=size, num_classes=classes, seed=int(seed), overwrite=bool(overwrite)
    )
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


# -------------------------------------------------------------------------------------------- prepare_*
def _prepare(function, out_dir: Any, **kwargs) -> dict:
    """Run a preparation function of scripts.data.prepare into ``out_dir``."""
    if out_dir is None or out_dir == "":
        raise fail("--out_dir is required.")
    return function(out_dir=str(Path(str(out_dir)).expanduser()), **kwargs)


@command()
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

    folder = existing_dir(raw_dir, "raw_dir")
    return _prepare(run, out_dir, raw_dir=str(folder), check=bool(check))


@command()
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

    folder = existing_dir(raw_dir, "raw_dir")
    labels = None if labels_dir in (None, "") else str(existing_dir(labels_dir, "labels_dir"))
    if str(numbering) not in NUMBERINGS:
        raise fail(f"--numbering must be one of {', '.join(NUMBERINGS)}, got {numbering!r}.")
    return _prepare(run, out_dir, raw_dir=str(folder), labels_dir=labels, numbering=str(numbering), check=bool(check))


@command()
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

    folder = existing_dir(raw_dir, "raw_dir")
    videos = None if val_videos in (None, "") else name_list(val_videos)
    return _prepare(run, out_dir, raw_dir=str(folder), val_videos=videos, check=bool(check))


@command()
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
        raise fail("--config is required.")
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
