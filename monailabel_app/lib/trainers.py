"""Fine-tuning the served model from MONAI Label's /train, with the settings a team changes.

MONAI Label's ``BundleTrainTask`` runs the bundle's ``configs/train.json`` (train.yaml + the fine-tuning
overlay monailabel_train.yaml) and passes only ``max_epochs``, ``val_split`` and ``device`` from the request.
:class:`SurgicalSAMTrainTask` also passes the overlay's ``monailabel_settings`` (learning rate, gradient
clipping, absent prompts, early stopping, whether an unvalidated model may replace the served one), checks
them, and returns the overlay's result (served model replaced or kept, scores) as the task's result, which
MONAI Label prints as the last line of the train status ``details``; a frame whose label map does not fit
it is skipped and named there (``skipped_frames``). When training fails, the root cause
(e.g. which label map does not fit which frame) is raised alone, so that it is the status's last line too.

The validation split is by video, not by frame (:func:`split_by_video`): neighbouring frames of one video
look alike, so a checkpoint that beats the served model on frames next to its training frames says little
about other videos. With labels of one video only, training validates on that video's frames as MONAI
Label does, but the served model is kept unless ``replace_from_one_video`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import torch
from monailabel.tasks.train.bundle import BundleTrainTask

from .labels import fit_problem

logger = logging.getLogger(__name__)

SETTINGS_ID = "monailabel_settings"
RESULT_ID = "monailabel_train_result"
SPLIT_ID = "monailabel_split"
CANDIDATE_DIR_ID = "monailabel_candidate_dir"
REFERENCE_DATASET_ID = "monailabel_reference_dataset"
SITE_FRAMES_ID = "monailabel_site_frames"
#: The datastore's image info key naming the video a frame came from (set when a video is uploaded).
VIDEO_INFO_KEY = "video"
BEST_MODEL_DIR_ID = "validate#best_model_saver#save_dir"
#: the request's own keys and their defaults here (MONAI Label's own defaults: 50 epochs, val_split 0.2, cuda)
REQUEST_DEFAULTS = {"max_epochs": 12, "val_split": 0.25}
#: Bounds on what a request may ask: each mix is one validation per epoch, each repeat a copy of the new frames.
MAX_WEIGHT_MIXES = 8
MAX_NEW_LABEL_REPEATS = 16


class TrainingRefused(RuntimeError):
    """Training could not run on these labels or settings; the message says why."""


#: The video of frames whose ids carry no video name (bare frame numbers, as ffmpeg's %05d writes them) or no
#: frame number: their videos cannot be told apart, so they count as one.
UNNAMED_VIDEO = "(frames without a video name)"
_BARE_NUMBER = re.compile(r"^(frame[_-]?)?\d+$", re.IGNORECASE)
_VIDEO_AND_FRAME = re.compile(r"^(.+?)[_-]frame[_-]?\d+$", re.IGNORECASE)
_VIDEO_AND_NUMBER = re.compile(r"^(.+)_\d+$")


def image_id(path: str) -> str:
    """The datastore's image id of a frame file: its name without the extension."""
    return os.path.splitext(os.path.basename(str(path)))[0]


def video_of(frame_id: str) -> str:
    """The video of a frame, from its image id (the app README's naming rule):

    - ``<video>_frame<number>`` (also ``-frame``, ``_frame_``): ``video01_frame0001`` -> ``video01``;
    - ``<video>_<number>``: ``seq_1_00005`` -> ``seq_1``;
    - a bare number (``00000``, ``frame0001``) or an id without a frame number (``seq_1_a``): their videos cannot
      be told apart, so all such frames are one video, :data:`UNNAMED_VIDEO`.
    """
    if _BARE_NUMBER.match(frame_id):
        return UNNAMED_VIDEO
    match = _VIDEO_AND_FRAME.match(frame_id) or _VIDEO_AND_NUMBER.match(frame_id)
    return match.group(1) if match else UNNAMED_VIDEO


def video_of_item(item: dict) -> str:
    """The video of a datalist item: its ``video`` (from the datastore's image info), else :func:`video_of` its
    image id."""
    video = item.get(VIDEO_INFO_KEY)
    return str(video) if video not in (None, "") else video_of(image_id(item["image"]))


def videos_of(datalist) -> list[str]:
    """The sorted videos of the frames of ``[{"image": file, ...}]``."""
    return sorted({video_of_item(item) for item in datalist or []})


