"""Cross-dataset evaluation (paper Table 4): a model trained on one dataset, scored on another, over
the instrument classes the two share.

The shared classes are found by name (case, spaces, ``_`` and ``-`` do not matter); ``class_map``
names pairs whose names differ (``{model class name: evaluation class name}``), or restricts the pairing
(with ``shared_only_from_map``). During evaluation:

- the ground truth (evaluation dataset ids) is brought to the model's ids; pixels of an evaluation
  class the model does not know become ``ignore_index``: they count neither way (the paper considers
  "only the instrument classes shared by both datasets");
- the model is prompted with shared classes only (both protocols), so its label map holds shared
  classes only;
- the metric runs over the model's classes: classes without a partner have no entry in either map,
  so they have no class IoU and do not enter mcIoU; the frame IoUs and cumulative IoU see shared
  classes only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..data.layout import DEFAULT_IGNORE_INDEX


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().casefold()


def shared_classes(
    model_class_names: Sequence[str],
    eval_class_names: Sequence[str],
    class_map: Mapping[str, str] | None = None,
    shared_only_from_map: bool = False,
) -> list[tuple[int, int, str]]:
    """Pairs of (model class id, evaluation class id, name) of the shared classes, ids 1-based.

    Args:
        model_class_names: the model's C names (ids 1..C).
        eval_class_names: the evaluation dataset's K names (ids 1..K).
        class_map: explicit pairs {model name: evaluation name}; they take precedence over equal names.
        shared_only_from_map: pair only the classes in ``class_map`` (no matching by name).

    Raises:
        ValueError: a name in ``class_map`` that is not a class of that side, a class paired twice, or
            no shared class at all (the message lists both class lists).
    """
    model = {_normalise(n): i + 1 for i, n in enumerate(model_class_names)}
    evaluation = {_normalise(n): i + 1 for i, n in enumerate(eval_class_names)}
    pairs: dict[int, int] = {}
    for model_name, eval_name in (class_map or {}).items():
        if _normalise(model_name) not in model:
            raise ValueError(f"class_map: {model_name!r} is not a class of the model ({list(model_class_names)})")
        if _normalise(eval_name) not in evaluation:
            raise ValueError(
                f"class_map: {eval_name!r} is not a class of the evaluation dataset ({list(eval_class_names)})"
            )
        pairs[model[_normalise(model_name)]] = evaluation[_normalise(eval_name)]
    if not shared_only_from_map:
        for name, model_id in model.items():
            if model_id not in pairs and name in evaluation and evaluation[name] not in pairs.values():
                pairs[model_id] = evaluation[name]
    taken = list(pairs.values())
    repeated = sorted({eval_class_names[e - 1] for e in taken if taken.count(e) > 1})
    if repeated:
        raise ValueError(
            f"class_map pairs the evaluation classes {repeated} with several model classes: pair each once"
        )
    if not pairs:
        raise ValueError(
            f"the model's classes {list(model_class_names)} and the evaluation dataset's {list(eval_class_names)} "
            "share no name: give the pairs as class_map {model name: evaluation name}"
        )
    return [(m, e, str(model_class_names[m - 1])) for m, e in sorted(pairs.items())]


def eval_to_model_lut(
    pairs: Sequence[tuple[int, int, str]], num_eval_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX
) -> list[int]:
    """Look-up table (256,) from evaluation label values to model label values.

    0 stays background, a shared evaluation class becomes its model id, an unshared one ``ignore_index``,
    ``ignore_index`` stays; values above K that are not ``ignore_index`` map to ``ignore_index`` as well.
    """
    lut = [ignore_index] * 256
    lut[0] = 0
    for model_id, eval_id, _ in pairs:
        if not 1 <= eval_id <= num_eval_classes:
            raise ValueError(f"evaluation class id {eval_id} outside 1..{num_eval_classes}")
        lut[eval_id] = model_id
    return lut


def model_classes_to_prompt(pairs: Sequence[tuple[int, int, str]] | None) -> list[int] | None:
    """The model class ids to prompt (the shared ones); None when no mapping is configured."""
    return None if pairs is None else sorted(m for m, _, _ in pairs)


def remap_labels(label: torch.Tensor, lut: Sequence[int]) -> torch.Tensor:
    """Apply a 256-entry look-up table to a label map of any shape (values 0..255)."""
    table = torch.as_tensor(lut, dtype=torch.long, device=label.device)
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > 255):
        raise ValueError(f"label values must be in 0..255 to be remapped, got {int(label.min())}..{int(label.max())}")
    return table[label.long()]
