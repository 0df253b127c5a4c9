"""Class overlays: a frame tinted by its label map, one colour per class.

Used by the demo's preview, the inference writer's ``<stem>_overlay.png`` and the overlay videos.
"""

from __future__ import annotations

import numpy as np

from .layout import DEFAULT_IGNORE_INDEX

#: Colours of the class overlays (class k gets OVERLAY_COLOURS[(k - 1) % len]).
OVERLAY_COLOURS = (
    (255, 60, 60),
    (60, 200, 60),
    (60, 110, 255),
    (255, 200, 0),
    (0, 220, 220),
    (230, 60, 230),
    (255, 130, 0),
    (150, 90, 255),
)


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame (H, W, 3) uint8 with each class of ``label_map`` (H, W) tinted by its class colour."""
    result = image.astype(np.float64)
    for class_id in np.unique(label_map):
        if class_id == 0 or class_id == DEFAULT_IGNORE_INDEX:
            continue
        colour = np.array(OVERLAY_COLOURS[(int(class_id) - 1) % len(OVERLAY_COLOURS)], dtype=np.float64)
        mask = label_map == class_id
        result[mask] = (1 - alpha) * result[mask] + alpha * colour
    return np.clip(np.round(result), 0, 255).astype(np.uint8)
