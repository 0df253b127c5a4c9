"""Augmentation versions of the SurgicalSAM training recipe, with a seeded draw per (frame, version).

The original precomputes SAM embeddings for 40 augmented versions of the training set and trains
epoch by epoch on one version (:func:`version_for_epoch`):

- version 0: the original frame;
- versions 1..40, in this order (the original's ``tools/data_preprocess.py``):

  - 11..20 only: scale by ``s = 1 + 0.2 U`` to ``(int(H s), int(W s))`` and crop back to H x W at a
    random place;
  - random horizontal and vertical flip (p = 0.5 each);
  - 21..30 only: rotate by ``30 U [U' > 0.5]`` degrees counter-clockwise about the centre (so a
    non-zero angle in a quarter of the draws where the rotation is applied), zero fill;
  - 31..40 only: colour jitter of brightness, contrast and saturation 0.4 (factors U[0.6, 1.4], in
    random order), in PIL's uint8 arithmetic as torchvision's ``ColorJitter`` on a PIL image.

  With ``draws="original"`` (the default) each of scale-and-crop, rotation and colour jitter is
  applied with probability 0.5 within its versions, as the original does; ``draws="always"`` applies
  it every time (and the rotation angle is ``30 U``, never gated to 0).

Interpolation, the original's (torchvision's defaults on PIL images): under scaling the image is
bilinear and each class's 0/1 mask is bilinear as PIL does it on uint8 (along the width, rounded,
then along the height, rounded: :func:`resize_class_masks` reproduces it exactly); under rotation image
and masks are nearest, zero fill. MONAI's ``Resize`` and ``Rotate`` do this on float arrays: the
scaled image differs from PIL's fixed-point result by at most 1 grey level, and nearest rotation
picks another neighbour at about 0.1% of the pixels (sampling ties); see bundle/docs/fidelity.md ("What differs,
and its measured effect").

The original's seeds made every version one global transform (the whole set flipped at once).
Here every (seed, frame key, version) gets its own random generator, seeded by a stable hash, so
the augmentation differs between frames and the embedding cache is reproducible.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from monai.transforms import Flip, Resize, Rotate, SpatialCrop
from monai.utils import convert_to_numpy

from .layout import DEFAULT_IGNORE_INDEX

#: Number of augmented versions (1..NUM_VERSIONS); version 0 is the original frame.
NUM_VERSIONS = 40
#: Versions come in groups of this size: flips; + scale/crop; + rotation; + colour jitter.
VERSIONS_PER_GROUP = 10
#: Probability of each flip.
FLIP_PROBABILITY = 0.5
#: Probability of a version's own transform (scale-and-crop, rotation or colour jitter) under the original's draws.
TRANSFORM_PROBABILITY = 0.5
#: Probability that a drawn rotation angle is kept (the original's ``[U' > 0.5]`` factor) under the original's draws.
ROTATION_NONZERO_PROBABILITY = 0.5
#: How often a version's own transform is applied: ``original`` (with TRANSFORM_PROBABILITY, the default) or
#: ``always``.
AUGMENTATION_DRAWS = ("original", "always")
#: Scale factor range [low, high) of versions 11..20 (s = low + (high - low) U).
SCALE_RANGE = (1.0, 1.2)
#: Largest rotation angle in degrees of versions 21..30 (MAX_ROTATION_DEGREES * U[0, 1), counter-clockwise).
MAX_ROTATION_DEGREES = 30.0
#: Colour jitter strength of versions 31..40: factors U[1 - s, 1 + s] for brightness, contrast, saturation.
COLOUR_JITTER_STRENGTH = (0.4, 0.4, 0.4)
#: Default seed of the training recipe.
DEFAULT_SEED = 666
#: ITU-R 601-2 luma weights (R, G, B) in PIL's 16-bit fixed point: grey = (R*19595 + G*38470 + B*7471 + 2**15) >> 16.
LUMA_WEIGHTS_FIXED = (19595, 38470, 7471)


def version_for_epoch(epoch: int, num_versions: int = NUM_VERSIONS) -> int:
    """Augmentation version used in (0-based) ``epoch``.

    Even epochs use version 0; odd epoch e uses ``int((e % (2 * num_versions) + 1) / 2)``, cycling
    1..num_versions. ``num_versions`` 0 (no augmentation) always gives 0.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}.")
    if num_versions < 0:
        raise ValueError(f"num_versions must be >= 0, got {num_versions}.")
    if num_versions == 0 or epoch % 2 == 0:
        return 0
    return int((epoch % (2 * num_versions) + 1) / 2)


