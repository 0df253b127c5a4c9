"""A local datastore that refuses label maps the bundle could not train on, with a 4xx and the reason.

MONAI Label's LocalDatastore copies whatever file a PUT /datastore/image or /datastore/label sends; a
corrupt frame would be listed and handed out by next_sample, and a corrupt PNG or a colour mask would only
fail later, inside a training run. Here a frame must be a readable image (PIL decodes it whole), and a
label a readable single-channel image of the frame's size with values 0..C (or the ignore value 255).

It also keeps the datastore consistent for the threads that read it while it reloads: MONAI Label's reload
of ``datastore.json`` replaced the datastore and only then set its base folder (an inference in between
resolved its frame against the server's working directory: "frame ... does not exist"), and its reconcile
emptied the image list before filling it again. Here each is built whole, then swapped in. Scores and
other image info of many frames are written at once (:meth:`CheckedLocalDatastore.update_images_info`),
after reloading what another process (the scoring task) wrote.
"""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import LocalDatastore, LocalDatastoreModel
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
        if image_id and ("/" in image_id or os.sep in image_id):  # MONAI Label answered 500 (no such folder)
            raise HTTPException(status_code=400, detail=f"image id {image_id!r} is a path: an image id is a file name "
                                                        "without folders or extension")
        problem = frame_problem(image_filename, self.frame_reader)
        if problem:
            raise HTTPException(status_code=400, detail=f"image {image_id or image_filename!r} refused: {problem}")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id):
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        return super().remove_image(image_id)

    def _init_from_datastore_file(self, throw_exception=False):
        """Reload ``datastore.json`` when it changed: the new model is complete (base folder set) before it
        replaces the one other threads read."""
        try:
            with FileLock(self._lock_file):
                if not os.path.exists(self._datastore_config_path):
                    return
                changed = os.stat(self._datastore_config_path).st_mtime
                if changed == self._config_ts:
                    return
                with open(self._datastore_config_path) as handle:
                    loaded = LocalDatastoreModel.model_validate_json(handle.read())
                loaded.base_path = self._datastore_path
                self._datastore, self._config_ts = loaded, changed
        except ValueError as error:
            logger.error("datastore file %s not loaded: %s", self._datastore_config_path, error)
            if throw_exception:
                raise

    def _remove_non_existing(self) -> int:
        """MONAI Label's, on a copy of the image list swapped in at the end (it emptied the list, then refilled it)."""
        self._init_from_datastore_file()
        model = self._datastore
        kept, removed = {}, 0
        for image_id, entry in list(model.objects.items()):
            if not os.path.exists(os.path.join(model.image_path(), self._filename(image_id, entry.image.ext))):
                logger.info("image %s: its file is gone, removed from the datastore", image_id)
                removed += 1
                continue
            labels = {tag: label for tag, label in entry.labels.items()
                      if os.path.exists(os.path.join(model.label_path(tag), self._filename(image_id, label.ext)))}
            removed += len(entry.labels) - len(labels)
            kept[image_id] = entry.model_copy(update={"labels": labels})
        model.objects = kept
        return removed

    def reload(self) -> None:
        """Read ``datastore.json`` again if another process (the scoring task) changed it."""
        self._init_from_datastore_file()

    def update_image_info(self, image_id, info):
        self.update_images_info({image_id: info})

    def update_images_info(self, infos: dict[str, dict]) -> None:
        """Merge ``{image id: info}`` into the images' info and write ``datastore.json`` once, after reading
        what another process wrote there meanwhile (images removed meanwhile are skipped)."""
        self.reload()
        objects = self._datastore.objects
        for image_id, info in infos.items():
            if image_id in objects:
                objects[image_id].image.info.update(info)
        self._update_datastore_file()

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
