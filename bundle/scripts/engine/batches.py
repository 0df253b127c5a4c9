"""Whole-frame batches for the evaluators, both methods' validation and cross-dataset scoring."""

from __future__ import annotations

from monai.engines.utils import PrepareBatch


class FrameBatch(PrepareBatch):
    """Validation batch of whole frames -> (inputs, label, (), {"gt_label": label}).

    The ground truth goes to the inferer, which uses it only under the ``oracle`` protocol.
    ``label_lut`` (256 entries) maps the dataset's label values to the model's (cross-dataset
    evaluation, see ``scripts.evaluation.class_mapping``); None leaves them as they are.
    """

    def __init__(
        self, image_key: str = "image_embeddings", label_key: str = "label", label_lut: list[int] | None = None
    ) -> None:
        self.image_key, self.label_key, self.label_lut = image_key, label_key, label_lut
        if label_lut is not None and len(label_lut) != 256:
            raise ValueError(f"label_lut must have 256 entries (one per uint8 label value), got {len(label_lut)}")

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        inputs = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        if self.label_lut is not None:
            from ..evaluation.class_mapping import remap_labels

            label = remap_labels(label, self.label_lut)
        return inputs, label, (), {"gt_label": label}