def held_out_frames(datalist: list[dict], val_split: float) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) of frames of one video: ``val_split`` of them (at least one, at most
    all but one) held out, spread evenly along the video (image ids in order), so that they are as far from
    the training frames as the labels allow. Fewer than two frames: all for training."""
    frames = sorted(datalist, key=lambda item: image_id(item["image"]))
    if len(frames) < 2:
        return frames, []
    count = min(len(frames) - 1, max(1, round(val_split * len(frames))))
    chosen = {int((index + 0.5) * len(frames) / count) for index in range(count)}
    return [f for i, f in enumerate(frames) if i not in chosen], [f for i, f in enumerate(frames) if i in chosen]


def evenly_spaced(items: list, count: int) -> list:
    """``count`` of ``items`` (all when fewer) at evenly spaced positions, in their order."""
    if count >= len(items):
        return list(items)
    return [items[int((index + 0.5) * len(items) / count)] for index in range(count)] if count > 0 else []


def reference_items(dataset_dir: str) -> tuple[list[dict], list[dict]]:
    """The (training, validation) frames of a prepared dataset (its dataset.json) as datalist items of absolute
    files. Raises TrainingRefused when the folder holds no readable dataset.json or a listed file is missing."""
    path = os.path.join(dataset_dir, "dataset.json")
    try:
        with open(path) as handle:
            description = json.load(handle)
        splits = [
            [
                {"image": os.path.join(dataset_dir, item["image"]), "label": os.path.join(dataset_dir, item["label"])}
                for item in description.get(split) or []
            ]
            for split in ("training", "validation")
        ]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise TrainingRefused(
            f"the reference dataset {dataset_dir} ({REFERENCE_DATASET_ID} of the served bundle) cannot be read: "
            f"{error}; make the bundle folder again with a dataset folder that holds dataset.json"
        ) from None
    missing = [item[key] for split in splits for item in split for key in ("image", "label")]
    missing = [file for file in missing if not os.path.isfile(file)]
    if missing:
        raise TrainingRefused(f"the reference dataset {dataset_dir} lacks {len(missing)} files, e.g. {missing[0]}")
    return splits[0], splits[1]


def split_by_video(datalist: list[dict], val_split: float) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """Whole videos for validation, the others for training: (training items, validation items, training
    videos, validation videos), each list sorted by image id.

    Videos are taken in a fixed order (by the SHA-256 of their name, so neither the order the frames were
    labelled in nor the names' sort order decides), each one while it brings the validation frames closer
    to ``val_split`` of all frames; at least one video is validated on and at least one trained on (when
    no video fits under twice the target, the smallest is validated on).

    Raises:
        ValueError: fewer than two videos, or ``val_split`` not in (0, 1).
    """
    if not 0 < val_split < 1:
        raise ValueError(f"val_split must be in (0, 1) to split by video, got {val_split!r}")
    frames: dict[str, list[dict]] = {}
    for item in sorted(datalist, key=lambda item: image_id(item["image"])):
        frames.setdefault(video_of_item(item), []).append(item)
    if len(frames) < 2:
        raise ValueError(f"splitting by video needs frames of at least two videos, got {sorted(frames)}")
    target = val_split * len(datalist)
    order = sorted(frames, key=lambda video: (hashlib.sha256(video.encode()).hexdigest(), video))
    chosen, count = [], 0
    for video in order:
        size = len(frames[video])
        if len(chosen) < len(frames) - 1 and abs(count + size - target) < abs(count - target):
            chosen.append(video)
            count += size
    if not chosen:
        chosen = [min(order, key=lambda video: len(frames[video]))]
    training = [item for video in sorted(frames) if video not in chosen for item in frames[video]]
    validation = [item for video in sorted(chosen) for item in frames[video]]
    return training, validation, sorted(set(frames) - set(chosen)), sorted(chosen)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


class SurgicalSAMTrainTask(BundleTrainTask):
    #: The served model's reference dataset for this request (set per request; none: the guard without one).
    _reference: str | None = None

    def settings(self) -> dict:
        return dict(self.bundle_config.get(SETTINGS_ID, {}))

    def config(self) -> dict:
        options = super().config()
        options.update(REQUEST_DEFAULTS)
        options.update(self.settings())
        return options

    def reference_dataset(self) -> str | None:
        """The served bundle's reference dataset folder (``monailabel_reference_dataset``; relative to the bundle
        folder), or None."""
        if not self.bundle_config.get(REFERENCE_DATASET_ID):
            return None
        folder = str(self.bundle_config.get_parsed_content(REFERENCE_DATASET_ID, instantiate=True))
        return os.path.normpath(os.path.join(self.bundle_path, folder))

    def check_settings(self, request: dict) -> dict:
        """The overlay's settings with the request's values, checked (TrainingRefused says what is wrong)."""
        settings = self.settings()
        for key, default in settings.items():
            if key not in request:
                continue
            value = request[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TrainingRefused(f"{key} must be true or false, got {value!r}")
            elif isinstance(default, list):
                if (
                    not isinstance(value, list)
                    or not 1 <= len(value) <= MAX_WEIGHT_MIXES
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in value)
                ):
                    raise TrainingRefused(
                        f"{key} must be a list of 1 to {MAX_WEIGHT_MIXES} numbers in (0, 1], got {value!r}"
                    )
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise TrainingRefused(f"{key} must be a number >= 0, got {value!r}")
                if isinstance(default, int) and not isinstance(default, bool) and int(value) != value:
                    raise TrainingRefused(f"{key} must be a whole number, got {value!r}")
            settings[key] = value
        if not settings.get("learning_rate", 1):
            raise TrainingRefused("learning_rate must be > 0")
        if settings.get("new_label_repeats", 1) > MAX_NEW_LABEL_REPEATS:
            raise TrainingRefused(
                f"new_label_repeats must be at most {MAX_NEW_LABEL_REPEATS}, got {settings['new_label_repeats']!r}"
            )
        val_split = request.get("val_split", REQUEST_DEFAULTS["val_split"])
        if (
            isinstance(val_split, bool)
            or not isinstance(val_split, (int, float))
            or not (val_split == -1 or 0 <= val_split < 1)
        ):
            raise TrainingRefused(
                f"val_split must be in [0, 1) (or -1: the bundle's own validation list), got {val_split!r}"
            )
        epochs = request.get("max_epochs", REQUEST_DEFAULTS["max_epochs"])
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise TrainingRefused(f"max_epochs must be a whole number >= 1, got {epochs!r}")
        return settings

    def __call__(self, request, datastore):
        for key, value in REQUEST_DEFAULTS.items():
            request.setdefault(key, value)
        if not request.get("device") or isinstance(request.get("device"), list):
            request["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        self._settings = self.check_settings(request)
        self._split, self._skipped, self._site_frames = {}, {}, None
        self._reference = self.reference_dataset()
        result_file = self.bundle_config.get_parsed_content(RESULT_ID, instantiate=True)
        if os.path.isfile(result_file):
            os.remove(result_file)
        self._candidate_dir = self.bundle_config.get_parsed_content(CANDIDATE_DIR_ID, instantiate=True)
        shutil.rmtree(self._candidate_dir, ignore_errors=True)  # a candidate is only ever the last training's
        try:
            super().__call__(request, datastore)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # also the bundle's TrainingDataRefused, a BaseException (see its docstring)
            cause = _root_cause(error)
            logger.error("training failed: %s: %s", type(cause).__name__, cause)
            raise TrainingRefused(f"training failed: {type(cause).__name__}: {cause}") from None
        if not os.path.isfile(result_file):
            raise TrainingRefused(f"training ended without its result file {result_file} (see the log above)")
        with open(result_file) as handle:
            result = json.load(handle)
        if "candidate_model" not in result:  # the saver's copy of the served model (epoch 0) is no candidate
            shutil.rmtree(self._candidate_dir, ignore_errors=True)
        result["settings"] = self._settings
        if self._skipped:
            result["skipped_frames"] = self._skipped
        return result

    def _fetch_datalist(self, request, datastore):
        """The datastore's labelled frames, each with its ``video`` when the datastore's image info names one,
        less those whose label map does not fit the frame (e.g. a frame replaced on disk under its label): each skipped and named with the reason (``skipped_frames`` of the
        result, and the log); TrainingRefused when no frame is left."""
        datalist = super()._fetch_datalist(request, datastore)
        kept = []
        for item in datalist:
            video = (datastore.get_image_info(image_id(item["image"])) or {}).get(VIDEO_INFO_KEY)
            if video not in (None, ""):
                item[VIDEO_INFO_KEY] = str(video)
            problem = fit_problem(item["image"], item["label"])
            if problem:
                frame = image_id(item["image"])
                self._skipped[frame] = (
                    f"{problem}: skipped; save a label that fits it again (PUT /datastore/label?image={frame})"
                )
                logger.warning("frame %s %s", frame, self._skipped[frame])
            else:
                kept.append(item)
        if datalist and not kept:
            raise TrainingRefused(f"no labelled frame can be trained on: {self._skipped}")
        return kept

    def _partition_datalist(self, datalist, request, shuffle=False):
        """Training and validation items: whole videos for validation when the labels come from two videos
        or more (``val_split`` > 0); MONAI Label's own split otherwise (-1: the bundle's validation list, 0:
        none, and the frames of a single video). Records the videos, and, when a single video is validated
        on and ``replace_from_one_video`` is false, why the served model is kept (``hold``)."""
        val_split = request.get("val_split", REQUEST_DEFAULTS["val_split"])
        videos = videos_of(datalist)
        if self._reference and val_split > 0:
            return self._partition_with_reference(datalist, val_split, videos)
        if val_split > 0 and len(videos) >= 2:
            training, validation, training_videos, validation_videos = split_by_video(datalist, val_split)
            logger.info(
                "validation split by video: %d frames of %s for validation, %d frames of %s for training",
                len(validation),
                validation_videos,
                len(training),
                training_videos,
            )
        else:
            training, validation = super()._partition_datalist(datalist, request, shuffle)
            training_videos, validation_videos = videos_of(training), videos_of(validation)
        self._split = {"training_videos": training_videos, "validation_videos": validation_videos}
        if validation and len(videos) == 1 and not self._settings.get("replace_from_one_video"):
            self._split["hold"] = (
                f"every labelled frame is from video {videos[0]}, so its validation frames are neighbours of its "
                f"training frames and say nothing about other videos; label frames of at least two videos, or set "
                f"replace_from_one_video"
                + (
                    " (image ids without a video name count as one video: name frames <video>_<number> or "
                    "<video>_frame<number>)"
                    if videos[0] == UNNAMED_VIDEO
                    else ""
                )
            )
            self._split["candidate_dir"] = self._candidate_dir
        return training, validation

    def _partition_with_reference(self, datalist, val_split, videos):
        """The recipe with a reference dataset: the new labels split by video (two videos or more) or, of one
        video, with ``val_split`` of its frames held out along it (:func:`held_out_frames`); training is the new
        frames ``new_label_repeats`` times and ``replay_frames`` of the reference's training frames, validation
        the held-out frames (``monailabel_site_frames`` of them: the SiteGuardMetric's split) and then the
        reference's validation frames."""
        if len(videos) >= 2:
            training, validation, training_videos, validation_videos = split_by_video(datalist, val_split)
        else:
            training, validation = held_out_frames(datalist, val_split)
            training_videos, validation_videos = videos_of(training), videos_of(validation)
        replay, reference = reference_items(self._reference)
        replay = evenly_spaced(replay, int(self._settings.get("replay_frames", 0)))
        repeats = max(1, int(self._settings.get("new_label_repeats", 1)))
        if not validation:  # nothing new to validate on: no validation at all (replace_unvalidated decides)
            reference = []
        self._site_frames = len(validation)
        self._split = {
            "training_videos": training_videos,
            "validation_videos": validation_videos,
            "reference_dataset": self._reference,
            "replayed_frames": len(replay),
            "reference_frames": len(reference),
        }
        logger.info(
            "validation: %d held-out frames of %s and %d reference frames (%s); training: %d frames of %s and "
            "%d reference frames replayed (each new frame %d times per epoch)",
            len(validation),
            validation_videos,
            len(reference),
            self._reference,
            len(training),
            training_videos,
            len(replay),
            repeats,
        )
        return training * repeats + replay, validation + reference

    def _update_overrides(self, overrides):
        overrides[SITE_FRAMES_ID] = self._site_frames
        overrides[SETTINGS_ID] = self._settings
        overrides[SPLIT_ID] = self._split
        if self._split.get("hold"):  # the best checkpoint goes to the candidate folder, not models/model.pt
            overrides[BEST_MODEL_DIR_ID] = self._candidate_dir
        return overrides
