"""A video as the unit of work: upload it whole, list its frames and their review state, export its labels.

- ``PUT /video/<id>`` (multipart ``file``): an mp4 (or avi, mov, mkv), or a zip of frames (PNG, JPEG or TIFF,
  in the order of their names; ``params`` ``{"fps": F}``, default 25). Its frames are stored in the datastore as
  images ``<id>_frame<NNNNN>`` (index from 0, at least 5 digits) with image info ``{"video": id,
  "frame_index": n, "fps": f}``. The id is a name (lib/names.py) short enough for its frames' ids; a video
  whose frames are stored already is refused (409). Bounded by ``max_video_mb`` and ``max_video_frames``
  (lib/uploads.py), each frame by ``max_pixels``; a refused video leaves no frame behind.
- ``GET /video/``: the videos; ``GET /video/<id>``: its frames in order with their state (:func:`frame_state`)
  and the uncertainty of their pre-label (lib/batch.py).
- ``GET /video/<id>/export``: a zip of ``labels/<frame id>.png`` (the label a person saved, else the pre-label),
  ``overlay.mp4`` (frames tinted by class, the bundle's overlay writer), ``annotations.json`` (COCO-style: one
  image per frame, one annotation per class shown, its mask as uncompressed RLE, box and area) and
  ``class_table.json``.

Pre-labelling a video is MONAI Label's ``POST /batch/infer/surgicalsam`` with params ``{"video": id}``
(lib/batch.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile

from fastapi import File, Form, HTTPException, UploadFile
from fastapi.responses import Response

from .datastore import PRE_LABEL_TAG, REVIEWED_TAG
from .guards import json_object
from .names import check_name

logger = logging.getLogger(__name__)

FRAME_INFIX = "_frame"
FRAME_DIGITS = 5
#: the longest video id whose frame ids are names (lib/names.py: 128 characters)
MAX_VIDEO_ID = 128 - len(FRAME_INFIX) - FRAME_DIGITS
DEFAULT_FOLDER_FPS = 25.0
ZIP_MAGIC = b"PK\x03\x04"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: frame states, in the order of the review
STATES = ("new", "pre-labelled", "reviewed", "corrected")


def frame_id(video: str, index: int) -> str:
    return f"{video}{FRAME_INFIX}{int(index):0{FRAME_DIGITS}d}"


def check_video_id(video) -> str:
    check_name(video, "video id")
    if len(video) > MAX_VIDEO_ID:
        raise HTTPException(
            status_code=400,
            detail=f"video id of {len(video)} characters: at most {MAX_VIDEO_ID}, so that its frames' ids "
            f"({frame_id('ID', 0)}) are names",
        )
    return video


def frame_state(labels: dict[str, dict]) -> str:
    """A frame's state from its labels ({tag: label info}): ``reviewed`` (a person saved the pre-label as it
    was), ``corrected`` (saved a changed or drawn label; lib/datastore.py decides at save), ``pre-labelled``
    (a model's label only) or ``new``."""
    if REVIEWED_TAG in labels:
        return "reviewed" if (labels[REVIEWED_TAG] or {}).get("review") == "reviewed" else "corrected"
    return "pre-labelled" if PRE_LABEL_TAG in labels else "new"


def _instance():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _frames_or_404(datastore, video: str) -> list:
    frames = datastore.video_frames(check_video_id(video))
    if not frames:
        raise HTTPException(status_code=404, detail=f"video {video!r} is not in the datastore")
    return frames


# ------------------------------------------------------------------------------------------------ upload
def _unzip_frames(archive: str, folder: str) -> str:
    """The frames of the zip ``archive`` extracted flat into ``folder`` (names reduced to their base name,
    only frame files; at most ``max_video_frames`` and ``max_video_mb`` uncompressed)."""
    from .uploads import LIMITS

    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir() and m.filename.lower().endswith(FRAME_SUFFIXES)]
            if not members:
                raise HTTPException(status_code=400, detail="the zip holds no frames (PNG, JPEG or TIFF files)")
            if len(members) > LIMITS.max_video_frames:
                raise HTTPException(
                    status_code=400,
                    detail=f"the zip holds {len(members)} frames: more than max_video_frames {LIMITS.max_video_frames}",
                )
            if sum(m.file_size for m in members) > LIMITS.max_video_bytes:
                raise HTTPException(status_code=413, detail="the zip's frames unpack to more than max_video_mb")
            names = set()
            for member in members:
                name = os.path.basename(member.filename.replace("\\", "/"))
                if not name or name.startswith(".") or name in names:
                    raise HTTPException(
                        status_code=400,
                        detail=f"zip member {member.filename[:200]!r}: a frame name "
                        "that is hidden, empty or repeated (frames are taken flat, by name)",
                    )
                names.add(name)
                with bundle.open(member) as source, open(os.path.join(folder, name), "wb") as target:
                    shutil.copyfileobj(source, target)
    except zipfile.BadZipFile as error:
        raise HTTPException(status_code=400, detail=f"not a readable zip of frames: {error}") from None
    return folder


