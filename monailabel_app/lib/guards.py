"""MONAI Label 0.8.5 endpoints that answered 500, or 200 and failed later, answered here at once with a 4xx and
the reason; and the endpoints the app replaces for safety (model upload, next sample).

- ``PUT /model/<name>``: the upload must load into this bundle's network (the bundle's own
  ``check_model_file``: weights only, strict), else 400 and the served ``models/model.pt`` is untouched; a
  checked file replaces it in one rename (MONAI Label copied any file over it: every inference then failed).
- ``POST /scoring/<method>``, ``POST /batch/infer/<model>``: 404 for a method or model the app does not have
  (MONAI Label answered 200 and the background task failed).
- ``PUT /datastore/image/info``, ``/label/info``, ``/updatelabelinfo``: 400 for info that is not a JSON
  object, 404 for an image or label not in the datastore (500 before).
- ``POST /activelearning/<strategy>``: the app's ``next_sample`` (404 for an unknown strategy, frames reserved
  per client: lib/reservations.py); the reply is the frame's id and its score, not its path on the server.
- :func:`check_infer_request`: ``device`` and ``result_extension`` of an inference request (500 before).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Optional

import torch
from fastapi import File, Form, HTTPException, UploadFile
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType

logger = logging.getLogger(__name__)

#: a result file extension: a dot and letters/digits, once or twice (".png", ".nii.gz")
RESULT_EXTENSION = re.compile(r"^(\.[A-Za-z0-9]{1,8}){1,2}$")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_infer_request(request: dict) -> None:
    """400 for a ``device`` or ``result_extension`` the inference could not use (MONAI Label answered 500)."""
    device = request.get("device")
    if device not in (None, "") and not isinstance(device, list):
        match = DEVICE.match(str(device))
        if not match:
            raise HTTPException(status_code=400, detail=f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if match.group(2) and int(match.group(2)[1:]) >= max(torch.cuda.device_count(), 1):
            raise HTTPException(
                status_code=400, detail=f"device {device!r}: this server has {torch.cuda.device_count()} GPU(s)"
            )
    extension = request.get("result_extension")
    if extension not in (None, "") and not (isinstance(extension, str) and RESULT_EXTENSION.match(extension)):
        raise HTTPException(
            status_code=400, detail=f"result_extension must be a file extension such as '.png', got {extension!r}"
        )


def json_object(text: str, what: str, example: str = "") -> dict:
    """``text`` as a JSON object ({} when empty), else HTTPException 400 naming ``what`` (and ``example``)."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise HTTPException(
            status_code=400,
            detail=f"{what} is not JSON ({error}): send a JSON object{', e.g. ' + example if example else ''}",
        ) from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _instance():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _bundle_model_checker(bundle: str):
    """The bundle's own ``check_model_file`` (imported as MONAI Label imports a bundle's code)."""
    import sys

    from monailabel.utils.others.class_utils import unload_module

    sys.path.insert(0, bundle)
    unload_module("scripts")
    try:
        from scripts.monailabel_glue.bundle_folder import check_model_file
    finally:
        sys.path.remove(bundle)
    return check_model_file


def update_model_checked(model: str, upload_file: str) -> dict:
    """Replace ``model``'s ``models/model.pt`` with ``upload_file`` if it loads into the bundle's network."""
    from monailabel.utils.others.generic import file_checksum

    from lib.server import inference_lock

    instance = _instance()
    task = instance._infers.get(model)
    if task is None:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r}; models: {sorted(instance._infers)}")
    target = task.get_path(False)
    bundle = task.bundle_path
    with inference_lock:  # the bundle's scripts are (re)imported here: not while an inference runs
        try:
            _bundle_model_checker(bundle)(bundle, upload_file)
        except (ValueError, RuntimeError, OSError) as error:
            raise HTTPException(
                status_code=400,
                detail=f"model file refused, the served model is unchanged: "
                f"{str(error).replace(upload_file, 'the upload')}",
            ) from None
        os.replace(upload_file, target)  # same folder: one rename, never a half-written model.pt
    logger.info("model %s: %s replaced by an upload that loads into the network", model, target)
    return {"checksum": file_checksum(target), "modified_time": int(os.stat(target).st_mtime)}


