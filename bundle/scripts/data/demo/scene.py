"""The demo's drawing: tissue-like backgrounds, instruments and whole sequences, from seeded generators.

Each sequence is a short video: a tissue-like background (pink/red low-frequency texture with
darker vessels and blotches, a vignette and a slowly panning camera) and 1-3 instruments per frame
(a few frames have none). An instrument is a shaft entering from outside the frame towards a tip,
pivoting about a fixed point outside the frame (like a trocar), with a class-specific tip shape,
colour, width and surface texture, so that the classes are told apart by what they look like.
Instruments move smoothly, tips open and close, instruments are exchanged between sequences parts,
and later-drawn instruments occlude earlier ones (in the frame and in the label map). Everything is drawn
with vectorised numpy: the same parameters give byte-identical frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# EndoVis2018 instrument types (ids 1..7), used as demo class names when C <= 7.
from ..known_datasets import ENDOVIS2018_CLASS_NAMES as ENDOVIS2018_CLASSES

#: Version of the drawing code; a change regenerates demo folders made by an older version.
GENERATOR_VERSION = "2"
#: Tip shapes, one per class in turn (class k gets TIP_SHAPES[(k - 1) % len]).
TIP_SHAPES = ("fork", "jaw", "clamp", "blade", "probe", "ring", "clip", "hook")
#: (shaft RGB, tip RGB) per class in turn: metallic shading over distinct hues, so that a small random
#: encoder (the demo has no SAM weights) still tells the classes apart by colour as well as by shape.
INSTRUMENT_COLOURS = (
    ((200, 200, 210), (235, 235, 240)),  # silver
    ((30, 30, 36), (120, 120, 130)),  # black shaft, steel tip
    ((40, 90, 200), (120, 160, 230)),  # blue
    ((200, 150, 30), (240, 200, 90)),  # gold
    ((30, 170, 160), (120, 220, 210)),  # teal
    ((40, 130, 50), (120, 190, 120)),  # green
    ((130, 60, 170), (190, 140, 220)),  # purple
)
#: Surface textures of the shaft, one per class in turn.
TEXTURES = ("bands", "plain", "dots", "stripe", "plain_dark_tip", "bands_fine", "checker")
#: Shaft width per class in turn, as a fraction of the frame's shorter side.
SHAFT_WIDTHS = (0.165, 0.195, 0.18, 0.165, 0.255, 0.1425, 0.18, 0.15)
#: Most instruments visible at once in a demo frame.
MAX_INSTRUMENTS_PER_FRAME = 3


@dataclass(frozen=True)
class InstrumentStyle:
    """How one class looks: tip shape, colours, shaft width (fraction of the shorter side), texture."""

    shape: str
    shaft_colour: tuple[int, int, int]
    tip_colour: tuple[int, int, int]
    width_fraction: float
    texture: str


def instrument_style(class_id: int) -> InstrumentStyle:
    """The look of class ``class_id`` (1-based); shape, colour and texture cycle with different periods."""
    index = class_id - 1
    shaft_colour, tip_colour = INSTRUMENT_COLOURS[index % len(INSTRUMENT_COLOURS)]
    return InstrumentStyle(
        shape=TIP_SHAPES[index % len(TIP_SHAPES)],
        shaft_colour=shaft_colour,
        tip_colour=tip_colour,
        width_fraction=SHAFT_WIDTHS[index % len(SHAFT_WIDTHS)],
        texture=TEXTURES[index % len(TEXTURES)],
    )


def demo_class_names(num_classes: int) -> list[str]:
    """EndoVis2018 names for up to 7 classes, else "class_1".."class_C"."""
    if num_classes <= len(ENDOVIS2018_CLASSES):
        return list(ENDOVIS2018_CLASSES[:num_classes])
    return [f"class_{k}" for k in range(1, num_classes + 1)]


# ------------------------------------------------------------------------------------------------
# background
# ------------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int]) -> np.ndarray:
    """Value noise: a random (cells_y + 1, cells_x + 1) grid smoothly interpolated to ``shape`` (H, W), in [0, 1]."""
    height, width = shape
    grid = rng.random((cells[0] + 1, cells[1] + 1))

    def axis(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        position = np.linspace(0.0, count, size, endpoint=False)
        lower = np.minimum(position.astype(np.int64), count - 1)
        fraction = position - lower
        return lower, fraction * fraction * (3.0 - 2.0 * fraction)  # smoothstep

    y0, fy = axis(height, cells[0])
    x0, fx = axis(width, cells[1])
    fy, fx = fy[:, None], fx[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def fractal_noise(rng: np.random.Generator, shape: Sequence[int], base_cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of ``octaves`` value noises doubling in frequency and halving in weight, rescaled to [0, 1]."""
    aspect = shape[1] / shape[0]
    total = np.zeros(shape)
    for octave in range(octaves):
        cells_y = base_cells * 2**octave
        total += smooth_noise(rng, shape, (cells_y, max(1, round(cells_y * aspect)))) / 2**octave
    total -= total.min()
    return total / max(total.max(), 1e-8)


