"""Distillation-SAM's batches: frames, label maps and the cached encoder outputs to the network's inputs."""

from __future__ import annotations

from monai.engines.utils import PrepareBatch

from .datasets import CACHED_KEYS


class DistillationBatch(PrepareBatch):
    """Batch -> (frames, label (B, 1, H, W), (), kwargs) for ``DistillationSAM``.

    kwargs: ``label`` (for the teacher) when ``teacher_label`` (training), and the cached ``embedding``
    (B, d, h, w) and ``taps`` (B, n_taps, h, w, C_vit) when the batch has them (tap cache). For
    validation (``teacher_label=False``) the kwargs go to :class:`SemanticInferer`.
    """

    def __init__(self, teacher_label: bool = True) -> None:
        self.teacher_label = teacher_label

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        def move(key):
            return batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)

        frames, label = move("image"), move("label")
        extra = {key: move(key) for key in CACHED_KEYS if key in batchdata}
        if self.teacher_label:
            extra["label"] = label
        return frames, label, (), extra
