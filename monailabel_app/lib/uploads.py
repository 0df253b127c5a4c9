"""Bounded uploads: how many bytes a request may send, how many pixels a frame may have, and temporary
files that are gone whatever the outcome.

MONAI Label 0.8.5 copies every upload whole to a named temporary file and removes it in a background task
that only runs when the endpoint succeeds, so every refused upload left its file behind; it stores a frame
of any pixel count (a 136 KB PNG of 12000x12000 took inference to 18.9 GB). Here:

- every POST/PUT request body is counted while it arrives and refused with 413 past ``max_upload_mb``
  (:func:`limit_request_bodies`; a ``Content-Length`` over the limit is refused before any byte is stored);
- an upload is copied in chunks (bounded again) to a private temporary folder, under an extension taken
  from its content (never from the client's file name), and removed when the request ends, answered or
  refused (:func:`uploaded`);
- a frame's pixel count is read from its header, without decoding it, and refused with 400 past
  ``max_pixels`` (:func:`pixels_problem`), at upload and before inference of a datastore frame.

``PUT /datastore/image`` and ``PUT /datastore/label`` (:func:`api_add_image`, :func:`api_save_label`) and
inference (:func:`run_inference`) are MONAI Label's endpoints rewritten on these; inference takes an image
id of the datastore or an uploaded frame, never a server path (``is_upload``).

Limits (``--conf``): ``max_pixels`` (default 4096 x 4096 = 16777216: 1920x1080 and 1280x1024 frames pass),
``max_upload_mb`` (default 64), and for a video uploaded whole (``PUT /video/<id>``, lib/videos.py)
``max_video_mb`` (default 1024) and ``max_video_frames`` (default 20000).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from typing import Optional

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD_MB = 64
DEFAULT_MAX_VIDEO_MB = 1024
DEFAULT_MAX_VIDEO_FRAMES = 20000
#: the routes (under MONAI Label's API prefix) whose uploads are videos, bounded by ``max_video_mb``
VIDEO_ROUTES = "/video/"
CHUNK = 1 << 20
#: file extension of each format an upload may have, from its content
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}


class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20
    max_video_bytes: int = DEFAULT_MAX_VIDEO_MB << 20
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES


LIMITS = Limits()


def configure(conf: dict) -> Limits:
    """Set :data:`LIMITS` from the app's ``--conf`` (``max_pixels``, ``max_upload_mb``, ``max_video_mb``,
    ``max_video_frames``: whole numbers >= 1)."""
    settings = (
        ("max_pixels", DEFAULT_MAX_PIXELS, "max_pixels", 0),
        ("max_upload_mb", DEFAULT_MAX_UPLOAD_MB, "max_upload_bytes", 20),
        ("max_video_mb", DEFAULT_MAX_VIDEO_MB, "max_video_bytes", 20),
        ("max_video_frames", DEFAULT_MAX_VIDEO_FRAMES, "max_video_frames", 0),
    )
    for key, default, attribute, shift in settings:
        value = conf.get(key) or default
        if not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"--conf {key} must be a whole number >= 1, got {value!r}")
        setattr(LIMITS, attribute, int(value) << shift)
    return LIMITS


def pixels_problem(path: str, what: str = "frame") -> str | None:
    """Why the image file ``path`` has too many pixels (None when it has at most ``max_pixels`` or is not
    an image PIL reads: the readers say why then). Reads the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        return f"{what} refused: {error}"
    except Exception:
        return None
    if width * height > LIMITS.max_pixels:
        return (
            f"{what} of {width}x{height} = {width * height} pixels refused: more than max_pixels "
            f"{LIMITS.max_pixels} (the server's --conf max_pixels)"
        )
    return None


def image_format(path: str) -> str | None:
    """PIL's name of the file's format (``PNG``, ``JPEG``...), None when PIL cannot open it."""
    try:
        with Image.open(path) as image:
            return image.format
    except Exception:
        return None


