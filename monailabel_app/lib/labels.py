"""What a label map must be to be stored, and the served bundle's class table it is checked against.

A label map is a PNG (lossless: a JPEG label moves class ids at every edge, and invents classes nobody
drew), one channel of class ids, of its frame's size, whose values the served bundle's class table holds
(``configs/metadata.json``, ``network_data_format.outputs.pred.channel_def``; 255 = unlabelled). The table
is shown in ``GET /info/`` (``class_table``) and on the review page. A team whose own ids differ (say
1 = Grasper) learns it there; a client that says which names its values mean (params ``label_names``
``{"Grasper": 1}`` or MONAI Label's ``label_info`` ``[{"name": "Grasper", "idx": 1}]``) is refused when they
disagree with the table.
"""

from __future__ import annotations

import json
import os

from PIL import Image

IGNORE_INDEX = 255
#: label map formats stored: lossless only
LABEL_FORMATS = ("PNG",)
LABEL_MODES = ("L", "P", "I", "I;16")
TABLE_SOURCE = "configs/metadata.json network_data_format.outputs.pred.channel_def"


def class_table(bundle: str) -> dict:
    """The served bundle's class table: ``{"source", "bundle", "classes": {value: name}, "unlabelled": 255}``
    (values as strings, as JSON keys are)."""
    with open(os.path.join(bundle, "configs", "metadata.json")) as handle:
        channels = json.load(handle)["network_data_format"]["outputs"]["pred"]["channel_def"]
    classes = {str(int(value)): str(name) for value, name in sorted(channels.items(), key=lambda item: int(item[0]))}
    return {
        "source": TABLE_SOURCE,
        "bundle": os.path.basename(os.path.normpath(bundle)),
        "classes": classes,
        "unlabelled": IGNORE_INDEX,
    }


def describe(table: dict) -> str:
    """``0 background, 1 Bipolar Forceps, ..., 255 unlabelled`` and where the table comes from."""
    values = ", ".join(f"{value} {name}" for value, name in table["classes"].items())
    return (
        f"the served bundle's class table ({table['bundle']} {table['source']}; GET /info/ class_table): "
        f"{values}, {table['unlabelled']} unlabelled"
    )


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header, None when PIL cannot open the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None


def label_problem(label_path: str, frame_path: str, table: dict) -> str | None:
    """Why the label map file ``label_path`` cannot be stored for the frame ``frame_path`` (None when it can)."""
    import numpy as np

    try:
        with Image.open(label_path) as label:
            label_format, mode, size = label.format, label.mode, label.size
            if label_format not in LABEL_FORMATS:
                return (
                    f"format {label_format}: label maps must be PNG (lossless); a lossy format such as JPEG "
                    f"changes class ids at every edge"
                )
            if mode not in LABEL_MODES:
                return (
                    f"image mode {mode!r}: a label map is one channel of class ids (values of "
                    f"{describe(table)}), not a colour image"
                )
            frame_size = image_size(frame_path)
            if frame_size is None:
                return "its frame could not be read"
            if size != frame_size:
                return (
                    f"size {size[0]}x{size[1]} differs from the frame's {frame_size[0]}x{frame_size[1]} "
                    f"(width x height)"
                )
            label.load()
            values = np.asarray(label)
    except Exception as error:  # PIL raises several types for a corrupt or foreign file
        return f"not a readable image ({type(error).__name__}: {error})"
    allowed = {int(value) for value in table["classes"]} | {table["unlabelled"]}
    bad = sorted(set(np.unique(values).tolist()) - allowed)
    if bad:
        top = max(int(value) for value in table["classes"])
        return f"values {bad[:5]} outside 0..{top} and {table['unlabelled']}: not in {describe(table)}"
    return None


def declared_names_problem(params: dict, table: dict) -> str | None:
    """Why the class names a client declares for its values (params ``label_names`` ``{name: value}`` or
    ``label_info`` ``[{"name", "idx"}]``) disagree with the table (None when they agree or none is given)."""
    declared = {}
    names = params.get("label_names")
    if isinstance(names, dict):
        declared.update({str(name): value for name, value in names.items()})
    info = params.get("label_info")
    if isinstance(info, list):
        declared.update(
            {
                str(item.get("name")): item.get("idx", item.get("value"))
                for item in info
                if isinstance(item, dict) and "name" in item
            }
        )
    by_value = table["classes"]
    wrong = []
    for name, value in declared.items():
        if name.lower() == "background" and str(value) == "0":
            continue
        served = by_value.get(str(value)) if not isinstance(value, bool) and str(value).isdigit() else None
        if served is None or served.lower() != name.lower():
            wrong.append(f"{name} = {value!r} (the table's {value!r} is {served!r})")
    if wrong:
        return f"the label's classes {', '.join(wrong)} disagree with {describe(table)}; map them to its values first"
    return None


def fit_problem(frame_path: str, label_path: str) -> str | None:
    """Why a stored label map does not fit its frame for training (None when it does), from the headers."""
    frame_size, label_size = image_size(frame_path), image_size(label_path)
    if frame_size is None:
        return f"frame {os.path.basename(frame_path)} cannot be read"
    if label_size is None:
        return f"label map {os.path.basename(label_path)} cannot be read"
    if frame_size != label_size:
        return (
            f"its label map is {label_size[1]}x{label_size[0]} (height x width) but the frame is "
            f"{frame_size[1]}x{frame_size[0]}"
        )
    return None