def store_video(datastore, video: str, source: str, fps: float, user: str | None = None) -> list[str]:
    """Store the frames of ``source`` (a video file or a folder of frames; ``fps`` for a folder) as images of
    ``video``; every frame stored is removed again if one is refused."""
    from PIL import Image

    from .uploads import LIMITS, pixels_problem

    video_io = datastore.video_io
    stored: list[str] = []
    try:
        sequence = video_io.open_sequence(source, folder_fps=fps)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(source)) as scratch:
            for count, frame in enumerate(sequence):
                if count >= LIMITS.max_video_frames:
                    raise HTTPException(
                        status_code=400, detail=f"more than max_video_frames {LIMITS.max_video_frames} frames"
                    )
                path = os.path.join(scratch, "frame.png")
                Image.fromarray(frame.image).save(path, compress_level=1)
                problem = pixels_problem(path, f"frame {frame.index}")
                if problem:
                    raise HTTPException(status_code=400, detail=problem)
                image_id = frame_id(video, frame.index)
                info = {"video": video, "frame_index": int(frame.index), "fps": float(sequence.fps)}
                if user:
                    info["user"] = user
                datastore.add_image(image_id, path, info)
                stored.append(image_id)
    except video_io.DatasetError as error:  # VideoError too: not a readable video, or a frame of the zip
        _remove(datastore, stored)
        detail = str(error).replace(source, "the upload").split("; re-export it")[0]
        raise HTTPException(status_code=400, detail=f"video {video!r} refused: {detail}") from None
    except BaseException:
        _remove(datastore, stored)
        raise
    if not stored:
        raise HTTPException(status_code=400, detail=f"video {video!r} refused: it has no frames")
    return stored


def _remove(datastore, image_ids: list[str]) -> None:
    for image_id in image_ids:
        with contextlib.suppress(Exception):
            datastore.remove_image(image_id)


def api_add_video(video: str, params: str = Form("{}"), file: UploadFile = File(...)):
    """``PUT /video/<video>``: store an uploaded video or zip of frames (see the module docstring)."""
    from .uploads import uploaded

    check_video_id(video)
    options = json_object(params, "params", example='params={"fps": 25}')
    fps = options.get("fps", DEFAULT_FOLDER_FPS)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise HTTPException(status_code=400, detail=f"fps must be a number in (0, 1000], got {fps!r}")
    datastore = _instance().datastore()
    if datastore.video_frames(video):
        raise HTTPException(
            status_code=409, detail=f"video {video!r} is in the datastore already: upload it under another id"
        )
    with uploaded(file, "video", video=True) as path:
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == ZIP_MAGIC
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as folder:
            if is_zip:
                source = _unzip_frames(path, folder)
            else:
                source = os.path.join(folder, "upload.mp4")  # the container is probed from the content
                os.link(path, source)
            stored = store_video(datastore, video, source, float(fps))
    logger.info("video %s: %d frames stored", video, len(stored))
    return {"video": video, "frames": len(stored), "first": stored[0], "last": stored[-1]}


# ----------------------------------------------------------------------------------------------- listing
def api_list_videos():
    """``GET /video/``: ``{"videos": [{"id", "frames"}]}``."""
    datastore = _instance().datastore()
    return {"videos": [{"id": video, "frames": len(datastore.video_frames(video))} for video in datastore.videos()]}