# ------------------------------------------------------------------------------------- temporary files
_folder_lock = threading.Lock()
_folder: list[str] = []
_uploads: set[str] = set()
_uploads_lock = threading.Lock()


def upload_folder() -> str:
    """This server's private folder for uploads (0700, made at first use)."""
    with _folder_lock:
        if not _folder or not os.path.isdir(_folder[0]):
            _folder[:] = [tempfile.mkdtemp(prefix="surgicalsam-uploads-")]
        return _folder[0]


def _too_large(video: bool = False) -> HTTPException:
    key, limit = ("max_video_mb", LIMITS.max_video_bytes) if video else ("max_upload_mb", LIMITS.max_upload_bytes)
    return HTTPException(
        status_code=413, detail=f"upload larger than {key} {limit >> 20} MiB (the server's --conf {key})"
    )


@contextlib.contextmanager
def readable(path: str):
    """Let inference read ``path`` (an upload, a session's image) while the block runs (:func:`is_upload`)."""
    with _uploads_lock:
        _uploads.add(path)
    try:
        yield path
    finally:
        with _uploads_lock:
            _uploads.discard(path)


@contextlib.contextmanager
def uploaded(upload: UploadFile, what: str, video: bool = False):
    """The path of a copy of ``upload`` in :func:`upload_folder`, named ``<random><extension of its format>``
    (no extension when PIL does not know it), removed when the block ends whatever happens in it. Bounded by
    ``max_upload_mb`` (``video``: ``max_video_mb``)."""
    handle, path = tempfile.mkstemp(dir=upload_folder(), prefix=f"{what}-")
    final = path
    limit = LIMITS.max_video_bytes if video else LIMITS.max_upload_bytes
    try:
        size = 0
        with os.fdopen(handle, "wb") as output:
            for chunk in iter(lambda: upload.file.read(CHUNK), b""):
                size += len(chunk)
                if size > limit:
                    raise _too_large(video)
                output.write(chunk)
        extension = "" if video else EXTENSIONS.get(image_format(path) or "", "")
        if extension:
            final = path + extension
            os.replace(path, final)
        with readable(final):
            yield final
    finally:
        for name in {path, final}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)


def is_upload(path) -> bool:
    """Whether ``path`` is an upload of a request being answered now (inference may read it)."""
    with _uploads_lock:
        return path in _uploads


def check_frame_upload(path: str, what: str) -> str:
    """``path`` (from :func:`uploaded`) when it is a frame format the datastore lists and of at most
    ``max_pixels``, else HTTPException 400 with the reason."""
    if os.path.splitext(path)[1] not in EXTENSIONS.values():
        raise HTTPException(status_code=400, detail=f"cannot read frame: the {what} is not a PNG, JPEG or TIFF image")
    problem = pixels_problem(path, what)
    if problem:
        raise HTTPException(status_code=400, detail=problem)
    return path


# ------------------------------------------------------------------------------------------ endpoints
def _params(params: str) -> dict:
    return json.loads(params) if params else {}  # malformed params are answered 400 before this runs


def api_add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """``PUT /datastore/image``: MONAI Label's, on a bounded upload removed whatever the outcome. The image id
    is ``image``, else the upload's file name without its extension (either checked as a name); ``replaced``
    says whether a stored frame of that id was replaced (one with labels is refused, lib/datastore.py)."""
    from monailabel.interfaces.utils.app import app_instance

    from .names import check_name

    image_id = image or os.path.splitext(os.path.basename(file.filename or ""))[0]
    check_name(image_id, "image id")
    datastore = app_instance().datastore()
    image_info = _params(params)
    if user is not None and getattr(user, "username", None):
        image_info["user"] = user.username
    replaced = image_id in datastore.list_images()
    with uploaded(file, "image") as path:
        stored = datastore.add_image(image_id, check_frame_upload(path, "uploaded frame"), image_info)
    return {"image": stored, "replaced": replaced}


