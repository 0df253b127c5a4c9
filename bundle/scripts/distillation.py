"""Glue between Distillation-SAM and MONAI's engines: frame datasets, batch preparation, inferer.

Distillation-SAM trains on raw frames (its adapter sees the image and the SAM encoder's intermediate
tokens, which the embedding cache does not hold), so these read frames and label maps from a prepared
dataset (``dataset.json``, see ``scripts.data.layout``). Caching the tapped tokens is a later step.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from torch.utils.data import Dataset

from .data.augmentation import augment_frame, version_for_epoch
from .data.layout import DEFAULT_IGNORE_INDEX, load_datalist, read_frame, read_label_map

__all__ = ["FrameLabelDataset", "DistillationBatch", "SemanticInferer", "check_distill_inputs"]


class FrameLabelDataset(Dataset):
    """Frames and label maps of one split: ``image`` (3, H, W) float32 0..255, ``label`` (1, H, W) long, ``key``.

    Training augmentation follows the SurgicalSAM recipe's versions (``scripts.data.augmentation``):
    epoch e uses version ``version_for_epoch(e, augmentation_versions)`` for every frame, drawn per frame
    on the fly. ``set_epoch`` is called by ``scripts.engines.AugmentationVersionHandler``.

    Args:
        dataset_dir: prepared dataset folder.
        split: ``training`` / ``validation`` / ...
        num_classes: C (label values must be 0..C or ``ignore_index``).
        augmentation_versions: 0 = no augmentation (validation).
        seed: augmentation seed.
        ignore_index: label value of unlabelled pixels.
    """

    def __init__(self, dataset_dir: str, split: str, num_classes: int, augmentation_versions: int = 0,
                 seed: int = 666, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        self.datalist = load_datalist(dataset_dir, split)
        self.num_classes, self.augmentation_versions = num_classes, augmentation_versions
        self.seed, self.ignore_index = seed, ignore_index
        self.version = 0

    def set_epoch(self, epoch: int) -> None:
        self.version = version_for_epoch(epoch, self.augmentation_versions)

    def __len__(self) -> int:
        return len(self.datalist)

    def __getitem__(self, index: int) -> dict:
        entry = self.datalist[index]
        image = read_frame(entry["image"])
        label = read_label_map(entry["label"], self.num_classes, self.ignore_index)
        if self.version:
            image, label = augment_frame(image, label, self.version, entry["key"], self.seed, self.ignore_index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "label": torch.from_numpy(label.astype(np.int64))[None],
            "key": entry["key"],
        }


class DistillationBatch(PrepareBatch):
    """Batch -> (frames, label (B, 1, H, W), (), {"label": label}): the network gets the label for its teacher."""

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        frames = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking, **kwargs)
        return frames, label, (), {"label": label}


class SemanticInferer(Inferer):
    """Run a semantic network (``DistillationSAM``) on frames: one pass, no class prompt, no GT.

    This is the ``auto`` protocol of SPEC 7: every frame gets a metric entry.

    Args:
        output: ``dict`` (for evaluators: ``label_map`` (B, 1, H, W) and ``has_entry`` (B,) all True) or
            ``label_map`` (the tensor, for inference and MONAI Label).
    """

    def __init__(self, output: str = "dict") -> None:
        if output not in ("dict", "label_map"):
            raise ValueError(f"output must be 'dict' or 'label_map', got {output!r}")
        self.output = output

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        """inputs: frames (B, 3, H, W) 0..255; extra arguments (e.g. ``gt_label``) are not used."""
        label_map = network(inputs)["label_map"].unsqueeze(1)
        if self.output == "label_map":
            return label_map
        return {"label_map": label_map,
                "has_entry": torch.ones(label_map.shape[0], dtype=torch.bool, device=label_map.device)}


def check_distill_inputs(dataset_dir: str | None, sam_variant: str, sam_checkpoint: str | None,
                         model_file: str | None = None, job: str = "train") -> None:
    """Fail at once, naming every missing input (dataset, SAM weights, trained model) and how to make it."""
    import os

    from .engines import missing_sam_weights, raise_input_problems

    problems = []
    if dataset_dir is not None and not os.path.isfile(os.path.join(dataset_dir, "dataset.json")):
        problems.append(f"dataset: no prepared dataset at {dataset_dir} (dataset.json missing). Prepare one (see the "
                        "model card) or pass --dataset_dir; for the demo merge bundle/configs/demo.yaml.")
    problems += missing_sam_weights(sam_variant, sam_checkpoint)
    if model_file is not None and not os.path.isfile(model_file):
        problems.append(f"model: {model_file} not found. Train first (python -m monai.bundle run training "
                        "--config_file bundle/configs/train_distill.yaml ...) or pass --model_file PATH.")
    raise_input_problems(problems, job)