def tissue_canvas(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """A tissue-like RGB texture (H, W, 3) float in 0..255: pink/red shading, vessels, darker blotches."""
    base_hue = rng.uniform(-1.0, 1.0)
    shading = fractal_noise(rng, shape, base_cells=3)
    detail = fractal_noise(rng, shape, base_cells=8, octaves=2)
    vessel_field = fractal_noise(rng, shape, base_cells=4)
    blotch_field = fractal_noise(rng, shape, base_cells=5)
    red = 175 + 55 * shading + 12 * detail + 10 * base_hue
    green = 70 + 55 * shading**1.5 + 10 * detail - 8 * base_hue
    blue = 75 + 45 * shading**1.5 + 10 * detail
    tissue = np.stack([red, green, blue], axis=-1)
    vessels = np.exp(-(((vessel_field - 0.5) / 0.025) ** 2))  # thin iso-lines of a smooth field
    tissue *= 1.0 - 0.4 * vessels[..., None] * np.array([0.45, 1.0, 0.9])
    blotches = np.clip((blotch_field - 0.7) / 0.3, 0.0, 1.0)
    tissue *= 1.0 - 0.5 * blotches[..., None] * np.array([0.5, 1.0, 0.9])
    return tissue


def vignette(shape: Sequence[int], strength: float) -> np.ndarray:
    """Multiplicative darkening towards the corners (H, W) in [1 - strength, 1]."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    return 1.0 - strength * np.clip((yy**2 + xx**2) / 2.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# instruments
# ------------------------------------------------------------------------------------------------


def capsule(yy: np.ndarray, xx: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    """Mask (H, W) of the points within ``radius`` of the segment ``start``-``end`` (points as (y, x))."""
    delta = end - start
    length2 = max(float(delta @ delta), 1e-8)
    along = np.clip(((yy - start[0]) * delta[0] + (xx - start[1]) * delta[1]) / length2, 0.0, 1.0)
    dy, dx = yy - (start[0] + along * delta[0]), xx - (start[1] + along * delta[1])
    return dy * dy + dx * dx <= radius * radius


def _rotate(direction: np.ndarray, angle: float) -> np.ndarray:
    """Rotate the (y, x) vector ``direction`` by ``angle`` radians."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([direction[0] * cos + direction[1] * sin, -direction[0] * sin + direction[1] * cos])


def tip_mask(shape: str, along: np.ndarray, across: np.ndarray, yy, xx, tip, direction, width, opening) -> np.ndarray:
    """Mask (H, W) of the tip of an instrument whose shaft ends at ``tip`` pointing along ``direction``.

    ``along`` / ``across`` are the coordinates of every pixel along the shaft axis (0 at the tip,
    positive beyond it) and across it; ``width`` is the shaft width and ``opening`` in [0, 1] how far
    jaws are open.
    """
    normal = np.array([-direction[1], direction[0]])
    if shape == "fork":  # two thin long prongs diverging from the tip
        mask = np.zeros_like(along, dtype=bool)
        for side in (-1, 1):
            prong = _rotate(direction, side * (0.12 + 0.25 * opening))
            mask |= capsule(yy, xx, tip, tip + prong * 2.6 * width, 0.17 * width)
        return mask
    if shape == "jaw":  # two broad elliptical jaws with a window, opening and closing
        mask = np.zeros_like(along, dtype=bool)
        for side in (-1, 1):
            jaw = _rotate(direction, side * (0.08 + 0.45 * opening))
            jaw_normal = np.array([-jaw[1], jaw[0]])
            centre = tip + jaw * 1.1 * width
            u = (yy - centre[0]) * jaw[0] + (xx - centre[1]) * jaw[1]
            v = (yy - centre[0]) * jaw_normal[0] + (xx - centre[1]) * jaw_normal[1]
            outer = (u / (1.2 * width)) ** 2 + (v / (0.36 * width)) ** 2 <= 1.0
            window = (u / (0.55 * width)) ** 2 + (v / (0.13 * width)) ** 2 <= 1.0
            mask |= outer & ~window
        return mask
    if shape == "clamp":  # short, wide, blunt closed jaws (needle driver)
        return (
            (along >= 0)
            & (along <= 1.3 * width)
            & (np.abs(across) <= 0.62 * width * (1.0 - 0.3 * along / (1.3 * width)))
        )
    if shape == "blade":  # a curved blade bending to one side (scissors)
        centre = tip + normal * 2.2 * width
        distance = np.hypot(yy - centre[0], xx - centre[1])
        ring = (distance >= 1.75 * width) & (distance <= 2.65 * width)
        return ring & (along >= 0) & (along <= 2.4 * width) & (across <= 0.5 * width)
    if shape == "probe":  # a rounded thick cylinder continuing the shaft
        return capsule(yy, xx, tip, tip + direction * 1.0 * width, 0.65 * width)
    if shape == "ring":  # a thin tube ending in an open ring (suction)
        centre = tip + direction * 0.9 * width
        distance = np.hypot(yy - centre[0], xx - centre[1])
        return (distance >= 0.5 * width) & (distance <= 0.95 * width)
    if shape == "clip":  # a V-shaped clip: two bars converging ahead of the tip
        apex = tip + direction * 2.2 * width
        mask = np.zeros_like(along, dtype=bool)
        for side in (-1, 1):
            mask |= capsule(yy, xx, tip + side * normal * (0.45 + 0.3 * opening) * width, apex, 0.2 * width)
        return mask
    if shape == "hook":  # an L-shaped hook bent sideways
        corner = tip + direction * 1.6 * width
        return capsule(yy, xx, tip, corner, 0.22 * width) | capsule(
            yy, xx, corner, corner + normal * 0.9 * width, 0.22 * width
        )
    raise ValueError(f"unknown tip shape {shape!r}; known: {TIP_SHAPES}.")


def texture_factor(texture: str, along: np.ndarray, across: np.ndarray, width: float) -> np.ndarray:
    """Multiplicative brightness pattern (H, W) of a shaft surface texture."""
    if texture in ("plain", "plain_dark_tip"):
        return np.ones_like(along)
    if texture == "bands":  # rings around the shaft
        return np.where(np.sin(2 * np.pi * along / (1.1 * width)) > 0.3, 0.55, 1.0)
    if texture == "bands_fine":
        return np.where(np.sin(2 * np.pi * along / (0.45 * width)) > 0.0, 0.7, 1.0)
    if texture == "dots":
        dots = (np.sin(2 * np.pi * along / (0.6 * width)) > 0.5) & (np.abs(across) < 0.2 * width)
        return np.where(dots, 0.4, 1.0)
    if texture == "stripe":  # a bright line along the shaft
        return np.where(np.abs(across - 0.2 * width) < 0.1 * width, 1.35, 1.0)
    if texture == "checker":
        checker = (np.sin(2 * np.pi * along / (0.8 * width)) > 0) ^ (across > 0)
        return np.where(checker, 0.65, 1.0)
    raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}.")


