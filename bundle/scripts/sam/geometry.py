"""The geometry between a frame and SAM's square input, and back.

SAM resizes a frame so that its longest side equals ``image_size`` (1024 for the official models),
pads the bottom and right with zeros to ``image_size x image_size`` and embeds it on a grid of
``image_size / 16`` cells. Every place of the bundle that goes between frame, SAM input, embedding
grid and low-resolution mask uses these functions, so the three agree by construction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: ImageNet statistics SAM normalises with (0..255 scale).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(frame_hw: Sequence[int], image_size: int) -> tuple[int, int]:
    """Size (h', w') of a frame of size ``frame_hw`` after resizing its longest side to ``image_size``.

    Rounds as segment-anything's ``ResizeLongestSide.get_preprocess_shape`` does
    (1024x1280 -> 819x1024 for ``image_size`` 1024).
    """
    height, width = int(frame_hw[0]), int(frame_hw[1])
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def frames_to_sam_input(
    frames: torch.Tensor,
    image_size: int,
    pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
    pixel_std: Sequence[float] = SAM_PIXEL_STD,
) -> torch.Tensor:
    """Frames (B, 3, H, W), RGB on the 0..255 scale -> SAM input (B, 3, S, S), S = ``image_size``.

    Resize longest side (bilinear, antialiased), normalise per channel, zero-pad bottom/right.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames of shape (B, 3, H, W), got {tuple(frames.shape)}")
    frames = frames.float()
    new_h, new_w = resized_shape(frames.shape[-2:], image_size)
    if (new_h, new_w) != tuple(frames.shape[-2:]):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(pixel_mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    frames = (frames - mean) / std
    return F.pad(frames, (0, image_size - new_w, 0, image_size - new_h))


def masks_to_embedding_grid(masks: torch.Tensor, image_size: int, grid_hw: Sequence[int]) -> torch.Tensor:
    """Binary masks (B, H, W) at frame size -> boolean masks (B, h, w) on the embedding grid.

    The original SurgicalSAM's rule for the class-embedding mask: the mask as a 0/255 uint8 image
    goes through SAM's image preprocessing (the longest side resized to ``image_size`` by PIL's
    antialiased bilinear resize, as segment-anything's ``ResizeLongestSide``; normalised with SAM's
    red-channel mean and std; zero-padded bottom/right to ``image_size`` x ``image_size``), then
    bilinear (``align_corners=False``) to ``grid_hw``, and a cell is on where the value is > 0.
    A cell thus averages the resized mask at the samples it covers and is on above a covered
    fraction of 123.675 / 255 = 0.485; padded samples are 0 after normalisation, so they weigh
    nothing (neither on nor off). The resize is PIL's, on the CPU, as the original's; where the grid's
    stride is a whole even number (SAM's 16) only the resized lines the grid reads are computed, in PIL's
    own fixed-point arithmetic (:func:`pil_bilinear_resize_lines`), a tenth of the whole resize's work
    with the same values (tests compare both with PIL).
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (B, H, W), got {tuple(masks.shape)}")
    height, width = int(masks.shape[-2]), int(masks.shape[-1])
    new_h, new_w = resized_shape((height, width), image_size)
    grid_hw = tuple(int(s) for s in grid_hw)
    binary = masks.detach()
    binary = (binary if binary.dtype == torch.bool else binary != 0).cpu().numpy()
    rows, cols = bilinear_source_lines(image_size, grid_hw[0]), bilinear_source_lines(image_size, grid_hw[1])
    if rows is None or cols is None:
        images = binary.astype(np.uint8) * np.uint8(255)
        if (new_h, new_w) != (height, width):
            images = (
                np.stack(
                    [np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)) for image in images]
                )
                if len(images)
                else np.zeros((0, new_h, new_w), np.uint8)
            )
        padded = _normalised_and_padded(images, image_size, image_size)
    else:
        # only the lines the bilinear resize to the grid reads, in order: they keep their weights of 1/2 in a
        # resize from twice the grid (bilinear_source_lines), and PIL's values on them are computed alone
        # (pil_bilinear_resize_lines), so the grid is the same as from the whole resized, padded image
        images = pil_bilinear_resize_lines(binary, (new_h, new_w), rows[rows < new_h], cols[cols < new_w])
        padded = _normalised_and_padded(images, len(rows), len(cols))
    grid = F.interpolate(torch.from_numpy(padded).unsqueeze(1), size=grid_hw, mode="bilinear", align_corners=False)
    return (grid.squeeze(1) > 0).to(masks.device)


def _normalised_and_padded(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 images (B, h, w) -> SAM's red-channel normalisation, zero-padded bottom/right to (B, height, width)
    float32, in NumPy float32 (the same IEEE operations as torch's; single-threaded, which is what a
    per-sample call in a loader worker wants)."""
    values = (images.astype(np.float32) - np.float32(SAM_PIXEL_MEAN[0])) / np.float32(SAM_PIXEL_STD[0])
    return np.pad(values, ((0, 0), (0, height - images.shape[1]), (0, width - images.shape[2])))


def bilinear_source_lines(size: int, out_size: int) -> np.ndarray | None:
    """The input lines (rows or columns) that a bilinear resize (``align_corners=False``) of ``size`` lines
    to ``out_size`` reads, when the stride ``s = size / out_size`` is a whole even number; else None.

    Output line i then samples at ``s * i + s / 2 - 1/2``, half-way between lines ``s * i + s / 2 - 1`` and
    ``s * i + s / 2``, each with weight exactly 1/2: the same weights as a resize of those 2 * out_size lines
    alone to ``out_size`` (stride 2, samples at ``2 * i + 1/2``). (out_size * 2,) int64, ascending.
    """
    if out_size <= 0 or size % out_size or (size // out_size) % 2:
        return None
    stride = size // out_size
    starts = np.arange(out_size, dtype=np.int64) * stride + stride // 2 - 1
    return np.stack([starts, starts + 1], axis=1).reshape(-1)


#: Fixed-point bits of PIL's 8-bit resampling (``PRECISION_BITS`` in Pillow's ``Resample.c``).
PIL_PRECISION_BITS = 22


@functools.lru_cache(maxsize=16)
def pil_bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's antialiased bilinear weights for resizing ``in_size`` lines to ``out_size`` (Pillow's
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` for the whole image, written out in NumPy float64
    with the same IEEE operations in the same order). Cached per size pair (read-only arrays): every frame
    of a dataset has the same sizes.

    Returns:
        first (out_size,) int64: the first input line of each output line; weights (out_size, k) int64:
        the fixed-point weights (``PIL_PRECISION_BITS``) of input lines ``first .. first + k - 1``, zero
        past the image's edge.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    count = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize, dtype=np.int64)
    distance = np.abs(((first[:, None] + taps[None]).astype(np.float64) - centers[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where((distance < 1.0) & (taps[None] < count[:, None]), 1.0 - distance, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for tap in range(ksize):  # summed in PIL's order
        total = total + weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * float(1 << PIL_PRECISION_BITS)
    fixed = np.where(weights < 0, -0.5 + scaled, 0.5 + scaled).astype(np.int64)
    first.flags.writeable = fixed.flags.writeable = False  # cached: shared by every call of the same sizes
    return first, fixed


def _pil_resample_lines(images: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One pass of PIL's 8-bit resampling along the last axis: (..., n) uint8 -> (..., len(first)) uint8."""
    index = np.minimum(first[:, None] + np.arange(weights.shape[1]), images.shape[-1] - 1)
    sums = (images[..., index].astype(np.int64) * weights).sum(-1) + (1 << (PIL_PRECISION_BITS - 1))
    return np.clip(sums >> PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def pil_bilinear_resize_lines(
    images: np.ndarray, size_hw: Sequence[int], rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Some rows and columns of PIL's antialiased bilinear resize, ``Image.resize((w, h), Image.BILINEAR)``,
    of 8-bit single-channel images, computed alone: what PIL's two passes (horizontal to a uint8 image,
    then vertical) give there, in its fixed-point arithmetic (tests hold it equal to PIL on every line).

    Args:
        images: (B, H, W) uint8, or bool for binary masks as 0/255 images (converted on the lines read only).
        size_hw: the resized size (h, w).
        rows, cols: ascending output lines wanted, in 0..h-1 and 0..w-1.

    Returns:
        (B, len(rows), len(cols)) uint8.
    """
    height, width = images.shape[-2:]
    new_h, new_w = int(size_hw[0]), int(size_hw[1])
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if new_h != height:  # PIL skips a pass whose size does not change
        first_row, row_weights = pil_bilinear_weights(height, new_h)
        first_row, row_weights = first_row[rows], row_weights[rows]
        source_rows = np.unique(np.minimum(first_row[:, None] + np.arange(row_weights.shape[1]), height - 1))
    else:
        source_rows = rows
    lines = images[:, source_rows]
    if lines.dtype == np.bool_:
        lines = lines.astype(np.uint8) * np.uint8(255)
    if new_w != width:
        first_col, col_weights = pil_bilinear_weights(width, new_w)
        lines = _pil_resample_lines(lines, first_col[cols], col_weights[cols])
    else:
        lines = lines[:, :, cols]
    if new_h == height:
        return lines
    # the vertical pass over the horizontally resampled source rows, addressed by their place in source_rows
    first_place = np.searchsorted(source_rows, first_row)
    return np.swapaxes(_pil_resample_lines(np.swapaxes(lines, 1, 2), first_place, row_weights), 1, 2)


def masks_to_mask_input(masks: torch.Tensor, image_size: int, size_hw: Sequence[int]) -> torch.Tensor:
    """Binary masks (B, H, W) at frame size -> boolean masks (B, h', w') at SAM's mask-input size.

    Resize of the longest side to ``image_size`` (bilinear, no antialiasing) and zero padding, then
    bilinear down to ``size_hw`` and a threshold at 0.5 (padding counts as outside). Distillation-SAM's
    dense teacher prompt uses it; the class-embedding mask is :func:`masks_to_embedding_grid`.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (B, H, W), got {tuple(masks.shape)}")
    masks = masks.float().unsqueeze(1)
    new_h, new_w = resized_shape(masks.shape[-2:], image_size)
    masks = F.interpolate(masks, size=(new_h, new_w), mode="bilinear", align_corners=False)
    masks = F.pad(masks, (0, image_size - new_w, 0, image_size - new_h))
    masks = F.interpolate(masks, size=tuple(int(s) for s in size_hw), mode="bilinear", align_corners=False)
    return masks.squeeze(1) >= 0.5


def low_res_logits_to_frame(low_res_logits: torch.Tensor, image_size: int, frame_hw: Sequence[int]) -> torch.Tensor:
    """SAM decoder logits (B, K, 4h, 4w) -> logits (B, K, H, W) at the original frame size.

    Bilinear up to the padded input (S x S), crop the valid region, bilinear to the frame size
    (all ``align_corners=False``), as SAM's ``postprocess_masks``.

    When the logits need a gradient (training) the same linear map runs as two matrix products
    (:func:`frame_resize_matrices`): the backward of a bilinear resize is a scatter that costs about
    five times its forward on the CPU, the products' backward is two more products. Same numbers up
    to float rounding (``tests/test_sam_backbone.py``).
    """
    if low_res_logits.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():
        return resize_by_products(low_res_logits, image_size, frame_hw)
    return resize_by_interpolation(low_res_logits, image_size, frame_hw)


def resize_by_interpolation(low_res_logits: torch.Tensor, image_size: int, frame_hw: Sequence[int]) -> torch.Tensor:
    """:func:`low_res_logits_to_frame` as segment-anything writes it: (B, K, 4h, 4w) -> (B, K, H, W)."""
    frame_h, frame_w = int(frame_hw[0]), int(frame_hw[1])
    valid_h, valid_w = resized_shape((frame_h, frame_w), image_size)
    logits = F.interpolate(low_res_logits, size=(image_size, image_size), mode="bilinear", align_corners=False)
    logits = logits[..., :valid_h, :valid_w]
    if (valid_h, valid_w) != (frame_h, frame_w):
        logits = F.interpolate(logits, size=(frame_h, frame_w), mode="bilinear", align_corners=False)
    return logits


def _linear_resize_matrix(in_size: int, out_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(out_size, in_size) float64: torch's 1-D linear resize (``align_corners=False``) as a matrix.

    Column i is the resize of the i-th unit vector in ``dtype``, so the weights are the ones torch uses
    on logits of that dtype (it computes them in the input's precision); a bilinear resize is this
    resize along each axis.
    """
    unit_vectors = torch.eye(in_size, dtype=dtype).unsqueeze(1)  # (in, 1, in)
    return F.interpolate(unit_vectors, size=out_size, mode="linear", align_corners=False)[:, 0].T.double()


@functools.lru_cache(maxsize=16)
def frame_resize_matrices(
    low_res_hw: tuple[int, int], image_size: int, frame_hw: tuple[int, int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`low_res_logits_to_frame`'s map as ``rows @ logits @ cols.T``, for logits of ``dtype``.

    Returns:
        rows (H, 4h) and cols (W, 4w), float64: per axis, the resize to S, the crop to the valid
        region and the resize to the frame size, composed.
    """
    valid_hw = resized_shape(frame_hw, image_size)
    matrices = []
    for low, valid, frame in zip(low_res_hw, valid_hw, frame_hw):
        matrix = _linear_resize_matrix(low, image_size, dtype)[:valid]
        if valid != frame:
            matrix = _linear_resize_matrix(valid, frame, dtype) @ matrix
        matrices.append(matrix)
    return matrices[0], matrices[1]


def resize_by_products(low_res_logits: torch.Tensor, image_size: int, frame_hw: Sequence[int]) -> torch.Tensor:
    """:func:`low_res_logits_to_frame` as two matrix products, in float32 (float64 logits: float64), also
    under autocast.

    Args:
        low_res_logits: (B, K, 4h, 4w).

    Returns:
        (B, K, H, W) float32 (float64 for float64 logits). Under autocast the decoder's low-res logits
        come as bf16 or fp16; the frame-size logits stay float32, as the loss takes them: a cast to the
        half type and back would cost two full-frame copies each way and round the logits for nothing.
    """
    dtype = torch.float64 if low_res_logits.dtype == torch.float64 else torch.float32
    low_res_hw = (int(low_res_logits.shape[-2]), int(low_res_logits.shape[-1]))
    device = low_res_logits.device
    rows, cols_t = _resize_matrices_on(low_res_hw, int(image_size), (int(frame_hw[0]), int(frame_hw[1])), dtype, device)
    with torch.autocast(device.type, enabled=False):
        logits = low_res_logits.to(dtype) @ cols_t  # (B, K, 4h, W)
        return rows @ logits  # (B, K, H, W)


@functools.lru_cache(maxsize=16)
def _resize_matrices_on(
    low_res_hw: tuple[int, int], image_size: int, frame_hw: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`frame_resize_matrices` as rows (H, 4h) and cols.T (4w, W) in ``dtype`` on ``device``, made once:
    no copy to the device in the training step (from pageable memory it would wait for the host)."""
    rows, cols = frame_resize_matrices(low_res_hw, image_size, frame_hw, dtype)
    return rows.to(device, dtype), cols.T.contiguous().to(device, dtype)
