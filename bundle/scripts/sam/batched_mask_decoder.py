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
    # The transformer reads the grid as tokens, (B, h*w, d): channels-last memory makes that view contiguous,
    # so its additions, projections and head splits do not stride across the grid (same numbers).
    src = (image_embeddings + dense_prompt_embeddings).contiguous(memory_format=torch.channels_last)
    pos_src = image_pe.contiguous(memory_format=torch.channels_last).expand(batch, -1, -1, -1)
    _, channels, height, width = src.shape

    hs, src = mask_decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + mask_decoder.num_mask_tokens, :]

    src = src.transpose(1, 2).reshape(batch, channels, height, width)
    upscaled = upscale(mask_decoder.output_upscaling, src)
    if all_mask_outputs:
        mask_slice = slice(None)
    else:
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mask_decoder.output_hypernetworks_mlps)], dim=1
    )
    masks = hypernetwork_masks(hyper_in[:, mask_slice], upscaled)  # only the masks returned
    iou_pred = mask_decoder.iou_prediction_head(iou_token_out)
    if hyper_in.requires_grad and masks.shape[1] < hyper_in.shape[1]:
        # the other tokens' hypernetwork MLPs keep a zero gradient, as when all masks are made and sliced
        # (Adam's weight decay then moves them the same way); adding 0 changes no number
        iou_pred = iou_pred + 0.0 * hyper_in.sum()
    iou_pred = iou_pred[:, mask_slice]

    if return_mask_tokens:
        return masks, iou_pred, mask_tokens_out
    return masks, iou_pred


def upscale(output_upscaling: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` (B, d, h, w) -> (B, c, 4h, 4w), its transposed convolutions as products.

    Each part runs as it is, except a ``ConvTranspose2d`` whose kernel equals its stride (SAM's 2x2,
    stride 2), which runs as :func:`transposed_conv_as_product`.
    """
    for part in output_upscaling:
        features = transposed_conv_as_product(part, features) if _is_patch_transposed_conv(part) else part(features)
    return features


def _is_patch_transposed_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ConvTranspose2d)
        and tuple(module.kernel_size) == tuple(module.stride)
        and tuple(module.padding) == (0, 0)
        and tuple(module.output_padding) == (0, 0)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def transposed_conv_as_product(conv: nn.ConvTranspose2d, features: torch.Tensor) -> torch.Tensor:
    """A transposed convolution whose kernel (kh, kw) equals its stride, as one matrix product.

    Such a convolution writes each input cell's own kh x kw block of the output:
    ``out[b, o, kh*i + p, kw*j + q] = bias[o] + sum_c x[b, c, i, j] * weight[c, o, p, q]``, i.e. the cells
    (B*h*w, c_in) times the weight as (c_in, kh*kw*c_out), then the blocks put in place. The product
    reads channels-last features as they are and returns channels-last output; on the CPU its backward
    is two products, where the convolution's backward costs about three times as much. The same sums.

    Args:
        conv: ``nn.ConvTranspose2d`` with kernel == stride, no padding, dilation 1, groups 1.
        features: (B, c_in, h, w).

    Returns:
        (B, c_out, kh*h, kw*w), channels-last.
    """
    batch, channels, height, width = features.shape
    kernel_h, kernel_w = conv.kernel_size
    out_channels = conv.out_channels
    cells = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view when channels-last
    weight = conv.weight.permute(0, 2, 3, 1).reshape(channels, kernel_h * kernel_w * out_channels)
    if conv.bias is None:
        blocks = cells @ weight  # (B*h*w, kh*kw*c_out), per cell its block of (p, q, o)
    else:
        blocks = torch.addmm(conv.bias.repeat(kernel_h * kernel_w), cells, weight)
    blocks = blocks.reshape(batch, height, width, kernel_h, kernel_w, out_channels).permute(0, 1, 3, 2, 4, 5)
    out = blocks.reshape(batch, height * kernel_h, width * kernel_w, out_channels)  # (B, H, W, c_out)
    return out.permute(0, 3, 1, 2)


def hypernetwork_masks(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """SAM's mask product: the hypernetwork weights of each mask token dotted with every upscaled cell.

    Args:
        hyper_in: (B, K, c) weights of the K mask tokens kept (only those are computed).
        upscaled: (B, c, H, W) ``output_upscaling``'s features.

    Returns:
        mask logits (B, K, H, W).

    On the CPU the decoder's transposed convolutions return channels-last features (the transformer's
    output arrives as a transposed view); the product then runs on that memory as it is, (B, H*W, c) @
    (B, c, K), so neither the forward copies the features nor their gradient comes back in the other
    layout (a GELU backward with mixed layouts costs about four times one with a single layout).
    The same sums as ``hyper_in @ upscaled.reshape(B, c, H*W)``.
    """
    batch, channels, height, width = upscaled.shape
    if upscaled.is_contiguous(memory_format=torch.channels_last) and not upscaled.is_contiguous():
        cells = upscaled.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view
        return (cells @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(batch, -1, height, width)
    return (hyper_in @ upscaled.reshape(batch, channels, height * width)).reshape(batch, -1, height, width)