def describe_video(datastore, video: str) -> dict:
    """``{"id", "fps", "frames": [{"id", "index", "state", "presence_margin"}], "states": {state: count}}``."""
    frames, stored = [], _frames_or_404(datastore, video)
    for image_id, info, labels in stored:
        prelabel = info.get("prelabel") or {}
        frames.append(
            {
                "id": image_id,
                "index": info.get("frame_index"),
                "state": frame_state(labels),
                "presence_margin": prelabel.get("presence_margin") if PRE_LABEL_TAG in labels else None,
            }
        )
    fps = stored[0][1].get("fps")
    states = {state: sum(frame["state"] == state for frame in frames) for state in STATES}
    return {"id": video, "fps": fps, "frames": frames, "states": states}


def api_get_video(video: str):
    """``GET /video/<video>``: :func:`describe_video`."""
    return describe_video(_instance().datastore(), video)


# ------------------------------------------------------------------------------------------------ export
def _rle(mask) -> dict:
    """COCO's uncompressed RLE of a (H, W) bool mask: run lengths in column-major order, starting with 0s."""
    import numpy as np

    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1] if len(flat) else 0]])))
    return {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": list(mask.shape)}


def coco_annotations(frames: list[dict], label_maps: dict, table: dict) -> dict:
    """COCO-style annotations: ``frames`` [{"id", "index", "state"}], ``label_maps`` {frame id: (H, W) uint8}."""
    import numpy as np

    images, annotations = [], []
    for number, frame in enumerate(frames, start=1):
        label_map = label_maps.get(frame["id"])
        if label_map is None:
            continue
        height, width = label_map.shape
        images.append(
            {
                "id": number,
                "file_name": f"labels/{frame['id']}.png",
                "frame_index": frame["index"],
                "width": width,
                "height": height,
                "state": frame["state"],
            }
        )
        for value in np.unique(label_map):
            if int(value) in (0, table["unlabelled"]):
                continue
            mask = label_map == value
            rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": int(value),
                    "segmentation": _rle(mask),
                    "area": int(mask.sum()),
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(v), "name": name} for v, name in table["classes"].items() if int(v) != 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def export_video(datastore, video: str, table: dict) -> bytes:
    """The zip of a video's labels (module docstring)."""
    import numpy as np
    from PIL import Image

    description = describe_video(datastore, video)
    label_maps, archive = {}, io.BytesIO()
    class_names = [name for value, name in table["classes"].items() if int(value) != 0]
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        writer = datastore.video_io.OverlayVideoWriter(
            os.path.join(scratch, "overlay.mp4"), description["fps"] or DEFAULT_FOLDER_FPS, class_names
        )
        for frame in description["frames"]:
            label_file = next(
                (
                    path
                    for path in (datastore.get_label_uri(frame["id"], tag) for tag in (REVIEWED_TAG, PRE_LABEL_TAG))
                    if path and os.path.isfile(path)
                ),
                None,
            )
            image = np.asarray(Image.open(datastore.get_image_uri(frame["id"])).convert("RGB"))
            if label_file is None:
                label_map = np.zeros(image.shape[:2], np.uint8)
            else:
                with Image.open(label_file) as label:
                    label_map = np.asarray(label).astype(np.uint8)
                label_maps[frame["id"]] = label_map
                out.write(label_file, f"labels/{frame['id']}.png")
            writer.write(image, label_map)
        writer.close()
        out.write(os.path.join(scratch, "overlay.mp4"), "overlay.mp4")
        coco = coco_annotations(description["frames"], label_maps, table)
        coco["info"] = {"video": video, "fps": description["fps"], "description": "instances per frame, by class"}
        out.writestr("annotations.json", json.dumps(coco))
        out.writestr("class_table.json", json.dumps(table, indent=2))
    return archive.getvalue()


def api_export_video(video: str):
    """``GET /video/<video>/export``: :func:`export_video` as ``<video>_labels.zip``."""
    instance = _instance()
    content = export_video(instance.datastore(), video, instance.class_table)
    return Response(
        content,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{video}_labels.zip"'},
    )


def routes() -> list[tuple[str, str, object]]:
    """(path under MONAI Label's API prefix, method, endpoint) of the video routes."""
    return [
        ("/video/", "GET", api_list_videos),
        ("/video/{video}", "GET", api_get_video),
        ("/video/{video}", "PUT", api_add_video),
        ("/video/{video}/export", "GET", api_export_video),
    ]
