"""Convert a checkpoint of the original SurgicalSAM code into this bundle's ``models/model.pt``.

The original saves one dict of three state dicts (the original SurgicalSAM code's format)::

    {"prototype_prompt_encoder_state_dict": {dense_fc_1.*, dense_fc_2.*, sparse_fc_1.*, sparse_fc_2.*,
                                             pn_cls_embeddings.0.weight (n, d) negative,
                                             pn_cls_embeddings.1.weight (n, d) positive},
     "sam_decoder_state_dict": SAM MaskDecoder keys without prefix (transformer.*, iou_token.weight, ...),
     "prototypes_state_dict": {"class_embeddings.weight": (C, d)}}

The bundle's :class:`~scripts.surgical_sam.network.SurgicalSAM` keeps the same module names under
the prefixes ``class_prompt_encoder.``, ``mask_decoder.`` and ``prototypes.``, plus the frozen SAM
prompt encoder (``prompt_encoder.*``: positional encoding and point embeddings), which the original
does not save because it comes from the SAM checkpoint: the conversion copies it from there.
The result is ``{"model": state_dict}``, what the bundle's ``CheckpointLoader`` (``load_dict={"model":
network}``) and MONAI Label read.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import BundleError
from ..files import atomic_write
from ..sam.checkpoint import read_checkpoint_dict, state_dict_mismatch

logger = logging.getLogger(__name__)

PROMPT_ENCODER_KEY = "prototype_prompt_encoder_state_dict"
DECODER_KEY = "sam_decoder_state_dict"
PROTOTYPES_KEY = "prototypes_state_dict"
ORIGINAL_KEYS = (PROMPT_ENCODER_KEY, DECODER_KEY, PROTOTYPES_KEY)
#: Keys of the original prompt encoder (module names as in the original code).
PROMPT_ENCODER_PARAMS = (
    "dense_fc_1.weight",
    "dense_fc_1.bias",
    "dense_fc_2.weight",
    "dense_fc_2.bias",
    "sparse_fc_1.weight",
    "sparse_fc_1.bias",
    "sparse_fc_2.weight",
    "sparse_fc_2.bias",
    "pn_cls_embeddings.0.weight",
    "pn_cls_embeddings.1.weight",
)
PROTOTYPE_PARAM = "class_embeddings.weight"
#: Bundle prefixes of the three parts and of the frozen SAM prompt encoder.
BUNDLE_PREFIXES = {
    PROMPT_ENCODER_KEY: "class_prompt_encoder.",
    DECODER_KEY: "mask_decoder.",
    PROTOTYPES_KEY: "prototypes.",
}
SAM_PROMPT_ENCODER_PREFIX = "prompt_encoder."


class OriginalCheckpointError(BundleError, ValueError):
    """The file is not an original SurgicalSAM checkpoint that fits the requested configuration."""


def _load(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return read_checkpoint_dict(path, what, OriginalCheckpointError)


def _describe_foreign(content: dict) -> str:
    keys = list(content)
    if "model" in content and isinstance(content["model"], dict):
        return (
            "it holds {'model': ...}: it looks like a bundle model.pt already (no conversion needed; "
            "use it as models/model.pt)"
        )
    if any(str(k).startswith("image_encoder.") for k in keys):
        return "it holds SAM weights (image_encoder.*): pass it as --sam_checkpoint, and the SurgicalSAM checkpoint as --src"
    return f"its top-level keys are {keys[:6]}"


def original_to_bundle_state_dict(
    original: dict,
    sam_state_dict: dict,
    num_classes: int | None = None,
    num_tokens: int | None = None,
    source: str = "the checkpoint",
) -> tuple[dict, dict]:
    """Rename the original's three state dicts into the bundle's keys, checking keys and shapes.

    Args:
        original: the original checkpoint (the dict of three state dicts above).
        sam_state_dict: the SAM checkpoint's state dict (``mask_decoder.*`` gives the expected decoder
            keys and shapes, ``prompt_encoder.*`` the frozen prompt encoder copied in).
        num_classes: C expected; None takes it from ``class_embeddings.weight`` (C, d).
        num_tokens: n expected; None takes it from ``pn_cls_embeddings.0.weight`` (n, d).
        source: the file name, for messages.

    Returns:
        (bundle state dict, {"num_classes": C, "num_tokens": n, "grid_positions": h*w, "embed_dim": d}).

    Raises:
        OriginalCheckpointError: a missing part or key, an unexpected key, a wrong shape, or C / n
            other than the ones asked for, each named.
    """
    missing_parts = [key for key in ORIGINAL_KEYS if key not in original]
    if missing_parts:
        raise OriginalCheckpointError(
            f"{source} is not an original SurgicalSAM checkpoint: it lacks {missing_parts} "
            f"({_describe_foreign(original)}). The original saves a dict with {list(ORIGINAL_KEYS)}."
        )
    parts = {key: {str(k).removeprefix("module."): v for k, v in original[key].items()} for key in ORIGINAL_KEYS}

    prototypes = parts[PROTOTYPES_KEY]
    if set(prototypes) != {PROTOTYPE_PARAM}:
        raise OriginalCheckpointError(
            f"{source}: {PROTOTYPES_KEY} must hold exactly {PROTOTYPE_PARAM!r} (C, d), it holds {sorted(prototypes)}"
        )
    class_embeddings = prototypes[PROTOTYPE_PARAM]
    if class_embeddings.ndim != 2:
        raise OriginalCheckpointError(
            f"{source}: {PROTOTYPE_PARAM} must be (C, d), got {tuple(class_embeddings.shape)}"
        )
    found_classes, embed_dim = (int(x) for x in class_embeddings.shape)
    if num_classes is not None and int(num_classes) != found_classes:
        raise OriginalCheckpointError(
            f"{source} was trained for {found_classes} classes ({PROTOTYPE_PARAM} is {tuple(class_embeddings.shape)}), "
            f"not num_classes={num_classes}: pass --num_classes {found_classes} and that dataset's class names, "
            "or the checkpoint of the dataset you mean (EndoVis2018 and EndoVis2017 both have 7 classes)."
        )

    encoder = parts[PROMPT_ENCODER_KEY]
    # the names first: the shapes the encoder must have follow from its own tensors (checked below)
    details = state_dict_mismatch(encoder, {k: encoder.get(k) for k in PROMPT_ENCODER_PARAMS})
    if details:
        raise OriginalCheckpointError(
            f"{source}: {PROMPT_ENCODER_KEY} does not fit the original prototype-based prompt encoder "
            f"({list(PROMPT_ENCODER_PARAMS)}): {'; '.join(details)}."
        )
    found_tokens = int(encoder["pn_cls_embeddings.0.weight"].shape[0])
    if num_tokens is not None and int(num_tokens) != found_tokens:
        raise OriginalCheckpointError(
            f"{source} was trained with {found_tokens} tokens per class (pn_cls_embeddings.0.weight is "
            f"{tuple(encoder['pn_cls_embeddings.0.weight'].shape)}), not num_tokens={num_tokens}: pass "
            f"--num_tokens {found_tokens} (the paper uses 2 for EndoVis2018, 4 for EndoVis2017)."
        )
    hidden_dense = int(encoder["dense_fc_1.weight"].shape[0])
    hidden_sparse = int(encoder["sparse_fc_1.weight"].shape[0])
    positions = int(encoder["sparse_fc_1.weight"].shape[1])
    expected_shapes = {
        "dense_fc_1.weight": (hidden_dense, embed_dim, 1, 1),
        "dense_fc_1.bias": (hidden_dense,),
        "dense_fc_2.weight": (embed_dim, hidden_dense, 1, 1),
        "dense_fc_2.bias": (embed_dim,),
        "sparse_fc_1.weight": (hidden_sparse, positions, 1),
        "sparse_fc_1.bias": (hidden_sparse,),
        "sparse_fc_2.weight": (found_tokens, hidden_sparse, 1),
        "sparse_fc_2.bias": (found_tokens,),
        "pn_cls_embeddings.0.weight": (found_tokens, embed_dim),
        "pn_cls_embeddings.1.weight": (found_tokens, embed_dim),
    }
    expected = {k: torch.empty(shape, device="meta") for k, shape in expected_shapes.items()}
    details = state_dict_mismatch(encoder, expected, expected_as="in the original encoder")
    if details:
        raise OriginalCheckpointError(
            f"{source}: {PROMPT_ENCODER_KEY} has tensors of unexpected shape: {'; '.join(details)}."
        )

    sam_decoder = {
        k.removeprefix("mask_decoder."): v for k, v in sam_state_dict.items() if k.startswith("mask_decoder.")
    }
    sam_prompt = {k: v for k, v in sam_state_dict.items() if k.startswith(SAM_PROMPT_ENCODER_PREFIX)}
    if not sam_decoder or not sam_prompt:
        raise OriginalCheckpointError(
            "the SAM checkpoint has no mask_decoder.* / prompt_encoder.* keys: pass the "
            "official SAM checkpoint the model was trained with (sam_vit_h_4b8939.pth)"
        )
    decoder = parts[DECODER_KEY]
    if any(k.startswith("mask_decoder.") for k in decoder):
        decoder = {k.removeprefix("mask_decoder."): v for k, v in decoder.items()}
    details = state_dict_mismatch(decoder, sam_decoder, expected_as="in SAM's mask decoder")
    if details:
        raise OriginalCheckpointError(f"{source}: {DECODER_KEY} does not fit SAM's mask decoder: {'; '.join(details)}.")
    if int(sam_prompt["prompt_encoder.point_embeddings.0.weight"].shape[-1]) != embed_dim:
        raise OriginalCheckpointError(f"{source} has d={embed_dim} but the SAM checkpoint's prompt encoder another d")

    state = {}
    for part, prefix in BUNDLE_PREFIXES.items():
        tensors = decoder if part == DECODER_KEY else parts[part]
        state.update({prefix + k: v.detach().clone() for k, v in tensors.items()})
    state.update({k: v.detach().clone() for k, v in sam_prompt.items()})
    return state, {
        "num_classes": found_classes,
        "num_tokens": found_tokens,
        "grid_positions": positions,
        "embed_dim": embed_dim,
    }


def convert_original_checkpoint(
    src: str, dst: str, sam_checkpoint: str, num_classes: int | None = None, num_tokens: int | None = None
) -> dict:
    """Read the original checkpoint ``src`` and the SAM checkpoint, write ``{"model": state_dict}`` to ``dst``.

    Returns the inferred configuration (num_classes, num_tokens, grid_positions = h*w, embed_dim).
    """
    original = _load(src, "original SurgicalSAM checkpoint")
    sam = _load(sam_checkpoint, "SAM checkpoint")
    if "model" in sam and isinstance(sam["model"], dict):
        sam = sam["model"]
    state, info = original_to_bundle_state_dict(original, sam, num_classes, num_tokens, source=src)
    atomic_write(dst, lambda temporary: torch.save({"model": state}, temporary))
    logger.info("converted %s -> %s (%s)", src, dst, info)
    return info
