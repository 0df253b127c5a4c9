"""SurgicalSAM MONAI Label app: class-prompt, click/box and automatic segmentation of endoscopic frames.

Start (see README.md in this folder):
    surgical-sam monailabel_bundle monailabel_app/model/surgicalsam --model_file MODEL.pt --sam_checkpoint SAM.pth
    monailabel start_server --app monailabel_app --studies FRAMES --host 127.0.0.1 --port 8000

Config (``--conf KEY VALUE``): ``bundle`` the bundle folder (default ``<app>/model/surgicalsam``);
``preload`` true loads the network at start; ``threads`` torch's intra-op threads (default: half the CPU
cores, at least 1; see README.md "Responsiveness"); ``auth`` false turns the access token off (README.md
"Security"); ``reserve_s`` how long a frame handed out by next sample stays reserved for its client (default 1800);
``max_pixels`` (default 4096 x 4096) and ``max_upload_mb`` (default 64) bound frames and uploads, ``max_video_mb``
(default 1024) and ``max_video_frames`` (default 20000) a video uploaded whole (lib/uploads.py, lib/videos.py;
README.md "Limits of uploads and names").
"""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib import uploads
from lib.activelearning import MostUncertain, SurgicalSAMUncertainty, UncertaintyScoring
from lib.auth import access_token, protect
from lib.batch import PerFrameBatchInfer
from lib.datastore import CheckedLocalDatastore
from lib.guards import check_infer_request, install_guards
from lib.infers import SAMPrompt, SurgicalSAMAuto, SurgicalSAMClass, SurgicalSAMVideo, share_network
from lib.labels import class_table
from lib.reservations import Reservations, ReservedView, client_of, reserve_seconds
from lib.server import install, server_app
from lib.trainers import SurgicalSAMTrainTask
from lib.videos import routes as video_routes

logger = logging.getLogger(__name__)

#: Infer model names -> what they do (GET /info/ lists them).
MODELS = {
    "surgicalsam": "automatic: every instrument type prompted, the ones found are kept",
    "surgicalsam_class": "class prompt: the mask of one instrument type (params class_name or class_id)",
    "surgicalsam_video": "automatic over a video's frames in order, presence decided by the temporal rule "
    '(POST /batch/infer/surgicalsam with params {"video": ID} runs it)',
    "sam_prompt": "SAM clicks/box: params foreground [[x, y], ...], background [[x, y], ...], box [x0, y0, x1, y1]",
}


