"""Call SAM's ``MaskDecoder`` on a batch of (image, prompt) pairs in one pass.

segment-anything's ``MaskDecoder.predict_masks`` is written for one image and many prompts: it
repeats the image embedding once per prompt. With one prompt set per image (SurgicalSAM,
Distillation-SAM) that repeat would pair every image with every prompt, so the original loops over
the batch in Python. :func:`decode_masks` runs the decoder's own sub-modules on B pairs at once and
gives the numbers the per-sample calls give (``tests/test_networks.py`` proves it).
"""

from __future__ import annotations

import torch
from torch import nn


def decode_masks(
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool = False,
    return_mask_tokens: bool = False,
    all_mask_outputs: bool = False,
):
    """
    Args:
        mask_decoder: segment-anything ``MaskDecoder``.
        image_embeddings: (B, d, h, w), one per pair.
        image_pe: (1, d, h, w) positional encoding (``PromptEncoder.get_dense_pe()``).
        sparse_prompt_embeddings: (B, N, d).
        dense_prompt_embeddings: (B, d, h, w).
        multimask_output: the 3 multimask outputs (True) or the single one (False), as SAM.
        return_mask_tokens: also return the decoder's mask-token outputs (B, 1 + 3, d).
        all_mask_outputs: return the masks and IoU predictions of all 1 + 3 mask tokens (K = 4,
            token order as the decoder's), overriding ``multimask_output`` (Distillation-SAM).

    Returns:
        low-res mask logits (B, K, 4h, 4w) and IoU predictions (B, K), K = 3 or 1 (4 with
        ``all_mask_outputs``)
        [, mask tokens (B, num_mask_tokens, d)].
    """
    batch = image_embeddings.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(batch, -1, -1, -1)
    _, channels, height, width = src.shape

    hs, src = mask_decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + mask_decoder.num_mask_tokens, :]

    src = src.transpose(1, 2).reshape(batch, channels, height, width)
    upscaled = mask_decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mask_decoder.output_hypernetworks_mlps)], dim=1
    )
    _, up_channels, up_height, up_width = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(batch, up_channels, up_height * up_width)).reshape(
        batch, -1, up_height, up_width
    )
    iou_pred = mask_decoder.iou_prediction_head(iou_token_out)

    if all_mask_outputs:
        mask_slice = slice(None)
    else:
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    if return_mask_tokens:
        return masks[:, mask_slice], iou_pred[:, mask_slice], mask_tokens_out
    return masks[:, mask_slice], iou_pred[:, mask_slice]
