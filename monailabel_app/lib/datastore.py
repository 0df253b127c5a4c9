"""A local datastore that refuses label maps the bundle could not train on, with a 4xx and the reason.

MONAI Label's LocalDatastore copies whatever file a PUT /datastore/image or /datastore/label sends; a
corrupt frame would be listed and handed out by next_sample, and a corrupt PNG or a colour mask would only
fail later, inside a training run. Here a frame must be a readable image (PIL decodes it whole), and a
label a readable single-channel image of the frame's size with values 0..C (or the ignore value 255).
"""

from __future__ import annotations

import logging

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from PIL import Image

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255


def bundle_frame_reader(bundle: str):
    """``(read_frame, DatasetError)`` of the bundle folder ``bundle``'s own ``scripts``, imported the way MONAI
    Label imports a bundle's code (its folder first on ``sys.path``, no ``scripts`` of another bundle loaded),
    once: a request then imports nothing, whichever bundle's ``scripts`` is loaded at that moment (nothing named
    ``scripts`` is installed)."""
    import sys

    from monailabel.utils.others.class_utils import unload_module

    sys.path.insert(0, bundle)
    unload_module("scripts")
    try:
        from scripts.data.layout import DatasetError, read_frame
    finally:
        sys.path.remove(bundle)
    return read_frame, DatasetError


def frame_problem(path: str, reader) -> str | None:
    """Why ``path`` is not a frame the models can read (None when it is one): ``reader``, the bundle's own frame
    reader and its error type (:func:`bundle_frame_reader`)."""
    read_frame, error_type = reader
    try:
        read_frame(path)
    except error_type as error:
        return str(error).replace(path, "the upload")
    return None


class CheckedLocalDatastore(LocalDatastore):
    def __init__(self, *args, num_classes: int, bundle: str, **kwargs) -> None:
        self.frame_reader = bundle_frame_reader(bundle)
        super().__init__(*args, **kwargs)
        self.num_classes = int(num_classes)

    def add_image(self, image_id, image_filename, image_info):
        problem = frame_problem(image_filename, self.frame_reader)
        if problem:
            raise HTTPException(status_code=400, detail=f"image {image_id or image_filename!r} refused: {problem}")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        problem = self.label_problem(image_id, label_filename)
        if problem:
            raise HTTPException(status_code=400, detail=f"label for {image_id!r} refused: {problem}")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def label_problem(self, image_id: str, label_filename: str) -> str | None:
        import numpy as np

        try:
            with Image.open(label_filename) as label:
                label.load()
                mode, size = label.mode, label.size
                values = np.asarray(label)
        except Exception as error:  # PIL raises several types for a corrupt or foreign file
            return f"not a readable image ({type(error).__name__}: {error})"
        if mode not in ("L", "P", "I", "I;16"):
            return (f"image mode {mode!r}: a label map is one channel of class ids (0 background, "
                    f"1..{self.num_classes}, {IGNORE_INDEX} unlabelled), not a colour image")
        try:
            with Image.open(self.get_image_uri(image_id)) as frame:
                frame_size = frame.size
        except Exception as error:
            return f"its frame could not be read ({error})"
        if size != frame_size:
            return f"size {size[0]}x{size[1]} differs from the frame's {frame_size[0]}x{frame_size[1]} (width x height)"
        bad = sorted(set(np.unique(values).tolist()) - set(range(self.num_classes + 1)) - {IGNORE_INDEX})
        if bad:
            return f"values {bad[:5]} outside 0..{self.num_classes} and {IGNORE_INDEX}"
        return None
