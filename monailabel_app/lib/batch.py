"""Batch pre-annotation (``POST /batch/infer/<model>``) that works on a machine without GPUs and says, frame
by frame, what happened.

MONAI Label 0.8.5's ``BatchInferTask`` asks for every GPU by default (``multi_gpu`` true, ``gpus`` all): with
none it divides by zero. Here the device is the request's (default: cuda when there is one, else cpu),
several GPUs are used only when asked for (``multi_gpu`` true) and present, frames run one after another,
and one frame that fails does not fail the others: the result maps each image id to
``{"status": "ok", "label_tag": ...}`` or ``{"status": "error", "reason": ...}``.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from fastapi import HTTPException
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)


def batch_devices(request: dict) -> list[str]:
    """The devices frames go to: ``multi_gpu`` with 2+ GPUs -> every (requested) GPU, else one device."""
    gpus = torch.cuda.device_count()
    if request.get("multi_gpu") and gpus > 1:
        wanted = request.get("gpus", "all")
        ids = range(gpus) if not wanted or wanted == "all" else [int(g) for g in str(wanted).split(",")]
        return [f"cuda:{i}" for i in ids]
    device = str(request.get("device") or ("cuda" if gpus else "cpu"))
    return ["cpu" if device.startswith("cuda") and not gpus else device]


class PerFrameBatchInfer(BatchInferTask):
    def __call__(self, request, datastore, infer):
        image_ids = sorted(self.get_images(request, datastore))
        if request.get("max_batch_size", 0) > 0:
            image_ids = image_ids[: request["max_batch_size"]]
        label_tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
        devices = batch_devices(request)
        logger.info("batch inference: %d frames on %s, labels tagged %r", len(image_ids), devices, label_tag)
        start, report = time.time(), {}
        for index, image_id in enumerate(image_ids):
            req = copy.deepcopy(request)
            req.update(
                image=image_id,
                save_label=True,
                label_tag=label_tag,
                device=devices[index % len(devices)],
                multi_gpu=False,
            )
            try:
                result = infer(req, datastore)
                if result.get("file"):
                    remove_file(result.pop("file"))
                report[image_id] = {"status": "ok", "label_tag": label_tag}
            except HTTPException as error:
                report[image_id] = {"status": "error", "reason": str(error.detail)}
            except Exception as error:  # one frame must not fail the batch
                logger.warning("batch inference of %s failed", image_id, exc_info=True)
                report[image_id] = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        failed = sorted(k for k, v in report.items() if v["status"] != "ok")
        logger.info(
            "batch inference: %d ok, %d failed %s in %.1f s",
            len(report) - len(failed),
            len(failed),
            failed,
            time.time() - start,
        )
        return {"images": report, "ok": len(report) - len(failed), "failed": failed}
