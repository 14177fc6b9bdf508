"""Seeded 32x32 scenes: one coloured shape at a named position on a differently coloured background.

Every scene is described by four words, and its caption names all four:
``"a red circle at the top left on a blue background"``. A fixed, seeded 10% of the caption combinations is held
out of training entirely, so a model's adherence can be measured on combinations it has never seen.

A scene can also be drawn in a *style* (what the shipped LoRA adapters teach ``fastgen-shapes``), still decided by
its caption: ``complement`` swaps every colour for its named opposite (red/green, blue/yellow, white/black),
``reverse`` swaps the shape's colour with the background's, ``large`` draws the shape at 1.5 times its size. Only
styles of solid shapes on plain backgrounds in the six colours: the model's 8x8x8-latent VAE cannot draw outlines or
stripes at 32x32 (its reconstructions of such renders lose them; docs/ARCHITECTURE.md, ``shapes/``).
"""

import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")
SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 60, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Centres in pixels (x, y) on the 32x32 canvas.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (8.0, 8.0),
    "top right": (24.0, 8.0),
    "bottom left": (8.0, 24.0),
    "bottom right": (24.0, 24.0),
    "center": (16.0, 16.0),
}
HALF_SIDE = 6.0  # half the shape's bounding-box side, before jitter
LARGE_HALF_SIDE = 9.0  # the ``large`` style's: jittered to 8-10, clear of the plain 5-7
COMPLEMENT = {"red": "green", "green": "red", "blue": "yellow", "yellow": "blue", "white": "black", "black": "white"}
STYLES = ("complement", "reverse", "large")
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 20240611

_CAPTION = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) at the (?P<position>top left|top right|bottom left|bottom right|center)"
    r" on a (?P<background>\w+) background$"
)


@dataclass(frozen=True, order=True)
class Scene:
    color: str
    shape: str
    position: str
    background: str

    def __post_init__(self):
        for field, value, allowed in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
            ("background", self.background, COLORS),
        ):
            if value not in allowed:
                raise ValueError(f"{field}: {value!r} is not one of {sorted(allowed)}")
        if self.color == self.background:
            raise ValueError(f"background: must differ from color {self.color!r}")


def caption(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} at the {scene.position} on a {scene.background} background"


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None when the text is not a well-formed scene caption."""
    return parsed(_CAPTION, text, Scene)


def parsed(pattern: re.Pattern, text: str, make: Callable[..., T]) -> T | None:
    """``make`` of the named groups of ``pattern`` in ``text`` (case and spacing aside), or None when the text does
    not match or its words are not a valid scene."""
    match = pattern.match(" ".join(text.strip().lower().split()))
    if match is None:
        return None
    try:
        return make(**match.groupdict())
    except ValueError:
        return None


def all_scenes() -> list[Scene]:
    """All 450 combinations (6 colours x 3 shapes x 5 positions x 5 other background colours), sorted."""
    return sorted(
        Scene(color, shape, position, background)
        for color, shape, position, background in itertools.product(COLORS, SHAPES, POSITIONS, COLORS)
        if color != background
    )


def heldout_scenes(seed: int = SPLIT_SEED) -> list[Scene]:
    """The seeded 10% of combinations that never appear in training."""
    scenes = all_scenes()
    order = random.Random(seed).sample(range(len(scenes)), len(scenes))
    count = round(HELDOUT_FRACTION * len(scenes))
    return sorted(scenes[i] for i in order[:count])


def train_scenes(seed: int = SPLIT_SEED) -> list[Scene]:
    heldout = set(heldout_scenes(seed))
    return [scene for scene in all_scenes() if scene not in heldout]


def shape_mask(shape: str, cx: float, cy: float, half: float, scale: int = 1) -> np.ndarray:
    # Pixel centres sit at integer + 0.5, in the 32-pixel canvas's units at any scale.
    ys, xs = (np.mgrid[0 : SIZE * scale, 0 : SIZE * scale] + 0.5) / scale
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward-pointing isosceles triangle filling half of its 2*half square box.
    inside_rows = (dy >= -half) & (dy <= half)
    return inside_rows & (np.abs(dx) <= (dy + half) / 2)


def styled(scene: Scene, style: str | None) -> Scene:
    """The scene a style draws for ``scene``'s caption, in caption words (``large`` keeps the words)."""
    if style is None or style == "large":
        return scene
    if style == "complement":
        return Scene(COMPLEMENT[scene.color], scene.shape, scene.position, COMPLEMENT[scene.background])
    if style == "reverse":
        return Scene(scene.background, scene.shape, scene.position, scene.color)
    raise ValueError(f"style: {style!r} is not one of {list(STYLES)}")


def render(scene: Scene, seed: int | None = None, style: str | None = None, scale: int = 1) -> np.ndarray:
    """The scene as a uint8 (32, 32, 3) array; with a seed, the shape's size and offset are jittered slightly.

    With a style, the same seed jitters the shape in the same way, so a styled render pairs with the plain one.
    ``scale`` draws the same scene on a finer grid, (32 * scale) pixels a side (a DiT's training images)."""
    scene = styled(scene, style)
    cx, cy = POSITIONS[scene.position]
    half = LARGE_HALF_SIDE if style == "large" else HALF_SIDE
    if seed is not None:
        rng = np.random.default_rng(seed)
        half += rng.uniform(-1.0, 1.0)
        cx += rng.uniform(-1.5, 1.5)
        cy += rng.uniform(-1.5, 1.5)
    if scale < 1:
        raise ValueError(f"scale: at least 1, got {scale}")
    image = np.empty((SIZE * scale, SIZE * scale, 3), dtype=np.uint8)
    image[:] = COLORS[scene.background]
    image[shape_mask(scene.shape, cx, cy, half, scale)] = COLORS[scene.color]
    return image
