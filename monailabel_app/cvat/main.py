"""CVAT (nuclio) handler for the SurgicalSAM MONAI Label app: UNTESTED here (no CVAT or nuclio on the test
machines); see monailabel_app/README.md "CVAT".

One handler for the two function definitions beside it:
- ``surgicalsam.yaml`` (CVAT "detector"): the automatic model; returns one polygon per connected region of
  each instrument class found, ``[{"label": class name, "points": [x0, y0, x1, y1, ...], "type": "polygon"}]``.
- ``sam_prompt.yaml`` (CVAT "interactor", ``INTERACTOR_MODEL=true``): CVAT's positive/negative clicks
  (``pos_points``/``neg_points``, ``[[x, y], ...]`` in frame pixels, the app's own convention, so nothing is
  flipped) go to ``sam_prompt``; returns the largest polygon of the mask, ``[[x, y], ...]``.

The app is built in-process (``monailabel.interfaces.utils.app.app_instance``), as MONAI Label's own CVAT
functions do, from ``MONAI_LABEL_APP_DIR`` (this app with its bundle folder in ``model/surgicalsam``) and
``MONAI_LABEL_STUDIES`` (a folder; CVAT sends the frames themselves).
"""

import base64
import io
import json
import os
import tempfile

import numpy as np
from PIL import Image


def init_context(context):
    from monailabel.interfaces.utils.app import app_instance

    app_dir = os.environ.get("MONAI_LABEL_APP_DIR", "/opt/surgicalsam/monailabel_app")
    studies = os.environ.get("MONAI_LABEL_STUDIES", "/opt/surgicalsam/studies")
    os.makedirs(studies, exist_ok=True)
    context.user_data.model = os.environ.get("MONAI_LABEL_MODELS", "surgicalsam")
    context.user_data.interactor = os.environ.get("INTERACTOR_MODEL", "false").lower() == "true"
    context.user_data.app = app_instance(app_dir, studies, {"preload": "true"})
    context.logger.info(f"SurgicalSAM app ready: model {context.user_data.model}")


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a boolean mask (H, W) as [x0, y0, x1, y1, ...] lists, largest first."""
    from skimage import measure

    contours = measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5)
    contours = sorted(contours, key=len, reverse=True)
    return [np.flip(contour - 1, axis=1).round(1).flatten().tolist() for contour in contours if len(contour) >= 3]


def handler(context, event):
    data = event.body
    frame = Image.open(io.BytesIO(base64.b64decode(data["image"]))).convert("RGB")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "frame.png")
        frame.save(path)
        request = {"model": context.user_data.model, "image": path, "result_extension": ".png", "result_dtype": "uint8"}
        if context.user_data.interactor:
            request.update(foreground=data.get("pos_points") or [], background=data.get("neg_points") or [])
        result = context.user_data.app.infer(request)
        label = np.asarray(Image.open(result["file"] if result.get("file") else result["label"]))
    if context.user_data.interactor:
        polygons = _polygons(label > 0)
        points = np.array(polygons[0]).reshape(-1, 2).tolist() if polygons else []
        return context.Response(body=json.dumps(points), headers={}, content_type="application/json", status_code=200)
    names = {value: name for name, value in context.user_data.app.info()["labels"].items()}
    shapes = [
        {"label": names.get(int(value), str(int(value))), "points": polygon, "type": "polygon"}
        for value in np.unique(label)
        if value
        for polygon in _polygons(label == value)
    ]
    return context.Response(body=json.dumps(shapes), headers={}, content_type="application/json", status_code=200)