def api_save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """``PUT /datastore/label``: MONAI Label's, on a bounded upload removed whatever the outcome."""
    from monailabel.interfaces.datastore import DefaultLabelTag
    from monailabel.interfaces.utils.app import app_instance

    from .names import check_name

    check_name(image, "image id")
    tag = check_name(tag or DefaultLabelTag.FINAL.value, "label tag")
    instance = app_instance()
    with uploaded(label, "label") as path:
        label_id = instance.datastore().save_label(image, path, tag, _params(params))
    result = instance.on_save_label(image, label_id) or {}
    result.update({"image": image, "label": label_id})
    return result


def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
    """MONAI Label's ``run_inference`` (``POST /infer/<model>``) with the frame (and scribble label) uploads
    bounded and removed whatever the outcome, and no image named by ``params``."""
    from monailabel.endpoints.infer import send_response
    from monailabel.interfaces.utils.app import app_instance

    from .names import check_name

    if not file and not image and not session_id:
        raise HTTPException(status_code=400, detail="give an image id (?image=ID) or upload a frame (file=...)")
    if image and not file:
        check_name(image, "image id")
    if output == "dicom_seg":
        raise HTTPException(status_code=400, detail="output dicom_seg needs a DICOM datastore; this one holds frames")
    request_params = _params(params)
    if "image" in request_params:
        raise HTTPException(
            status_code=400,
            detail="params may not name the image: give the image id in the "
            "query (?image=ID) or upload the frame (file=...)",
        )
    instance = app_instance()
    request = {"model": model, "image": image}
    with contextlib.ExitStack() as uploads:
        if file:
            request["image"] = check_frame_upload(uploads.enter_context(uploaded(file, "frame")), "uploaded frame")
        if label:
            request["label"] = uploads.enter_context(uploaded(label, "label"))
        request.update(instance.info().get("config", {}).get("infer", {}))
        request.update(request_params)
        if session_id:
            session = instance.sessions().get_session(session_id)
            if session:
                request["image"] = uploads.enter_context(readable(session.image))
                request["session"] = session.to_json()
        result = instance.infer(request)
        if result is None:
            raise HTTPException(status_code=500, detail="Failed to execute infer")
        return send_response(instance.datastore(), result, output, background_tasks)


# ------------------------------------------------------------------------------------ request bodies
class _BodyTooLarge(BaseException):
    """Raised from inside a route's body parsing, so not an ``Exception``: FastAPI turns those into 400."""


async def _drain(receive, cap: int) -> None:
    """Read and drop the rest of a refused body (at most ``cap`` bytes), so that the client, still sending,
    reads the 413 instead of a reset connection."""
    dropped = 0
    while dropped <= cap:
        message = await receive()
        dropped += len(message.get("body", b""))
        if message.get("type") != "http.request" or not message.get("more_body"):
            return


def _bounded(route_app):
    async def app(scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await route_app(scope, receive, send)
        video = scope.get("path", "").startswith(settings.MONAI_LABEL_API_STR + VIDEO_ROUTES)
        limit = (LIMITS.max_video_bytes if video else LIMITS.max_upload_bytes) + (1 << 16)  # + multipart framing
        drain_cap = 4 * limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(receive, drain_cap)
            return await _answer_too_large(send, video)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body"):
                    await _drain(receive, drain_cap)
                raise _BodyTooLarge()
            return message

        try:
            await route_app(scope, counted, send)
        except _BodyTooLarge:
            await _answer_too_large(send, video)

    return app


async def _answer_too_large(send, video: bool = False):
    body = json.dumps({"detail": _too_large(video).detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def limit_request_bodies(fastapi_app) -> None:
    """Count the body of every POST/PUT/PATCH request to ``fastapi_app`` while it arrives (at its router, so
    every route and mounted app): 413 past ``max_upload_mb`` plus 64 KiB of form framing."""
    router = fastapi_app.router
    if not getattr(router.middleware_stack, "_bounded", False):
        router.middleware_stack = _bounded(router.middleware_stack)
        router.middleware_stack._bounded = True