async def api_update_model(model: str, file: UploadFile = File(...)):
    from starlette.concurrency import run_in_threadpool

    instance = _instance()
    task = instance._infers.get(model)
    if task is None:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r}; models: {sorted(instance._infers)}")
    folder = os.path.dirname(task.get_path(False))
    descriptor, upload = tempfile.mkstemp(prefix=".upload-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            while chunk := await file.read(1 << 20):
                handle.write(chunk)
        return await run_in_threadpool(update_model_checked, model, upload)
    finally:
        if os.path.exists(upload):
            os.remove(upload)


def _known(name: str, names, what: str) -> None:
    if name not in names:
        raise HTTPException(
            status_code=404, detail=f"unknown {what} {name!r}; this app has {sorted(names)} (GET /info/ lists them)"
        )


def _scoring_known_only(endpoint):
    async def api_run_method(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False):
        _known(method, _instance()._scoring_methods, "scoring method")
        return await endpoint(method=method, params=params, run_sync=run_sync, user=_user())

    return api_run_method


def _batch_known_only(endpoint):
    async def api_run(
        model: str,
        images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
    ):
        _known(model, _instance()._infers, "model")
        return await endpoint(model=model, images=images, params=params or {}, run_sync=run_sync, user=_user())

    return api_run


def _user():
    from monailabel.endpoints.user.auth import DEFAULT_USER

    return DEFAULT_USER


def api_put_image_info(image: str, info: str = Form("{}")):
    values = json_object(info, "info")
    datastore = _instance().datastore()
    if image not in datastore.list_images():
        raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
    return datastore.update_image_info(image, values)


def _put_label_info(label: str, tag: str, info: str):
    values = json_object(info, "info")
    datastore = _instance().datastore()
    if tag not in datastore.get_labels_by_image_id(label):
        raise HTTPException(status_code=404, detail=f"no label {label!r} with tag {tag!r} in the datastore")
    return datastore.update_label_info(label, tag, values)


def api_put_label_info(label: str, tag: str, info: str = Form("{}")):
    return _put_label_info(label, tag, info)


def api_update_label_info(label: str, tag: str, params: str = Form("{}")):
    return _put_label_info(label, tag, params)


def api_next_sample(strategy: str, params: Optional[dict] = None):
    request = {
        **(_instance().info().get("config", {}).get("activelearning", {})),
        **(params or {}),
        "strategy": strategy,
    }
    return _instance().next_sample(request) or {}


def routes() -> list[tuple[str, str, object]]:
    """(path under MONAI Label's API prefix, method, endpoint) of the routes put in front of MONAI Label's."""
    from monailabel.endpoints import batch_infer, scoring

    return [
        ("/model/{model}", "PUT", api_update_model),
        ("/scoring/{method}", "POST", _scoring_known_only(scoring.api_run_method)),
        ("/batch/infer/{model}", "POST", _batch_known_only(batch_infer.api_run)),
        ("/datastore/image/info", "PUT", api_put_image_info),
        ("/datastore/label/info", "PUT", api_put_label_info),
        ("/datastore/updatelabelinfo", "PUT", api_update_label_info),
        ("/activelearning/{strategy}", "POST", api_next_sample),
    ]


def install_guards(fastapi_app, more=()) -> None:
    """Put :func:`routes` and ``more`` (the same triples) first in the app's route list (FastAPI serves the
    first route that matches)."""
    from fastapi.routing import APIRoute
    from monailabel.config import settings

    table = fastapi_app.router.routes
    if any(getattr(getattr(r, "endpoint", None), "_surgicalsam_guard", False) for r in table):
        return
    for path, method, endpoint in reversed([*routes(), *more]):
        endpoint._surgicalsam_guard = True
        table.insert(
            0,
            APIRoute(
                settings.MONAI_LABEL_API_STR + path,
                endpoint,
                methods=[method],
                name=f"surgicalsam_guard_{endpoint.__name__}",
                include_in_schema=False,
            ),
        )
