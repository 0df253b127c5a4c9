"""Active learning from the model's own uncertainty: which unlabelled frame to label next.

``SurgicalSAMUncertainty`` runs the automatic protocol on a frame and returns, beside the label map, how
close that decision was to going another way (``ClassPromptInferer.uncertainty``): the presence margin
(the smallest relative distance of a class's mask size to the presence threshold; 0 = on the threshold)
and the lowest decoder quality among the classes found.

- :class:`UncertaintyScoring` (``POST /scoring/surgicalsam_uncertainty``) scores the unlabelled frames whose
  score is missing or belongs to another model file (all of them with ``{"rescore": true}``) and keeps the
  scores in the datastore's image info (key ``surgicalsam_uncertainty``, with the model file's identity, so a
  retrained model's frames are scored again), written to ``datastore.json`` every ``WRITE_EVERY`` frames
  rather than once per frame.
- :class:`MostUncertain` (``POST /activelearning/most_uncertain``) serves the unlabelled frame with the
  smallest presence margin (ties: the lowest quality), scoring first the frames whose score is missing or
  belongs to another model.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.infer.bundle import BundleInferTask

from .infers import model_identity

logger = logging.getLogger(__name__)

INFO_KEY = "surgicalsam_uncertainty"
WRITE_EVERY = 32


class SurgicalSAMUncertainty(BundleInferTask):
    """The automatic protocol's label map plus its uncertainty (result JSON ``presence_margin``, ``min_quality``)."""

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        network = self._get_network(device, data)
        frames = torch.as_tensor(data[self.input_key])[None].float().to(torch.device(device))
        inferer = self.inferer(data)
        with torch.no_grad():
            found = inferer.uncertainty(frames, network)
            data[self.output_label_key] = inferer(frames, network)[0]
        quality = float(found["min_quality"][0])
        data.setdefault(self.output_json_key, {}).update(  # JSON has no infinity: None = no class found
            presence_margin=float(found["presence_margin"][0]),
            min_quality=None if math.isinf(quality) else quality,
            pixels=found["pixels"][0].tolist(),
            min_pixels=int(found["min_pixels"]),
        )
        return data

    def model_identity(self) -> str:
        return model_identity(self.bundle_path)


class _Scorer:
    def __init__(self, task: SurgicalSAMUncertainty) -> None:
        self.task = task

    def score(self, image_id: str, datastore, device: str) -> dict:
        """The frame's score (not yet written to the datastore)."""
        label_file, result = self.task(
            {
                "image": datastore.get_image_uri(image_id),
                "device": device,
                "result_extension": ".png",
                "result_dtype": "uint8",
            }
        )
        if isinstance(label_file, str) and os.path.isfile(label_file):
            os.remove(label_file)
        return {
            "presence_margin": result["presence_margin"],
            "min_quality": result["min_quality"],
            "model": self.task.model_identity(),
        }

    @staticmethod
    def write(scores: dict[str, dict], datastore) -> None:
        if not scores:
            return
        infos = {image_id: {INFO_KEY: score} for image_id, score in scores.items()}
        if hasattr(datastore, "update_images_info"):
            datastore.update_images_info(infos)
        else:
            for image_id, info in infos.items():
                datastore.update_image_info(image_id, info)

    def current(self, image_id: str, datastore) -> dict | None:
        score = (datastore.get_image_info(image_id) or {}).get(INFO_KEY)
        return score if score and score.get("model") == self.task.model_identity() else None


def _device(request: dict) -> str:
    device = request.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else str(device)


class UncertaintyScoring(ScoringMethod):
    def __init__(self, task: SurgicalSAMUncertainty) -> None:
        super().__init__(
            "Scores every unlabelled frame by the automatic model's uncertainty (presence margin, "
            "lowest quality); kept in the image info as " + INFO_KEY
        )
        self.scorer = _Scorer(task)

    def __call__(self, request, datastore):
        scores, pending, failed, current = {}, {}, {}, 0
        for image_id in sorted(datastore.get_unlabeled_images()):
            if not request.get("rescore") and self.scorer.current(image_id, datastore) is not None:
                current += 1
                continue
            try:
                scores[image_id] = pending[image_id] = self.scorer.score(image_id, datastore, _device(request))
            except Exception as error:  # one unreadable frame does not stop the others
                failed[image_id] = f"{type(error).__name__}: {error}"
            if len(pending) >= WRITE_EVERY:
                self.scorer.write(pending, datastore)
                pending = {}
        self.scorer.write(pending, datastore)
        return {"scored": len(scores), "already_scored": current, "failed": failed}


class MostUncertain(Strategy):
    def __init__(self, task: SurgicalSAMUncertainty) -> None:
        super().__init__(
            "The unlabelled frame the automatic model is least sure about (smallest presence margin, "
            "then lowest quality)"
        )
        self.scorer = _Scorer(task)

    def __call__(self, request, datastore):
        if hasattr(datastore, "reload"):  # the scores the background scoring task wrote meanwhile
            datastore.reload()
        ranked, new = [], {}
        for image_id in datastore.get_unlabeled_images():
            score = self.scorer.current(image_id, datastore)
            if score is None:
                try:
                    score = new[image_id] = self.scorer.score(image_id, datastore, _device(request))
                except Exception as error:
                    logger.warning("frame %s not scored: %s", image_id, error)
                    continue
            quality = math.inf if score["min_quality"] is None else score["min_quality"]
            ranked.append((score["presence_margin"], quality, image_id, score))
        self.scorer.write(new, datastore)
        if not ranked:
            return None
        margin, quality, image_id, score = min(ranked, key=lambda item: (item[0], item[1], item[2]))
        logger.info(
            "most uncertain of %d unlabelled frames: %s (presence margin %.4f, min quality %s)",
            len(ranked),
            image_id,
            margin,
            "none" if math.isinf(quality) else f"{quality:.4f}",
        )
        return {"id": image_id, INFO_KEY: score}