def augmentation_rng(frame_key: str, version: int, seed: int = DEFAULT_SEED) -> np.random.Generator:
    """Random generator of one (seed, frame, version), seeded by a SHA-256 hash (stable across runs)."""
    digest = hashlib.sha256(f"{seed}|{frame_key}|{version}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


# Colour jitter as torchvision's ColorJitter does it on a PIL image (the original's): PIL's ImageEnhance
# blends the image with a degenerate one in float32, ``degenerate + factor * (image - degenerate)``, and
# truncates to uint8. These take and return channel-first (3, H, W) float arrays of integer values 0..255.
def _grey(image: np.ndarray) -> np.ndarray:
    """PIL's grey (mode "L") values (H, W) of a (3, H, W) RGB image of integer values."""
    channels = [image[c].astype(np.int64) * weight for c, weight in enumerate(LUMA_WEIGHTS_FIXED)]
    return ((channels[0] + channels[1] + channels[2] + (1 << 15)) >> 16).astype(np.float64)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    blended = (degenerate + np.float32(factor) * (image - degenerate)).astype(np.float32)
    return np.clip(np.floor(blended), 0.0, 255.0).astype(np.float64)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend a (3, H, W) 0..255 image with black (PIL's ``ImageEnhance.Brightness``)."""
    return _blend(np.zeros_like(image), image, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend a (3, H, W) 0..255 image with its mean grey value, rounded (PIL's ``ImageEnhance.Contrast``)."""
    return _blend(np.full_like(image, int(_grey(image).mean() + 0.5)), image, factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend a (3, H, W) 0..255 image with its grey version (PIL's ``ImageEnhance.Color``)."""
    return _blend(np.broadcast_to(_grey(image)[None], image.shape), image, factor)


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 0 <= version <= NUM_VERSIONS:
        raise ValueError(f"augmentation version must be an integer in 0..{NUM_VERSIONS}, got {version!r}.")
    return int(version)


def check_augmentation_draws(draws: str) -> str:
    """``draws`` itself, or a ValueError naming the choices."""
    if draws not in AUGMENTATION_DRAWS:
        raise ValueError(f"augmentation_draws must be one of {AUGMENTATION_DRAWS}, got {draws!r}")
    return draws


def resize_class_masks(label_cf: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label map (1, H, W) float -> (1, h', w'), each value's binary mask resized as PIL resizes a 0/1 mask.

    PIL's bilinear resize runs along the width, rounds to uint8, then along the height and rounds
    again; on a 0/1 mask that is a bilinear pass along each axis kept where >= 0.5, which this
    reproduces (the original resizes each class's mask so). The masks of one label map are disjoint;
    a pixel two of them claim (a tie at exactly 0.5) gets the higher value.
    """
    along_width = Resize((label_cf.shape[-2], size[1]), mode="bilinear", align_corners=False)
    along_height = Resize(size, mode="bilinear", align_corners=False)
    out = torch.zeros((1, *size), dtype=label_cf.dtype)
    for value in torch.unique(label_cf).tolist():
        if value != 0:
            mask = (along_width((label_cf == value).to(torch.float32)) >= 0.5).to(torch.float32)
            out[along_height(mask) >= 0.5] = value
    return out


def augment_frame(
    image: np.ndarray,
    label: np.ndarray,
    version: int,
    frame_key: str,
    seed: int = DEFAULT_SEED,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    draws: str = "original",
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented ``version`` of one frame and its label map.

    Args:
        image: (H, W, 3) uint8 RGB frame.
        label: (H, W) uint8 label map (class ids, ``ignore_index`` unlabelled).
        version: 0 (identity, copies returned) .. 40; see the module docstring.
        frame_key: unique key of the frame ("<sequence>/<frame>"), part of the random seed.
        seed: global seed, part of the random seed.
        ignore_index: label value of unlabelled pixels; moved as a class of its own (pixels brought in
            by rotation become background 0).
        draws: ``original`` (each version's own transform with probability 0.5) or ``always``.

    Returns:
        (image (H, W, 3) uint8, label (H, W) uint8) of the same size as the input.
    """
    version = _check_version(version)
    check_augmentation_draws(draws)
    if image.ndim != 3 or image.shape[2] != 3 or label.shape != image.shape[:2]:
        raise ValueError(
            f"expected image (H, W, 3) and label (H, W) of the same size, got {image.shape} and {label.shape}."
        )
    if version == 0:
        return image.copy(), label.copy()
    height, width = label.shape
    rng = augmentation_rng(frame_key, version, seed)
    group = (version - 1) // VERSIONS_PER_GROUP  # 0 flips, 1 scale/crop, 2 rotation, 3 colour jitter
    always = draws == "always"

    def applied() -> bool:
        return always or rng.random() < TRANSFORM_PROBABILITY

    # channel-first float tensors for MONAI's array transforms: image (3, H, W), label (1, H, W)
    image_cf = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    label_cf = torch.as_tensor(np.ascontiguousarray(label[None]), dtype=torch.float32)

    if group == 1 and applied():
        scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * rng.random()
        scaled_size = (max(height, int(height * scale)), max(width, int(width * scale)))
        image_cf = Resize(scaled_size, mode="bilinear", align_corners=False)(image_cf)
        label_cf = resize_class_masks(label_cf, scaled_size)
        top = int(rng.integers(0, scaled_size[0] - height + 1))
        left = int(rng.integers(0, scaled_size[1] - width + 1))
        crop = SpatialCrop(roi_start=(top, left), roi_end=(top + height, left + width))
        image_cf, label_cf = crop(image_cf), crop(label_cf)

    flips = [axis for axis in (1, 0) if rng.random() < FLIP_PROBABILITY]  # spatial axis 1 = horizontal, 0 = vertical
    if flips:
        flip = Flip(spatial_axis=flips)
        image_cf, label_cf = flip(image_cf), flip(label_cf)

    if group == 2 and applied():
        degrees = MAX_ROTATION_DEGREES * rng.random()
        if not always and rng.random() >= ROTATION_NONZERO_PROBABILITY:
            degrees = 0.0
        if degrees:
            # counter-clockwise as PIL's rotate (MONAI's positive angle turns the other way)
            rotate = Rotate(-math.radians(degrees), keep_size=True, mode="nearest", padding_mode="zeros")
            image_cf, label_cf = rotate(image_cf), rotate(label_cf)

    image_out = convert_to_numpy(image_cf, dtype=np.float64)
    if group == 3 and applied():
        factors = [rng.uniform(1.0 - strength, 1.0 + strength) for strength in COLOUR_JITTER_STRENGTH]
        adjustments = (adjust_brightness, adjust_contrast, adjust_saturation)
        for index in rng.permutation(len(adjustments)):
            image_out = adjustments[index](image_out, factors[index])

    image_out = np.clip(np.round(image_out), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    label_out = np.round(convert_to_numpy(label_cf[0], dtype=np.float64)).astype(np.uint8)
    return np.ascontiguousarray(image_out), np.ascontiguousarray(label_out)