def draw_instrument(image, label_map, yy, xx, class_id, pivot, tip, width_scale, opening, shadow=True) -> None:
    """Draw one instrument of ``class_id`` into ``image`` (H, W, 3) float and ``label_map`` (H, W) in place.

    The shaft runs from ``pivot`` (outside the frame) to ``tip`` ((y, x) pixels); ``width_scale`` is
    the shorter frame side; ``opening`` in [0, 1] opens the jaws.
    """
    style = instrument_style(class_id)
    width = style.width_fraction * width_scale
    direction = (tip - pivot) / max(float(np.linalg.norm(tip - pivot)), 1e-8)
    normal = np.array([-direction[1], direction[0]])
    along = (yy - tip[0]) * direction[0] + (xx - tip[1]) * direction[1]
    across = (yy - tip[0]) * normal[0] + (xx - tip[1]) * normal[1]
    shaft = (along <= 0) & (np.abs(across) <= width / 2)
    tip_region = tip_mask(style.shape, along, across, yy, xx, tip, direction, width, opening) & ~shaft
    instrument = shaft | tip_region
    if shadow:  # soft darkening of the tissue beside the instrument (the light comes from the camera)
        offset = width * 0.35
        shadow_region = (along <= 0.8 * width) & (np.abs(across - offset) <= width * 0.85) & ~instrument
        image[shadow_region] *= 0.8
    # cylinder shading across the shaft plus a specular line
    position = np.clip(2 * across / max(width, 1e-8), -1, 1)
    shading = 0.55 + 0.45 * np.sqrt(1 - position**2) + 0.35 * np.exp(-(((position + 0.35) / 0.15) ** 2))
    shaft_rgb = np.array(style.shaft_colour, dtype=np.float64)
    tip_rgb = np.array(style.tip_colour, dtype=np.float64)
    if style.texture == "plain_dark_tip":
        tip_rgb = tip_rgb * 0.55
    shaft_value = shaft_rgb * (shading * texture_factor(style.texture, along, across, width))[..., None]
    tip_shading = 0.8 + 0.25 * np.cos(along / max(width, 1e-8) * 2.0) * np.cos(across / max(width, 1e-8) * 2.0)
    tip_value = tip_rgb * tip_shading[..., None]
    image[shaft] = shaft_value[shaft]
    image[tip_region] = tip_value[tip_region]
    label_map[instrument] = class_id


