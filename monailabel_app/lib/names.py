"""Image ids and label tags are names, never paths: one check for every endpoint that takes them.

MONAI Label 0.8.5 joins ids and tags into file paths as they come (``PUT /datastore/label?tag=..`` wrote
the label map over the frame itself; ``PUT /datastore/image?image=../../x`` wrote outside the studies
folder). Here a name is 1..128 characters of ``A-Z a-z 0-9 _ - + .``, not starting with a dot (so no
``.``, ``..`` or hidden files) and without separators; the datastore (lib/datastore.py) also checks that the
file a name resolves to lies inside the studies folder.

:func:`guard_names` wraps every route of the server whose endpoint takes an id or a tag (query or path
parameters ``image``, ``label``, ``id``, ``tag``, ``video``; the keys ``image``, ``label_tag``, ``tag`` and
``video`` of its ``params``) so
that a bad one is answered 400 with the reason before MONAI Label's code runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re

from fastapi import HTTPException

NAME = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_+.\-]{0,127}$")
RULE = (
    "1 to 128 characters of letters, digits, '_', '-', '+' and '.', not starting with '.' "
    "(names, not paths: no '/', '\\\\', '..')"
)
#: endpoint arguments (query, form or path) that hold an image id, a label tag or a video id (lib/videos.py)
NAME_ARGUMENTS = {"image": "image id", "label": "image id", "id": "image id", "tag": "label tag", "video": "video id"}
#: keys of an endpoint's params (JSON) that hold a label tag or a video id
PARAMS_NAMES = {"label_tag": "label tag", "tag": "label tag", "video": "video id"}


def name_problem(value, what: str) -> str | None:
    """Why ``value`` is not a valid ``what`` (None when it is one)."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not NAME.match(value):
        return f"{what} {value[:200]!r} is not a name: {RULE}"
    return None


def check_name(value, what: str) -> str:
    """``value`` when it is a valid ``what``, else HTTPException 400 with the reason."""
    problem = name_problem(value, what)
    if problem:
        raise HTTPException(status_code=400, detail=problem)
    return value


def check_inside(folder: str, path: str, what: str) -> str:
    """``path`` when it resolves (links followed) inside ``folder``, else HTTPException 400."""
    root = os.path.realpath(folder)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise HTTPException(status_code=400, detail=f"{what} resolves outside the studies folder: refused")
    return path


def _params(value) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}  # malformed params are answered 400 by the endpoint's own check
        return value if isinstance(value, dict) else {}
    return {}


def check_arguments(kwargs: dict) -> None:
    """HTTPException 400 for an id or tag among an endpoint's arguments that is not a name, and for an image
    given inside ``params`` (an image goes in the query, ``?image=ID``, or is uploaded)."""
    for argument, what in NAME_ARGUMENTS.items():
        value = kwargs.get(argument)
        if isinstance(value, str) and value:
            check_name(value, what)
    for argument in ("params", "body"):
        params = _params(kwargs.get(argument))
        if "image" in params:
            raise HTTPException(
                status_code=400,
                detail="params may not name the image: give the image id in "
                "the query (?image=ID) or upload the frame (file=...)",
            )
        for key, what in PARAMS_NAMES.items():
            if params.get(key) not in (None, ""):
                check_name(params[key], what)


def check_first(endpoint, check):
    """``endpoint`` (sync or async) that runs ``check(kwargs)`` before it; the same signature for FastAPI."""
    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def wrapped(*args, **kwargs):
            check(kwargs)
            return await endpoint(*args, **kwargs)
    else:

        @functools.wraps(endpoint)
        def wrapped(*args, **kwargs):
            check(kwargs)
            return endpoint(*args, **kwargs)

    return wrapped


def checked_names(endpoint):
    """``endpoint`` with :func:`check_arguments` first (:func:`check_first`)."""
    if getattr(endpoint, "_names_checked", False):
        return endpoint
    wrapped = check_first(endpoint, check_arguments)
    wrapped._names_checked = True
    return wrapped


def _takes_names(endpoint) -> bool:
    try:
        parameters = inspect.signature(endpoint).parameters
    except (TypeError, ValueError):
        return False
    return bool(set(parameters) & (set(NAME_ARGUMENTS) | {"params"}))


def _guarded_copy(route, path: str):
    from fastapi.routing import APIRoute

    return APIRoute(
        path,
        checked_names(route.endpoint),
        methods=list(route.methods),
        name=route.name,
        dependencies=route.dependencies,
        response_class=route.response_class,
        status_code=route.status_code,
        summary=route.summary,
        tags=route.tags,
        include_in_schema=False,
        response_model=route.response_model,
    )


def guard_names(fastapi_app) -> int:
    """Put :func:`checked_names` in front of every API route of ``fastapi_app`` whose endpoint takes an id, a
    tag or params (same path, methods, parameters and dependencies): the app's own routes are replaced where
    they stand; the routes of included routers (MONAI Label's, which FastAPI serves through the routers' own
    lists) get a guarded copy ahead of those routers. Returns how many routes were guarded."""
    from fastapi.routing import APIRoute

    routes = fastapi_app.router.routes
    if any(getattr(getattr(route, "endpoint", None), "_names_guard_copy", False) for route in routes):
        return 0
    guarded, copies, first_router = 0, [], None
    for index, route in enumerate(routes):
        if isinstance(route, APIRoute):
            if not getattr(route.endpoint, "_names_checked", False) and _takes_names(route.endpoint):
                routes[index] = _guarded_copy(route, route.path)
                guarded += 1
            continue
        included = getattr(route, "original_router", None)  # FastAPI's _IncludedRouter
        if included is None:
            continue
        first_router = index if first_router is None else first_router
        prefix = getattr(getattr(route, "include_context", None), "prefix", "")
        for inner in included.routes:
            if isinstance(inner, APIRoute) and _takes_names(inner.endpoint):
                copies.append(_guarded_copy(inner, prefix + inner.path))
                copies[-1].endpoint._names_guard_copy = True
    if copies:
        routes[first_router:first_router] = copies
    return guarded + len(copies)
