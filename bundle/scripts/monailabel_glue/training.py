"""What MONAI Label needs from this bundle beyond inference.yaml: training on datastore frames, and packing.

MONAI Label's ``BundleTrainTask`` (0.8.5) runs the id ``run`` of ``configs/train.json`` (else ``train.yaml``)
with ``train#dataset#data`` and ``validate#dataset#data`` replaced by datalists of
``{"image": frame file, "label": label map file}`` from its datastore, ``train#trainer#max_epochs``,
``device``, and a ``CheckpointLoader`` of ``models/model.pt`` prepended to ``train#handlers``. It never
runs ``initialize``. The bundle's own training reads a precomputed embedding cache instead, so the
MONAI Label overlay (``configs/monailabel_train.yaml``) swaps the datasets for the ones here:

- :class:`FrameEmbedder` runs the frozen SAM image encoder on each datastore frame once and keeps the
  embedding (in memory and, with ``cache_dir``, on disk keyed by the frame's content and the encoder's
  identity), so a second training request re-encodes only new frames;
- :class:`DatalistPromptDataset` / :class:`DatalistFrameDataset` are the (frame, class) training samples
  and the whole-frame validation items, the same items as the cache datasets give;
- :class:`OptionalValidationHandler` skips validation when the validation datalist is empty (MONAI Label
  sends an empty one with ``val_split`` 0 or few labels) and validates mixes of the fine-tuned and the served
  weights;
- :class:`ServedModelGuard` makes fine-tuning keep the served model unless a checkpoint beats it on the
  validation frames (automatic protocol), stops early, writes the final model when there was no validation
  only if asked (:class:`FinalModelSaver`), and says what happened.

:func:`~scripts.monailabel_glue.bundle_folder.make_monailabel_bundle` copies the bundle into a MONAI Label app's ``model/<name>/`` folder and
writes ``configs/train.json`` (train.yaml + monailabel_train.yaml + overlays, merged) and
``configs/inference.json`` (inference.yaml + overlays), which MONAI Label reads before the YAML files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler
from PIL import Image
from torch.utils.data import Dataset

from ..data.frame_files import read_frame, read_label_map
from ..data.layout import DEFAULT_IGNORE_INDEX, DatasetError
from ..embedding_cache.encoding import DEFAULT_EMBEDDING_ENCODING, decode_embedding, encode_embedding
from ..files import atomic_write
from ..sam.geometry import frames_to_sam_input, masks_to_embedding_grid
from ..surgical_sam.datasets import prompt_sample, prompt_samples

logger = logging.getLogger(__name__)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TrainingDataRefused(BaseException):
    """Datastore frames or label maps that training cannot use; the message names the frame and what to do.

    A ``BaseException``, not an ``Exception``, on purpose (as pytest's outcome exceptions): MONAI's config
    parser re-raises every ``Exception`` raised while it builds a component as ``RuntimeError("Failed to
    instantiate component ...")`` (``monai.utils.module.instantiate``), and MONAI Label shows as the train
    status only the last 20 lines of the training process's output, where a traceback ends with that
    wrapper and the real reason is 25 lines further up. This exception passes MONAI's wrapper and MONAI
    Label's ``BundleTrainTask`` as it is, so the training process's last line of output, the train status's
    last line, is ``...TrainingDataRefused: <the reason>`` (in the stock ``monaibundle`` app too, which runs
    this bundle's train config with MONAI Label's own train task).
    """


def _image_id(path: str) -> str:
    """The datastore's image id of a frame file (its name without extension)."""
    return os.path.splitext(os.path.basename(path))[0]


def _check_item(item: object, index: int) -> tuple[str, str]:
    if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
        raise DatasetError(f"datalist item {index} must be a dict with 'image' and 'label' files, got {item!r}")
    image, label = str(item["image"]), str(item["label"])
    for path in (image, label):
        if not os.path.isfile(path):
            raise DatasetError(f"datalist item {index}: file {path} does not exist")
    return image, label


class FrameEmbedder:
    """Datastore frames and label maps -> (SAM embedding (d, h, w) float16, label map (H, W) uint8).

    Frames of another size than ``frame_size`` (the size the network's logits come back at when it is fed
    embeddings) are resized to it, the frame bilinearly and the label map by nearest neighbour.

    Args:
        sam_variant, sam_checkpoint: the frozen encoder (the network's own SAM).
        frame_size: (H, W).
        num_classes: C; label values must be 0..C or ``ignore_index``.
        device: where the encoder runs.
        cache_dir: folder for embeddings on disk (None: memory only).
    """

    def __init__(
        self,
        sam_variant: str,
        sam_checkpoint: str | None,
        frame_size: Sequence[int],
        num_classes: int,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
    ) -> None:
        from ..embedding_cache.identity import cache_identity

        self.sam_variant, self.sam_checkpoint = sam_variant, sam_checkpoint
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.device = torch.device(device)
        identity = dict(cache_identity(sam_variant, sam_checkpoint), frame_size=list(self.frame_size))
        self.identity_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_dir = os.path.join(cache_dir, self.identity_key) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}
        self._encoder = None
        self._image_size = None

    def _encoder_and_size(self):
        if self._encoder is None:
            from ..sam.backbone import build_sam

            sam = build_sam(self.sam_variant, checkpoint=self.sam_checkpoint)
            self._encoder = sam.image_encoder.to(self.device).eval().requires_grad_(False)
            self._image_size = sam.image_encoder.img_size
        return self._encoder, self._image_size

    def release(self) -> None:
        """Drop the encoder (its memory); it is rebuilt on the next new frame."""
        self._encoder = None

    def load_pair(self, image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
        """The frame (H, W, 3) uint8 and label map (H, W) uint8 at ``frame_size``."""
        frame = read_frame(image_path)
        label = read_label_map(label_path, self.num_classes, self.ignore_index)
        if frame.shape[:2] != label.shape:
            image_id, tag = _image_id(image_path), os.path.basename(os.path.dirname(os.path.abspath(label_path)))
            raise DatasetError(
                f"the label map of frame {image_id} is {label.shape[0]}x{label.shape[1]} (height x width) but the frame is "
                f"{frame.shape[0]}x{frame.shape[1]} (label map {label_path}, frame {image_path}): save a label map of "
                f"the frame's size (PUT /datastore/label?image={image_id}&tag={tag}) or remove this one "
                f"(DELETE /datastore/label?id={image_id}&tag={tag}), then train again"
            )
        height, width = self.frame_size
        if frame.shape[:2] != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
        return frame, label

    def embedding(self, image_path: str, frame: np.ndarray) -> torch.Tensor:
        """The SAM embedding of ``frame`` (already at frame size), from memory, disk or the encoder."""
        key = _file_digest(image_path)
        if key in self._memory:
            return self._memory[key]
        disk = os.path.join(self.cache_dir, key + ".npy") if self.cache_dir else None
        if disk and os.path.isfile(disk):
            stored = np.load(disk)  # any encoding: float16 (bundles up to 0.7), uint8 per channel (0.8.0) or tile
        else:
            encoder, image_size = self._encoder_and_size()
            tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float().to(self.device)
            with torch.no_grad():
                encoded = encoder(frames_to_sam_input(tensor, image_size))[0].float().cpu().numpy()
            stored = encode_embedding(encoded, DEFAULT_EMBEDDING_ENCODING)
            if disk:
                atomic_write(disk, lambda temporary: np.save(temporary, stored), keep_suffix=True)
        # kept as float16 in memory; the same values whether encoded now or read back from disk
        embedding = torch.from_numpy(decode_embedding(stored)).half()
        self._memory[key] = embedding
        return embedding

    def items(self, data: Sequence[Mapping]) -> list[dict]:
        """Every datalist item -> ``{"image_embeddings", "label" (H, W) uint8 tensor, "key"}``.

        Raises:
            TrainingDataRefused: an item is not a pair of existing files, a frame or label map cannot be
                read, or a label map is not of its frame's size (the message names the frame and what to do).
        """
        result = []
        for index, item in enumerate(data):
            try:
                image_path, label_path = _check_item(item, index)
                frame, label = self.load_pair(image_path, label_path)
            except DatasetError as error:  # said as the train status's last line (see TrainingDataRefused)
                raise TrainingDataRefused(str(error)) from None
            result.append(
                {
                    "image_embeddings": self.embedding(image_path, frame),
                    "label": torch.from_numpy(np.ascontiguousarray(label)),
                    "key": _image_id(image_path),
                }
            )
        logger.info("MONAI Label datalist: %d frames embedded (%s)", len(result), self.sam_variant)
        return result


class DatalistPromptDataset(Dataset):
    """Training samples from a datalist: one (frame, class) pair per class present on the embedding grid.

    Items as :class:`scripts.surgical_sam.datasets.CachedPromptDataset`: ``image_embeddings`` (d, h, w),
    ``mask`` (1, H, W) float, ``grid_mask`` (h, w) bool, ``class_id`` () long. ``absent_prompts_per_frame``
    adds prompts of absent classes with an empty target (redrawn per epoch by :meth:`set_epoch`).
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        embedder: FrameEmbedder,
        num_classes: int,
        absent_prompts_per_frame: int = 0,
        seed: int = 666,
    ) -> None:
        if not data:
            raise TrainingDataRefused(
                "no labelled frames to train on: save label maps for some frames first "
                "(MONAI Label: PUT /datastore/label?image=ID)"
            )
        self.num_classes, self.absent_prompts_per_frame, self.seed = (
            int(num_classes),
            int(absent_prompts_per_frame),
            seed,
        )
        self.frames = embedder.items(data)
        embedder.release()
        from ..sam.backbone import get_variant

        variant = get_variant(embedder.sam_variant)
        self.image_size, self.grid_size = variant.image_size, (variant.grid_size, variant.grid_size)
        for frame in self.frames:
            label = frame["label"].long()
            present = [c for c in range(1, self.num_classes + 1) if bool((label == c).any())]
            grid = (
                masks_to_embedding_grid(torch.stack([(label == c) for c in present]), self.image_size, self.grid_size)
                if present
                else torch.zeros(0)
            )
            frame["classes"] = present
            frame["grid_classes"] = [c for c, g in zip(present, grid) if bool(g.any())]
        self.set_epoch(0)
        if not any(frame["grid_classes"] for frame in self.frames):
            raise TrainingDataRefused(
                f"none of the {len(self.frames)} labelled frames shows an instrument (label values "
                f"1..{self.num_classes}) large enough to train on"
            )

    def set_epoch(self, epoch: int) -> None:
        # one "version" per epoch: datastore frames are not augmented, only the absent prompts are redrawn
        self.version = int(epoch)
        self.samples = prompt_samples(
            self.frames, self.num_classes, self.absent_prompts_per_frame, np.random.default_rng([self.seed, epoch])
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        frame_index, class_id = self.samples[index]
        frame = self.frames[frame_index]
        return prompt_sample(frame["image_embeddings"], frame["label"], class_id, self.image_size, self.grid_size)


class DatalistFrameDataset(Dataset):
    """Whole frames from a datalist, for validation: ``image_embeddings``, ``label`` (1, H, W) long. May be empty."""

    def __init__(self, data: Sequence[Mapping] | None, embedder: FrameEmbedder) -> None:
        self.frames = embedder.items(data or [])
        embedder.release()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        frame = self.frames[index]
        return {
            "image_embeddings": frame["image_embeddings"].float(),
            "label": frame["label"].long()[None],
            "key": frame["key"],
        }


class OptionalValidationHandler(ValidationHandler):
    """MONAI's ValidationHandler, skipped when the validator has nothing to validate on, that can validate mixes
    of the fine-tuned weights with the weights training started from (the served model's).

    With ``weight_mixes`` other than ``[1]``, each validation after a training epoch is one validation per mix
    m, of the weights ``start + m * (now - start)`` (all floating-point entries of the state dict); training
    then goes on from the fine-tuned weights as they were. The validator's best-model saver saves whichever
    (epoch, mix) scores best, so a mix can keep most of what fine-tuning gained on new data while staying
    close to what the served model does on the data it was trained on (weight-space ensembling, as in WiSE-FT:
    Wortsman et al., CVPR 2022). The mix being validated is the validator's attribute ``weight_mix``.

    Args:
        validator, interval, epoch_level, exec_at_start: as MONAI's ValidationHandler.
        network: the network being trained (needed with mixes other than 1).
        weight_mixes: the mixes validated, each in (0, 1], in this order (on equal scores the saver keeps the
            first); ``[1]``: the fine-tuned weights only.
    """

    def __init__(
        self,
        validator: Engine,
        interval: int = 1,
        epoch_level: bool = True,
        exec_at_start: bool = False,
        network: torch.nn.Module | None = None,
        weight_mixes: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=epoch_level, exec_at_start=exec_at_start)
        self.weight_mixes = [float(mix) for mix in weight_mixes]
        if not self.weight_mixes or any(not 0 < mix <= 1 for mix in self.weight_mixes):
            raise ValueError(f"weight_mixes must be numbers in (0, 1], got {list(weight_mixes)!r}")
        if self.weight_mixes != [1.0] and network is None:
            raise ValueError("weight_mixes other than [1] need the network")
        self.network = network
        self.start: dict[str, torch.Tensor] | None = None
        validator.weight_mix = 1.0

    def attach(self, engine: Engine) -> None:
        if self.network is not None:  # before the first validation (exec_at_start), after the served model's loader
            engine.add_event_handler(Events.STARTED, self._keep_start)
        super().attach(engine)

    def _keep_start(self, _engine: Engine) -> None:
        self.start = {k: v.detach().clone() for k, v in self.network.state_dict().items() if v.is_floating_point()}

    def __call__(self, engine: Engine) -> None:
        loader = getattr(self.validator, "data_loader", None)
        if loader is not None and len(loader) == 0:
            logger.info("no validation frames: validation skipped (the final model is kept)")
            return
        if self.start is None or engine.state.epoch == 0 or self.weight_mixes == [1.0]:
            self.validator.weight_mix = 1.0
            super().__call__(engine)
            return
        weights = {k: v for k, v in self.network.state_dict().items() if k in self.start}
        tuned = {k: v.detach().clone() for k, v in weights.items()}
        try:
            for mix in self.weight_mixes:
                with torch.no_grad():
                    for key, value in weights.items():
                        value.copy_(self.start[key] + mix * (tuned[key] - self.start[key]))
                self.validator.weight_mix = mix
                self.validator.run(engine.state.epoch)
        finally:
            with torch.no_grad():
                for key, value in weights.items():
                    value.copy_(tuned[key])
            self.validator.weight_mix = 1.0


class FinalModelSaver:
    """At the end of training, write the network to ``path`` when no validation picked a best model,
    if ``replace_unvalidated`` allows it (else the served model is kept: nothing says the new one is better).

    Same file format as the bundle's best-model saver (``CheckpointSaver`` with ``save_dict={"model": net}``
    writes the bare state dict), so MONAI Label and the bundle read both alike.
    """

    def __init__(
        self, network: torch.nn.Module, path: str, validator: Engine | None = None, replace_unvalidated: bool = True
    ) -> None:
        self.network, self.path, self.validator = network, path, validator
        self.replace_unvalidated = bool(replace_unvalidated)
        self.written = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        validated = self.validator is not None and getattr(self.validator.state, "best_metric_epoch", -1) not in (
            -1,
            None,
        )
        if validated:
            return
        if not self.replace_unvalidated:
            logger.info("no validation ran and replace_unvalidated is false: the served model %s is kept", self.path)
            return
        model = getattr(self.network, "module", self.network)
        atomic_write(self.path, lambda temporary: torch.save(model.state_dict(), temporary))
        self.written = True
        logger.info("no validation ran: the final model was written to %s", self.path)


#: What the app's train task says of its split that the result repeats.
SPLIT_FACTS = ("training_videos", "validation_videos", "reference_dataset", "replayed_frames", "reference_frames")


class ServedModelGuard:
    """Fine-tuning a served model on a few labels must not make it worse; this says whether it did.

    Attach to the trainer AFTER the ``CheckpointLoader`` of the served model and after a
    ``ValidationHandler`` with ``exec_at_start=True``: that first validation scores the served model (epoch
    0) and becomes the evaluator's best metric, so the best-model saver (MONAI's ``CheckpointSaver`` with
    ``save_key_metric``, which saves only on a strictly better score) overwrites the served model only with a
    checkpoint that beats it on the validation frames (with weight mixes, see :class:`OptionalValidationHandler`,
    the best epoch and mix). Also stops training (MONAI's ``EarlyStopHandler`` on the validator) after
    ``patience`` epochs without a better score. At the end, when no validation
    ran, a :class:`FinalModelSaver` writes the final model to ``path`` only if ``replace_unvalidated``; then
    ``result_file`` (JSON) is written and one line logged: whether the served model was replaced, the scores,
    the epochs. (One handler for both, because MONAI Label's BundleTrainTask reads ``train#handlers`` as a
    list of component dicts and inserts its loader at the front, so handlers cannot refer to each other.)

    Args:
        validator: the evaluator (its ``key_metric_name``, ``best_metric``, ``best_metric_epoch``).
        result_file: where the summary goes.
        network, path: the network and the served model file (``models/model.pt``).
        patience: epochs without improvement before stopping; 0 or None: no early stopping.
        weight_mixes: the mixes the validation handler validates per epoch (their count makes ``patience``
            epochs a count of validations).
        replace_unvalidated: with no validation frames, serve the final model anyway.
        split: what the app's train task says of its split, copied into the summary: ``training_videos``,
            ``validation_videos``, and, when the served model must be kept whatever the scores, ``hold``
            (why) and ``candidate_dir`` (where the best-model saver was pointed instead of ``path``).
    """

    def __init__(
        self,
        validator: Engine,
        result_file: str,
        network: torch.nn.Module,
        path: str,
        patience: int | None = 3,
        replace_unvalidated: bool = False,
        split: Mapping | None = None,
        weight_mixes: Sequence[float] = (1.0,),
    ) -> None:
        self.validator, self.result_file = validator, result_file
        self.validations_per_epoch = max(1, len(weight_mixes))
        self.split = dict(split or {})
        self.patience = int(patience) if patience else 0
        self.final_saver = FinalModelSaver(network, path, validator, replace_unvalidated)
        self.baseline: float | None = None
        # per validation (the first: the served model's): epoch, weight mix, key score, site and reference scores
        self.scores: list[dict] = []
        self.best_index = 0  # the validation whose checkpoint the best-model saver holds (strictly better only)

    def _record_scores(self, validator: Engine) -> None:
        from .site_guard import REFERENCE_KEY, SITE_KEY

        metrics = validator.state.metrics
        record = {key: metrics[key] for key in (SITE_KEY, REFERENCE_KEY) if key in metrics}
        record.update(
            epoch=int(validator.state.epoch),
            weight_mix=float(getattr(validator, "weight_mix", 1.0)),
            key=float(metrics[validator.state.key_metric_name]),
        )
        if self.scores and record["key"] > self.scores[self.best_index]["key"]:
            self.best_index = len(self.scores)
        self.scores.append(record)

    def _validation_frames(self) -> list[str]:
        loader = getattr(self.validator, "data_loader", None)
        frames = getattr(getattr(loader, "dataset", None), "frames", None) or []
        return [frame["key"] for frame in frames]

    def attach(self, engine: Engine) -> None:
        from monai.handlers import EarlyStopHandler

        engine.add_event_handler(Events.STARTED, self._record_baseline)
        self.validator.add_event_handler(Events.COMPLETED, self._record_scores)
        engine.add_event_handler(Events.COMPLETED, self.final_saver)
        engine.add_event_handler(Events.COMPLETED, self._report)
        if self.patience and self._validation_frames():
            EarlyStopHandler(
                patience=self.patience * self.validations_per_epoch,
                score_function=self._score,
                trainer=engine,
                epoch_level=True,
            ).attach(self.validator)

    def _score(self, _engine: Engine) -> float:
        return float(self.validator.state.metrics[self.validator.state.key_metric_name])

    def _record_baseline(self, engine: Engine) -> None:
        if getattr(self.validator.state, "best_metric_epoch", -1) == 0:
            self.baseline = float(self.validator.state.best_metric)
            logger.info(
                "served model before fine-tuning: %s %.4f on %d validation frames",
                self.validator.state.key_metric_name,
                self.baseline,
                len(self._validation_frames()),
            )

    def summary(self, engine: Engine) -> dict:
        frames = self._validation_frames()
        best_epoch = getattr(self.validator.state, "best_metric_epoch", -1)
        result = {
            "validation_frames": frames,
            "epochs_run": int(engine.state.epoch),
            "max_epochs": int(engine.state.max_epochs),
        }
        result.update({key: value for key, value in self.split.items() if key in SPLIT_FACTS})
        result.update(self._site_and_reference())
        if frames and self.baseline is not None:
            hold = self.split.get("hold")
            result.update(
                metric=self.validator.state.key_metric_name,
                baseline=self.baseline,
                best=float(self.validator.state.best_metric),
                best_epoch=int(best_epoch),
                served_model="replaced" if best_epoch > 0 and not hold else "kept",
            )
            mix = self.scores[self.best_index]["weight_mix"] if best_epoch > 0 and self.scores else 1.0
            if best_epoch > 0:
                result["weight_mix"] = mix
            mixed = f" (weights {mix:g} of the way from the served model's to epoch {best_epoch}'s)" if mix != 1 else ""
            result["reason"] = (
                f"epoch {best_epoch}{mixed} scored {result['best']:.4f} > {self.baseline:.4f}"
                if best_epoch > 0
                else f"no epoch scored above the served model's {self.baseline:.4f}"
            )
            if hold:
                candidate = os.path.join(self.split.get("candidate_dir", ""), os.path.basename(self.final_saver.path))
                result["reason"] = f"{hold} ({result['reason']}" + (
                    f"; that checkpoint is {candidate}, not served)" if best_epoch > 0 else ")"
                )
                if best_epoch > 0:
                    result["candidate_model"] = candidate
        else:
            written = self.final_saver.written
            result.update(
                served_model="replaced" if written else "kept",
                reason="no validation frames: "
                + (
                    "the final model was served (replace_unvalidated true)"
                    if written
                    else "nothing says a new model is better (give val_split > 0, or replace_unvalidated true)"
                ),
            )
        return result

    def _site_and_reference(self) -> dict:
        """With reference frames: the held-out new frames' and the reference's Challenge IoU, of the served model
        (``*_before``) and of the checkpoint served after training (``*_after``: the best validation's, else the
        served model's)."""
        from .site_guard import REFERENCE_KEY, SITE_KEY

        if not self.scores or REFERENCE_KEY not in self.scores[0]:
            return {}
        after = self.scores[self.best_index]
        return {
            "new_frames_before": self.scores[0][SITE_KEY],
            "new_frames_after": after[SITE_KEY],
            "reference_before": self.scores[0][REFERENCE_KEY],
            "reference_after": after[REFERENCE_KEY],
        }

    def _report(self, engine: Engine) -> None:
        result = self.summary(engine)
        os.makedirs(os.path.dirname(os.path.abspath(self.result_file)), exist_ok=True)
        with open(self.result_file, "w") as handle:
            json.dump(result, handle, indent=2)
        logger.info("served model %s: %s", result["served_model"].upper(), result["reason"])