@dataclass(frozen=True)
class Appearance:
    """One instrument in a sequence: class, the frames it is visible in and its motion parameters."""

    class_id: int
    first_frame: int
    end_frame: int  # exclusive
    pivot: np.ndarray  # (y, x) pixels, outside the frame
    tip_centre: np.ndarray  # (y, x) pixels, mean tip position
    amplitude: np.ndarray  # (y, x) pixels of the tip's oscillation
    frequency: np.ndarray  # (y, x) cycles per frame
    phase: np.ndarray  # (y, x) radians
    opening_frequency: float
    opening_phase: float

    def tip_at(self, frame: int) -> np.ndarray:
        return self.tip_centre + self.amplitude * np.sin(2 * np.pi * self.frequency * frame + self.phase)

    def opening_at(self, frame: int) -> float:
        return 0.5 + 0.5 * math.sin(2 * np.pi * self.opening_frequency * frame + self.opening_phase)


def plan_sequence(
    rng: np.random.Generator, classes: Sequence[int], frame_size: Sequence[int], num_frames: int
) -> list[Appearance]:
    """Schedule the instruments of ``classes`` over a sequence of ``num_frames`` frames.

    Appearances are spread over at most MAX_INSTRUMENTS_PER_FRAME lanes (ports); a lane holding several
    appearances exchanges its instrument (with a one-frame gap when there is time for it). Each lane
    pivots from its own side of the frame; its tip moves smoothly around a point between the frame
    centre and that side.
    """
    height, width = frame_size
    centre = np.array([height / 2, width / 2])
    lanes = min(MAX_INSTRUMENTS_PER_FRAME, len(classes))
    lane_angle0 = rng.uniform(0, 2 * np.pi)
    appearances = []
    for lane in range(lanes):
        lane_classes = list(classes[lane::lanes])
        angle = lane_angle0 + 2 * np.pi * lane / lanes + rng.uniform(-0.3, 0.3)
        side = np.array([math.sin(angle), math.cos(angle)])
        pivot = centre + side * np.array([height, width]) * 0.85
        tip_centre = centre + side * np.array([height, width]) * rng.uniform(0.12, 0.24)
        # a lane with one instrument may enter late or leave early: 1..3 instruments per frame
        start, stop = 0, num_frames
        if len(lane_classes) == 1 and lane > 0 and num_frames >= 8:
            length = int(round(num_frames * rng.uniform(0.55, 0.9)))
            start = int(rng.integers(0, num_frames - length + 1))
            stop = start + length
        bounds = np.linspace(start, stop, len(lane_classes) + 1).round().astype(int)
        for index, class_id in enumerate(lane_classes):
            first, end = int(bounds[index]), int(bounds[index + 1])
            if index > 0 and end - first >= 4:
                first += 1  # exchange gap
            appearances.append(
                Appearance(
                    class_id=int(class_id),
                    first_frame=first,
                    end_frame=end,
                    pivot=pivot,
                    tip_centre=tip_centre,
                    amplitude=np.array([height, width]) * rng.uniform(0.06, 0.14, size=2),
                    frequency=rng.uniform(0.02, 0.06, size=2),
                    phase=rng.uniform(0, 2 * np.pi, size=2),
                    opening_frequency=float(rng.uniform(0.05, 0.12)),
                    opening_phase=float(rng.uniform(0, 2 * np.pi)),
                )
            )
    return appearances


