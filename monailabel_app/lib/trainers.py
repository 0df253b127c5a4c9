"""Fine-tuning the served model from MONAI Label's /train, with the settings a team changes.

MONAI Label's ``BundleTrainTask`` runs the bundle's ``configs/train.json`` (train.yaml + the fine-tuning
overlay monailabel_train.yaml) and passes only ``max_epochs``, ``val_split`` and ``device`` from the request.
:class:`SurgicalSAMTrainTask` also passes the overlay's ``monailabel_settings`` (learning rate, gradient
clipping, absent prompts, early stopping, whether an unvalidated model may replace the served one), checks
them, and returns the overlay's result (served model replaced or kept, scores) as the task's result, which
MONAI Label prints as the last line of the train status ``details``. When training fails, the root cause
(e.g. which label map does not fit which frame) is raised alone, so that it is the status's last line too.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

SETTINGS_ID = "monailabel_settings"
RESULT_ID = "monailabel_train_result"
#: the request's own keys and their defaults here (MONAI Label's own defaults: 50 epochs, val_split 0.2, cuda)
REQUEST_DEFAULTS = {"max_epochs": 10, "val_split": 0.25}


class TrainingRefused(RuntimeError):
    """Training could not run on these labels or settings; the message says why."""


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


class SurgicalSAMTrainTask(BundleTrainTask):
    def settings(self) -> dict:
        return dict(self.bundle_config.get(SETTINGS_ID, {}))

    def config(self) -> dict:
        options = super().config()
        options.update(REQUEST_DEFAULTS)
        options.update(self.settings())
        return options

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
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise TrainingRefused(f"{key} must be a number >= 0, got {value!r}")
                if isinstance(default, int) and not isinstance(default, bool) and int(value) != value:
                    raise TrainingRefused(f"{key} must be a whole number, got {value!r}")
            settings[key] = value
        if not settings.get("learning_rate", 1):
            raise TrainingRefused("learning_rate must be > 0")
        val_split = request.get("val_split", REQUEST_DEFAULTS["val_split"])
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not (val_split == -1 or 0 <= val_split < 1):
            raise TrainingRefused(f"val_split must be in [0, 1) (or -1: the bundle's own validation list), got {val_split!r}")
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
        result_file = self.bundle_config.get_parsed_content(RESULT_ID, instantiate=True)
        if os.path.isfile(result_file):
            os.remove(result_file)
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
        result["settings"] = self._settings
        return result

    def _update_overrides(self, overrides):
        overrides[SETTINGS_ID] = self._settings
        return overrides
