"""SurgicalSAM cut in two graphs for ONNX export, as segment-anything's own ONNX export cuts SAM.

SAM's export (``segment_anything/utils/onnx.py``) keeps the heavy image encoder out of the prompt graph,
so that a frame is embedded once and then prompted many times. SurgicalSAM is cut at the same place:

- :class:`SurgicalSAMEncoder`: SAM input (N, 3, S, S) (resized, normalised, zero-padded, see
  :func:`~scripts.sam.geometry.frames_to_sam_input`) -> image embedding (N, d, h, w). The frozen SAM encoder.
- :class:`SurgicalSAMClassDecoder`: image embeddings (N, d, h, w) and the class prompted for each of them
  (N,) in 1..C -> low-resolution logits (N, 1, 4h, 4w) and the IoU head's quality (N,). The prototype bank,
  the prototype-based prompt encoder and SAM's mask decoder: every (frame, class) pair of a frame is
  decoded in one batch.

Both take their weights from a (trained) :class:`~.network.SurgicalSAM` and compute exactly what it
computes (``SurgicalSAM.embed_frames`` and ``SurgicalSAM.decode``). The resize of a frame of any size to
SAM's square input and the upsampling of the low-resolution logits back to the frame stay outside the
graphs (:mod:`scripts.sam.geometry`), so the graphs are fixed only at SAM's input side S and take frames of any
size; N is dynamic in both.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sam.batched_mask_decoder import decode_masks
from .network import SurgicalSAM


class SurgicalSAMEncoder(nn.Module):
    """SAM input (N, 3, S, S) float -> image embedding (N, d, h, w)."""

    def __init__(self, model: SurgicalSAM) -> None:
        super().__init__()
        if model.image_encoder is None:
            raise ValueError("the SurgicalSAM has no image encoder: build it with with_image_encoder=True")
        self.image_encoder = model.image_encoder

    def forward(self, sam_input: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(sam_input)


class SurgicalSAMClassDecoder(nn.Module):
    """Image embeddings (N, d, h, w) and class ids (N,) int64 in 1..C -> logits (N, 1, 4h, 4w), quality (N,)."""

    def __init__(self, model: SurgicalSAM) -> None:
        super().__init__()
        self.prototypes = model.prototypes
        self.class_prompt_encoder = model.class_prompt_encoder
        self.mask_decoder = model.mask_decoder
        # the positional encoding depends on nothing but the grid: a constant of the graph
        self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def forward(self, image_embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense, sparse = self.class_prompt_encoder(image_embeddings, self.prototypes(), class_ids)
        low_res, quality = decode_masks(self.mask_decoder, image_embeddings, self.image_pe, sparse, dense, False)
        return low_res, quality[:, 0]