def render_sequence(
    rng: np.random.Generator,
    classes: Sequence[int],
    frame_size: Sequence[int],
    num_frames: int,
    empty_frames: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render a video of ``num_frames`` frames with the instruments of ``classes``.

    Args:
        rng: the sequence's random generator.
        classes: class ids of the instruments appearing in the sequence (in order of appearance).
        frame_size: (H, W).
        num_frames: frames of the sequence.
        empty_frames: the first ``empty_frames`` frames show no instrument.

    Returns:
        ``num_frames`` pairs (frame (H, W, 3) uint8, label map (H, W) uint8).
    """
    height, width = frame_size
    margin = max(4, int(0.15 * min(height, width)))
    canvas = tissue_canvas(rng, (height + 2 * margin, width + 2 * margin))
    pan_frequency = rng.uniform(0.01, 0.03, size=2)
    pan_phase = rng.uniform(0, 2 * np.pi, size=2)
    flicker_phase = rng.uniform(0, 2 * np.pi)
    darkening = vignette(frame_size, strength=rng.uniform(0.35, 0.55))[..., None]
    appearances = plan_sequence(rng, classes, frame_size, num_frames)
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    frames = []
    for frame_index in range(num_frames):
        offset = (margin + (margin - 1) * np.sin(2 * np.pi * pan_frequency * frame_index + pan_phase)).astype(int)
        image = canvas[offset[0] : offset[0] + height, offset[1] : offset[1] + width].copy()
        image *= 1.0 + 0.06 * math.sin(0.3 * frame_index + flicker_phase)
        label_map = np.zeros(frame_size, dtype=np.uint8)
        if frame_index >= empty_frames:
            for appearance in appearances:
                if appearance.first_frame <= frame_index < appearance.end_frame:
                    draw_instrument(
                        image,
                        label_map,
                        yy,
                        xx,
                        appearance.class_id,
                        appearance.pivot,
                        appearance.tip_at(frame_index),
                        min(height, width),
                        appearance.opening_at(frame_index),
                    )
        image *= darkening
        image += rng.normal(0.0, 3.0, size=image.shape)  # sensor noise
        frames.append((np.clip(np.round(image), 0, 255).astype(np.uint8), label_map))
    return frames
