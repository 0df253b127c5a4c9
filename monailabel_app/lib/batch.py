"""Batch pre-annotation (``POST /batch/infer/<model>``) that works on a machine without GPUs and says, frame
by frame, what happened.

MONAI Label 0.8.5's ``BatchInferTask`` asks for every GPU by default (``multi_gpu`` true, ``gpus`` all): with
none it divides by zero. Here the device is the request's (default: cuda when there is one, else cpu),
several GPUs are used only when asked for (``multi_gpu`` true) and present, frames run one after another,
and one frame that fails does not fail the others: the result maps each image id to
``{"status": "ok", "label_tag": ...}`` or ``{"status": "error", "reason": ...}``.

A video (params ``{"video": ID}``, lib/videos.py) is pre-labelled as one sequence: its frames in order through
``surgicalsam_video`` (the automatic protocol with the bundle's temporal presence rule) when the model asked
for is ``surgicalsam``; frames a person labelled (tag ``final``) keep their label and stand in the sequence for
the model's decision (``SurgicalSAMVideo.carry_label``). Each pre-labelled frame's uncertainty is kept in its
image info (``prelabel``: ``presence_margin``, ``min_quality``, ``model``), which the review page's "next"
ranks by.
"""

from __future__ import annotations

import copy
import logging
import os
import time

import torch
from fastapi import HTTPException
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.utils.others.generic import remove_file

from .datastore import PRE_LABEL_TAG, REVIEWED_TAG

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


#: image info key of a pre-labelled frame's uncertainty
PRE_LABEL_INFO = "prelabel"


class PerFrameBatchInfer(BatchInferTask):
    """Args:
    video_task: the app's ``SurgicalSAMVideo`` task (registered as infer model ``surgicalsam_video``), None
        when the app has none."""

    def __init__(self, video_task=None) -> None:
        super().__init__()
        self.video_task = video_task

    def __call__(self, request, datastore, infer):
        if request.get("video"):
            return self.pre_label_video(request, datastore, infer)
        image_ids = sorted(self.get_images(request, datastore))
        if request.get("max_batch_size", 0) > 0:
            image_ids = image_ids[: request["max_batch_size"]]
        return self.per_frame(request, datastore, infer, image_ids)

    def pre_label_video(self, request, datastore, infer) -> dict:
        """Every frame of the video ``request["video"]`` not labelled by a person, in order (404 for a video
        the datastore does not hold)."""
        import numpy as np
        from PIL import Image

        from .server import inference_lock

        video = request["video"]
        frames = datastore.video_frames(video)
        if not frames:
            raise HTTPException(status_code=404, detail=f"video {video!r} is not in the datastore")
        video_model = request.get("model") == "surgicalsam" and self.video_task is not None
        request = {**request, "model": "surgicalsam_video" if video_model else request.get("model")}
        request.setdefault("label_tag", PRE_LABEL_TAG)
        with inference_lock:
            if video_model:
                self.video_task.start_video()

            def before(image_id: str) -> bool:
                """Whether the frame is pre-labelled (False: a person's label stands in for it)."""
                reviewed = datastore.get_label_uri(image_id, REVIEWED_TAG)
                if not reviewed or not os.path.isfile(reviewed):
                    return True
                if video_model:
                    with Image.open(reviewed) as label:
                        self.video_task.carry_label(np.asarray(label))
                return False

            result = self.per_frame(request, datastore, infer, [image_id for image_id, _, _ in frames], before)
        result["video"] = video
        return result

    def per_frame(self, request, datastore, infer, image_ids, before=None) -> dict:
        """Run ``infer`` on each of ``image_ids`` in order (``before(image_id)`` False skips one)."""
        if request.get("max_batch_size", 0) > 0:
            image_ids = image_ids[: request["max_batch_size"]]
        label_tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
        devices = batch_devices(request)
        logger.info("batch inference: %d frames on %s, labels tagged %r", len(image_ids), devices, label_tag)
        start, report = time.time(), {}
        uncertainty = {}
        for index, image_id in enumerate(image_ids):
            if before is not None and not before(image_id):
                report[image_id] = {"status": "skipped", "reason": f"labelled by a person (tag {REVIEWED_TAG})"}
                continue
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
                params = result.get("params") or {}
                if "presence_margin" in params:
                    uncertainty[image_id] = {
                        PRE_LABEL_INFO: {
                            "presence_margin": params["presence_margin"],
                            "min_quality": params.get("min_quality"),
                            "model": self.video_task.model_identity(),
                        }
                    }
            except HTTPException as error:
                report[image_id] = {"status": "error", "reason": str(error.detail)}
            except Exception as error:  # one frame must not fail the batch
                logger.warning("batch inference of %s failed", image_id, exc_info=True)
                report[image_id] = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        if uncertainty:
            datastore.update_images_info(uncertainty)
        failed = sorted(k for k, v in report.items() if v["status"] == "error")
        skipped = sorted(k for k, v in report.items() if v["status"] == "skipped")
        logger.info(
            "batch inference: %d ok, %d skipped, %d failed %s in %.1f s",
            len(report) - len(failed) - len(skipped),
            len(skipped),
            len(failed),
            failed,
            time.time() - start,
        )
        return {
            "images": report,
            "ok": len(report) - len(failed) - len(skipped),
            "failed": failed,
            "skipped": skipped,
            "seconds": round(time.time() - start, 3),
        }