def apply_bundle_process_settings(bundle: str) -> None:
    """The bundle's process settings (scripts/engine/process_settings.py: glibc allocator), loaded by file path so
    that the bundle's ``scripts`` package is not imported here."""
    import importlib.util

    path = os.path.join(bundle, "scripts", "engine", "process_settings.py")
    if not os.path.isfile(path):
        logger.warning("%s is missing: the bundle's process settings are not applied", path)
        return
    spec = importlib.util.spec_from_file_location("surgicalsam_process_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logger.info("process settings: %s", module.apply_process_settings())


class SurgicalSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle = os.path.abspath(conf.get("bundle") or os.path.join(app_dir, "model", "surgicalsam"))
        apply_bundle_process_settings(self.bundle)
        for name in ("configs/inference.json", "configs/train.json", "models/model.pt"):
            if not os.path.isfile(os.path.join(self.bundle, name)):
                raise FileNotFoundError(
                    f"{os.path.join(self.bundle, name)} is missing: make the bundle folder first with "
                    f"`surgical-sam monailabel_bundle {self.bundle} --model_file MODEL.pt --sam_checkpoint SAM.pth`"
                )
        import torch

        threads = conf.get("threads") or max(1, (os.cpu_count() or 2) // 2)
        if not str(threads).isdigit() or int(threads) < 1:
            raise ValueError(f"--conf threads must be a whole number >= 1, got {threads!r}")
        torch.set_num_threads(int(threads))
        if str(conf.get("auth", "true")).lower() not in ("true", "false"):
            raise ValueError(f"--conf auth must be true or false, got {conf.get('auth')!r}")
        self._reservations = Reservations(reserve_seconds(conf))
        uploads.configure(conf)
        self.class_table = class_table(self.bundle)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SurgicalSAM",
            description="Surgical instrument segmentation of endoscopic frames (SurgicalSAM + SAM prompts)",
            version="0.1.0",
        )

    def init_datastore(self):
        return CheckedLocalDatastore(
            self.studies,
            class_table=self.class_table,
            bundle=self.bundle,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        auto = SurgicalSAMAuto(self.bundle, self.conf, type="segmentation")
        if not auto.is_valid():
            raise RuntimeError(f"the bundle at {self.bundle} is not a valid MONAI Label bundle (see the log)")
        infers = {
            "surgicalsam": auto,
            "surgicalsam_class": share_network(SurgicalSAMClass(self.bundle, self.conf, type="segmentation"), auto),
            "surgicalsam_video": share_network(SurgicalSAMVideo(self.bundle, self.conf, type="segmentation"), auto),
            "sam_prompt": share_network(SAMPrompt(self.bundle, self.conf), auto),
        }
        for name, task in infers.items():
            task.description = f"{MODELS[name]}. {task.description or ''}".strip()
        self._uncertainty = share_network(SurgicalSAMUncertainty(self.bundle, self.conf, type="segmentation"), auto)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        task = SurgicalSAMTrainTask(self.bundle, self.conf)
        return {"surgicalsam": task} if task.is_valid() else {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"most_uncertain": MostUncertain(self._uncertainty), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"surgicalsam_uncertainty": UncertaintyScoring(self._uncertainty)}

    def init_batch_infer(self):
        return PerFrameBatchInfer(self._infers.get("surgicalsam_video"))

    def on_init_complete(self):
        super().on_init_complete()
        fastapi_app = server_app()
        if fastapi_app is not None:
            auth = str(self.conf.get("auth", "true")).lower() == "true"
            token, source = access_token(self.studies) if auth else (None, None)
            logger.info("access token: %s", f"from {source}" if auth else "OFF (--conf auth false)")
            protect(fastapi_app, token)
            # the guards' routes first: install() then puts the id and tag checks (lib/names.py) in front of
            # every route that takes names, the guards' own included
            install_guards(fastapi_app, video_routes())
            install(fastapi_app, trainers=sorted(self._trainers))

    def next_sample(self, request):
        """MONAI Label's next sample, with the frame reserved for the asking client (lib/reservations.py) and
        404 for an unknown strategy; the reply carries the frame's id, not its path on the server."""
        strategy = request.get("strategy") or "random"
        task = self._strategies.get(strategy)
        if task is None:
            raise HTTPException(
                status_code=404, detail=f"unknown strategy {strategy!r}; strategies: {sorted(self._strategies)}"
            )
        client_id = client_of(request)
        with self._reservations.lock:
            view = ReservedView(self.datastore(), self._reservations.held_by_others(client_id))
            result = task(request, view)
            if not result or not result.get("id"):
                return {}
            seconds = self._reservations.reserve(result["id"], client_id)
        if self._auto_update_scoring:
            self.async_scoring(None)
        result = {key: value for key, value in result.items() if key != "path"}
        return {**result, "client_id": client_id, "reserved_s": seconds}

    def info(self):
        """MONAI Label's info and the served bundle's class table (``class_table``: the label values a label
        map may hold, from the bundle's metadata)."""
        return {**super().info(), "class_table": self.class_table}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with user errors answered 4xx and a message (the stock app answers 500). The
        image is a datastore id or a frame uploaded with this request, never a server path: any other value
        is answered the same 404, whatever exists on disk; a frame of more than ``max_pixels`` is 400."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; models: {sorted(self._infers)}")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="give an image id (?image=ID) or upload a frame (file=...)")
        check_infer_request(request)
        datastore = datastore or self.datastore()
        # MONAI Label reads any existing path it is given (relative to the server's folder too) and saves a
        # label only for what is not one: here the id is resolved to its file first, and the label saved below
        request, save_label = dict(request), request.get("save_label", False) and not uploads.is_upload(image)
        request["save_label"] = False
        if not uploads.is_upload(image):
            if image not in datastore.list_images():
                raise HTTPException(status_code=404, detail=f"image {image[:200]!r} is not in the datastore")
            request["image"] = datastore.get_image_uri(image)
            problem = uploads.pixels_problem(request["image"], f"frame {image!r}")
            if problem:
                raise HTTPException(status_code=400, detail=problem)
        try:
            result = super().infer(request, datastore)
            if save_label and result.get("file") and os.path.exists(result["file"]):
                result["label"] = datastore.save_label(
                    image,
                    result["file"],
                    request.get("label_tag") or "original",
                    {"model": model, "params": result.get("params")},
                )
            return result
        except HTTPException:
            raise
        except ValueError as error:  # unreadable frame, bad prompt, bad parameter
            raise HTTPException(status_code=400, detail=f"{type(error).__name__}: {error}") from error
        except RuntimeError as error:  # e.g. models/model.pt does not fit the network
            raise HTTPException(status_code=500, detail=f"{type(error).__name__}: {error}") from error
