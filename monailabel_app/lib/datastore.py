"""A local datastore that refuses label maps the bundle could not train on, with a 4xx and the reason.

MONAI Label's LocalDatastore copies whatever file a PUT /datastore/image or /datastore/label sends, to a
path joined from the id and tag as given; a corrupt frame would be listed and handed out by next_sample,
and a corrupt PNG or a colour mask would only fail later, inside a training run. Here ids and tags are
names whose files lie inside the studies folder (lib/names.py), a frame must be a readable image of at most
``max_pixels`` (lib/uploads.py), a labelled frame is not replaced under its labels, and a label map must be
what lib/labels.py says (PNG, one channel, the frame's size, values of the served class table).

A label saved under tag ``final`` (a person's) gets label info ``review``: ``reviewed`` when it equals the
frame's pre-label (tag ``original``), else ``corrected`` (lib/videos.py's frame states). The frames of a
video are the images whose info names it (:meth:`CheckedLocalDatastore.video_frames`).

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

from .labels import declared_names_problem, label_problem
from .names import check_inside, check_name
from .uploads import pixels_problem

logger = logging.getLogger(__name__)

#: the tag of the label a person saved (MONAI Label's ``final``) and of a model's pre-label (``original``)
REVIEWED_TAG, PRE_LABEL_TAG = "final", "original"


def import_from_bundle(bundle: str, module: str):
    """The module ``module`` (e.g. ``scripts.data.layout``) of the bundle folder ``bundle``'s own ``scripts``,
    imported the way MONAI Label imports a bundle's code (its folder first on ``sys.path``, no ``scripts`` of
    another bundle loaded). Import once, at start: a request then imports nothing, whichever bundle's
    ``scripts`` is loaded at that moment (nothing named ``scripts`` is installed)."""
    import importlib
    import sys

    from monailabel.utils.others.class_utils import unload_module

    sys.path.insert(0, bundle)
    unload_module("scripts")
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(bundle)


def bundle_frame_reader(bundle: str):
    """``(read_frame, DatasetError)`` of the bundle folder ``bundle``'s own ``scripts`` (:func:`import_from_bundle`)."""
    frame_files = import_from_bundle(
        bundle, "scripts.data.frame_files"
    )  # one import: its DatasetError is the raised one
    return frame_files.read_frame, frame_files.DatasetError


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
    """MONAI Label's LocalDatastore that stores only what it can use, under names only (lib/names.py).

    Args:
        class_table: the served bundle's class table (lib/labels.py ``class_table``); label values are
            checked against it.
        bundle: the bundle folder whose frame reader checks frames.
    """

    def __init__(self, *args, class_table: dict, bundle: str, **kwargs) -> None:
        self.frame_reader = bundle_frame_reader(bundle)
        #: the bundle's video reader and overlay video writer (lib/videos.py)
        self.video_io = import_from_bundle(bundle, "scripts.data.video_io")
        super().__init__(*args, **kwargs)
        self.class_table = class_table

    def _inside_studies(self, path: str, what: str) -> str:
        return check_inside(self._datastore.image_path(), path, what)

    def add_image(self, image_id, image_filename, image_info):
        """Refused (400) unless ``image_id`` is a name and the file a readable frame of at most ``max_pixels``;
        refused (409) over an image that has labels (they were drawn on the old frame) or is stored in
        another format (its file would stay beside the new one)."""
        check_name(image_id, "image id")
        extension = os.path.splitext(image_filename)[1]
        self._inside_studies(os.path.join(self._datastore.image_path(), image_id + extension), "image id")
        problem = pixels_problem(image_filename) or frame_problem(image_filename, self.frame_reader)
        if problem:
            raise HTTPException(status_code=400, detail=f"image {image_id!r} refused: {problem}")
        existing = self._datastore.objects.get(image_id)
        if existing is not None:
            tags = sorted(tag for tag in existing.labels if self.get_label_uri(image_id, tag))
            if tags:
                raise HTTPException(
                    status_code=409,
                    detail=(
                        f"image {image_id!r} has labels {tags}, drawn on the frame stored now: the replacement is "
                        f"refused and the labels kept. Upload the new frame under another id, or delete the labels "
                        f"first (DELETE /datastore/label?id={image_id}&tag=TAG) if they no longer apply"
                    ),
                )
            if existing.image.ext != extension:
                raise HTTPException(
                    status_code=409,
                    detail=(
                        f"image {image_id!r} is stored as {image_id}{existing.image.ext}: a replacement must be of that "
                        f"format ({extension or 'no extension'} sent), or use another id"
                    ),
                )
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
            labels = {
                tag: label
                for tag, label in entry.labels.items()
                if os.path.exists(os.path.join(model.label_path(tag), self._filename(image_id, label.ext)))
            }
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

    def video_frames(self, video: str) -> list[tuple[str, dict, dict[str, dict]]]:
        """The frames of ``video`` (image info ``video``, lib/videos.py) in frame order: (image id, image info,
        {label tag: label info}) each."""
        self.reload()
        frames = [
            (image_id, entry.image.info, {tag: label.info for tag, label in entry.labels.items()})
            for image_id, entry in list(self._datastore.objects.items())
            if entry.image.info.get("video") == video
        ]
        return sorted(frames, key=lambda frame: frame[1].get("frame_index", 0))

    def videos(self) -> list[str]:
        """The ids of the videos whose frames the datastore holds."""
        self.reload()
        return sorted(
            {e.image.info["video"] for e in list(self._datastore.objects.values()) if e.image.info.get("video")}
        )

    def save_label(self, image_id, label_filename, label_tag, label_info):
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        self._inside_studies(os.path.join(self._datastore.label_path(label_tag), image_id), "label tag")
        problem = label_problem(
            label_filename, self.get_image_uri(image_id), self.class_table
        ) or declared_names_problem(label_info or {}, self.class_table)
        if problem:
            raise HTTPException(status_code=400, detail=f"label for {image_id!r} refused: {problem}")
        if label_tag == REVIEWED_TAG:
            label_info = {**(label_info or {}), "review": self._review(image_id, label_filename)}
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def _review(self, image_id: str, label_filename: str) -> str:
        """``reviewed`` when the saved label map equals the frame's pre-label (tag ``original``), else
        ``corrected`` (also when there is no pre-label: the map was drawn)."""
        import numpy as np
        from PIL import Image

        pre_label = self.get_label_uri(image_id, PRE_LABEL_TAG)
        if not pre_label or not os.path.isfile(pre_label):
            return "corrected"
        with Image.open(pre_label) as before, Image.open(label_filename) as after:
            same = np.array_equal(np.asarray(before), np.asarray(after))
        return "reviewed" if same else "corrected"
