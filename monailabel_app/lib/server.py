"""What the app changes in MONAI Label's web server (only in the server process, once the app is made).

- ``POST /infer/<model>`` runs in a worker thread, one inference at a time (they share one network), instead
  of on the server's event loop: MONAI Label 0.8.5 declares it ``async`` and runs the whole inference inside
  it, so ``/info/``, the datastore and the review page waited behind every inference.
- Malformed requests answer 400 with the reason instead of 500: a ``params`` form field that is not JSON
  (any endpoint), and an inference request with neither an image id nor a file.
- ``POST /train/<model>`` of a model the app does not train answers 404 with the models it does (MONAI Label
  0.8.5 answers 200 and lets the training subprocess fail).
- ``/review/`` serves the review page (``static/``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Sequence

from fastapi import HTTPException

from .guards import json_object
from .names import check_first

logger = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
#: held while an inference runs (the three models share one network); the model upload check holds it too
inference_lock = threading.Lock()


def server_app():
    """MONAI Label's FastAPI app when this process is the server (None in training or scoring subprocesses)."""
    module = sys.modules.get("monailabel.app")
    return getattr(module, "app", None)


def _check_params(kwargs: dict) -> None:
    params = kwargs.get("params")
    if isinstance(params, str) and params:
        json_object(params, "params", example='params={"device": "cpu"}')


def _json_errors_are_400(endpoint):
    return check_first(endpoint, _check_params)


def _threaded_inference(endpoint):
    from starlette.concurrency import run_in_threadpool

    @functools.wraps(endpoint)
    async def wrapped(
        background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None, user=None
    ):
        _check_params({"params": params})
        if not file and not image and not session_id:
            raise HTTPException(status_code=400, detail="give an image id (?image=ID) or upload a frame (file=...)")

        from .uploads import run_inference

        def run():
            with inference_lock:
                return run_inference(background_tasks, model, image, session_id, params, file, label, output)

        return await run_in_threadpool(run)

    return wrapped


def _known_trainers_only(endpoint, trainers: Sequence[str]):
    @functools.wraps(endpoint)
    async def wrapped(*args, **kwargs):
        model = kwargs.get("model")
        if model not in trainers:
            raise HTTPException(
                status_code=404,
                detail=f"unknown model {model!r} to train; this app trains {list(trainers)} (GET /info/ lists them)",
            )
        return await endpoint(*args, **kwargs)

    return wrapped


#: MONAI Label 0.8.5 endpoints wrapped here: (module, endpoint function, path, method)
WRAPPED = (
    ("monailabel.endpoints.infer", "api_run_inference", "/infer/{model}", "POST"),
    ("monailabel.endpoints.train", "api_run_model", "/train/{model}", "POST"),
    ("lib.uploads", "api_add_image", "/datastore/image", "PUT"),
    ("lib.uploads", "api_add_image", "/datastore/", "PUT"),
    ("lib.uploads", "api_save_label", "/datastore/label", "PUT"),
)


def install(fastapi_app, *, trainers: Sequence[str]) -> None:
    """Put the wrapped endpoints in front of MONAI Label's (same paths, parameters and dependencies), and
    mount the review page. (FastAPI serves included routers through their own route lists, so the routes
    are added first in the app's list rather than swapped inside MONAI Label's routers.)

    Args:
        fastapi_app: MONAI Label's FastAPI app (:func:`server_app`).
        trainers: the names of the app's training tasks, the only models ``POST /train/<model>`` takes.
    """
    import importlib

    from fastapi.routing import APIRoute
    from fastapi.staticfiles import StaticFiles
    from monailabel.config import settings

    routes = fastapi_app.router.routes
    if any(getattr(getattr(r, "endpoint", None), "_surgicalsam", False) for r in routes):
        return
    for module, name, path, method in reversed(WRAPPED):
        original = getattr(importlib.import_module(module), name)
        if name == "api_run_inference":
            endpoint = _threaded_inference(original)
        elif name == "api_run_model":
            endpoint = _known_trainers_only(original, tuple(trainers))
        else:
            endpoint = _json_errors_are_400(original)
        endpoint._surgicalsam = True
        routes.insert(
            0,
            APIRoute(
                settings.MONAI_LABEL_API_STR + path,
                endpoint,
                methods=[method],
                name=f"surgicalsam_{name}",
                include_in_schema=False,
            ),
        )
    from .names import guard_names
    from .uploads import limit_request_bodies

    guard_names(fastapi_app)
    limit_request_bodies(fastapi_app)
    if os.path.isdir(STATIC_DIR):
        fastapi_app.mount("/review", StaticFiles(directory=STATIC_DIR, html=True), name="review")
    logger.info(
        "SurgicalSAM app: inference in a worker thread, 400 for malformed params, 404 for training an "
        "unknown model, /review/ page"
    )
