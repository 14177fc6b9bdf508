"""Moving shape scenes for the text-to-video yardstick: captions, renders and a scorer with a motion check.

"a {colour} {shape} moving {left|right|up|down} on a {colour} background": the shape crosses the canvas's centre
along the named direction over the clip's frames. The scorer checks every frame as ``fastgen.shapes.score`` checks
an image (colour, shape, background; not the position, which moves), and the motion from the shape's centroid track:
a least-squares line through the centroids must travel at least ``MIN_TRAVEL`` pixels along one axis, the named
way, and clearly more along it than across it. A still shape moves no way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fastgen.shapes import scenes as sc
from fastgen.shapes import score as image_score

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # x, y
TRAVEL = 12.0  # pixels the rendered shape's centre moves over a clip, centred on the canvas
MIN_TRAVEL = 4.0  # pixels the fitted track must move along its axis to count as motion
MAX_ACROSS = 0.5  # the track's move across its axis, at most this share of its move along it
_CAPTION = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>left|right|up|down) on a (?P<background>\w+) background$"
)


@dataclass(frozen=True, order=True)
class MotionScene:
    color: str
    shape: str
    direction: str
    background: str

    def __post_init__(self):
        sc.Scene(self.color, self.shape, "center", self.background)  # the same colour and shape rules
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: {self.direction!r} is not one of {sorted(DIRECTIONS)}")


def caption(scene: MotionScene) -> str:
    return f"a {scene.color} {scene.shape} moving {scene.direction} on a {scene.background} background"


def parse_caption(text: str) -> MotionScene | None:
    """The moving scene a caption describes, or None when it is not a well-formed motion caption."""
    return sc.parsed(_CAPTION, text, MotionScene)


def render(scene: MotionScene, frames: int, seed: int | None = None) -> np.ndarray:
    """The clip as uint8 (frames, 32, 32, 3); with a seed, the shape's size and path are jittered slightly."""
    if frames < 2:
        raise ValueError(f"frames: at least 2 for motion, got {frames}")
    half, start = sc.HALF_SIDE - 1.0, np.array([sc.SIZE / 2, sc.SIZE / 2])
    if seed is not None:
        rng = np.random.default_rng(seed)
        half += rng.uniform(-0.5, 0.5)
        start += rng.uniform(-1.5, 1.5, size=2)
    step = np.array(DIRECTIONS[scene.direction], dtype=np.float64)
    clip = np.empty((frames, sc.SIZE, sc.SIZE, 3), dtype=np.uint8)
    clip[:] = sc.COLORS[scene.background]
    for i in range(frames):
        cx, cy = start + step * TRAVEL * (i / (frames - 1) - 0.5)
        clip[i][sc.shape_mask(scene.shape, cx, cy, half)] = sc.COLORS[scene.color]
    return clip


def track(frames) -> np.ndarray:
    """The shape's centroid (x, y) in pixels per frame; NaN where a frame shows no shape."""
    centroids = [image_score.centroid(frame) or (np.nan, np.nan) for frame in frames]
    return np.array(centroids, dtype=np.float64).reshape(-1, 2)


def direction(frames) -> str | None:
    """The way the shape moves over the frames (None: it stays put, moves diagonally, or is not seen in a frame)."""
    centroids = track(frames)
    if len(centroids) < 2 or np.isnan(centroids).any():
        return None
    t = np.arange(len(centroids), dtype=np.float64)
    travel = np.polyfit(t, centroids, 1)[0] * (len(centroids) - 1)  # fitted move in x and y over the clip
    along = int(np.argmax(np.abs(travel)))
    if abs(travel[along]) < MIN_TRAVEL or abs(travel[1 - along]) > MAX_ACROSS * abs(travel[along]):
        return None
    sign = int(np.sign(travel[along]))
    return next(name for name, step in DIRECTIONS.items() if step[along] == sign)


@dataclass(frozen=True)
class MotionScore:
    background: bool  # in every frame
    color: bool
    shape: bool
    direction: bool

    @property
    def all(self) -> bool:
        return self.background and self.color and self.shape and self.direction


def score(frames, text: str) -> MotionScore:
    """Which of the caption's four attributes the clip shows; a caption that does not parse scores all False."""
    scene = parse_caption(text)
    if scene is None or len(frames) == 0:
        return MotionScore(False, False, False, False)
    seen = [image_score.detect(frame) for frame in frames]
    return MotionScore(
        background=all(d.background == scene.background for d in seen),
        color=all(d.color == scene.color for d in seen),
        shape=all(d.shape == scene.shape for d in seen),
        direction=direction(frames) == scene.direction,
    )
