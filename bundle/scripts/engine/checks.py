"""SurgicalSAM's input checks and the dataset-fact check both methods' configs run in ``initialize``: every
missing input named at once, with the command that makes it."""

from __future__ import annotations

import json
import os

from ..data.layout import prepare_hint, raise_input_problems
from ..errors import MissingInputError
from ..sam.backbone import missing_sam_weights


# ------------------------------------------------------------------------------------------ input checks
def check_training_inputs(
    dataset_dir: str,
    sam_variant: str,
    sam_checkpoint: str | None,
    cache_dir: str,
    config_hint: str = "bundle/configs/train.yaml",
    job: str = "train",
    extra_problems: list[str] | None = None,
    splits: list[str] | None = None,
) -> None:
    """Fail at once, naming every missing input and the command that makes it.

    ``splits``: the dataset.json splits the run reads (train_split, val_split); each must be in the cache.
    The settings dataset.json states are compared next, by :func:`check_dataset_facts` (they are read from
    dataset.json, so they need it to exist first).

    Raises:
        FileNotFoundError: something is missing (the dataset, the SAM weights, the cache or a split of it).
        StaleCacheError: nothing is missing but the cache was made for other inputs.
    """
    from ..embedding_cache import StaleCacheError, cache_identity, cache_problems

    missing = list(extra_problems or [])  # FileNotFoundError: something to make or fetch
    stale: list[str] = []  # StaleCacheError: the cache is there but made for other inputs
    if not os.path.isfile(os.path.join(dataset_dir, "dataset.json")):
        missing.append(
            f"dataset: no prepared dataset at {dataset_dir} (dataset.json missing): {prepare_hint(dataset_dir)}."
        )
    missing += missing_sam_weights(sam_variant, sam_checkpoint)
    if not missing:  # the cache's own check (the one EmbeddingCache opens it with), in this run's words
        cache_missing, cache_stale = cache_problems(
            cache_dir, cache_identity(sam_variant, sam_checkpoint), splits or []
        )
        hint = "<the same config files as this run>"
        missing += [f"embeddings: {problem}".replace(hint, config_hint) for problem in cache_missing]
        stale += [f"embeddings: {problem}".replace(hint, config_hint) for problem in cache_stale]
    raise_input_problems(missing + stale, job, MissingInputError if missing else StaleCacheError)


def check_dataset_facts(
    dataset_dir: str,
    facts: dict,
    cache_dir: str | None = None,
    job: str = "train",
    config_hint: str = "bundle/configs/train.yaml",
) -> None:
    """Fail before any work when the run's ``class_names`` / ``frame_size`` disagree with dataset.json.

    ``facts``: train.yaml's ``dataset_facts_checked`` (a value None is not compared). Class names are compared
    by id and name, also with the classes the embedding cache at ``cache_dir`` was made for. Runs after
    :func:`check_training_inputs` (these settings are read from dataset.json, so it exists by then).

    Raises:
        DatasetError: a setting disagrees with dataset.json (every disagreement named, with the value found).
        StaleCacheError: the settings agree but the cache was made for other class names.
    """
    from ..data.layout import DatasetError, dataset_fact_problems
    from ..embedding_cache import MANIFEST_NAME, StaleCacheError

    facts = {k: v for k, v in (facts or {}).items() if v is not None}
    raise_input_problems(dataset_fact_problems(dataset_dir, **facts), job, DatasetError)
    names = facts.get("class_names")
    manifest = os.path.join(cache_dir, MANIFEST_NAME) if cache_dir else None
    if names is not None and manifest and os.path.isfile(manifest):
        with open(manifest) as handle:
            cached = (json.load(handle).get("dataset") or {}).get("class_names")
        if cached is not None and list(cached) != [str(n) for n in names]:
            raise_input_problems(
                [
                    f"embeddings: the cache at {cache_dir} was made for the classes {cached}, not the run's class_names "
                    f"{list(names)}: it is not used. Pass --cache_dir NEW_FOLDER (or delete {cache_dir}) and run "
                    f"precompute (python -m monai.bundle run precompute --config_file {config_hint} ...)."
                ],
                job,
                StaleCacheError,
            )


def check_evaluation_inputs(
    dataset_dir: str,
    sam_variant: str,
    sam_checkpoint: str | None,
    cache_dir: str,
    model_file: str,
    splits: list[str] | None = None,
) -> None:
    """As :func:`check_training_inputs`, and the trained model must exist."""
    extra = []
    if not os.path.isfile(model_file):
        extra.append(
            f"model: {model_file} not found. Train first (python -m monai.bundle run training "
            "--config_file bundle/configs/train.yaml ...) or pass --model_file PATH."
        )
    check_training_inputs(
        dataset_dir, sam_variant, sam_checkpoint, cache_dir, job="evaluate", extra_problems=extra, splits=splits
    )
