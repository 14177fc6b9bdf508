"""Check a generated shape scene against its caption with plain image analysis (numpy only).

The image is reduced to 32x32 and every pixel labelled with its nearest named colour. The background is the most
common label on the border, the shape colour the most common other label. The shape is the largest connected region
of pixels closer to the shape colour than to the background; its centroid gives the position, and two measures of
its outline give the kind: a triangle is much narrower at the top than at the bottom, and a square fills the
corners of its bounding box where a circle leaves them empty. (Plain bounding-box fill, ~1.0 against ~0.785, is
thrown off by one-pixel rasterisation tips on small circles.)

Styled scenes (``scenes.STYLES``) are checked the same way: ``style_check`` says whether an image shows its caption
in a style (the style's colours, or for ``large`` a shape whose size, estimated from its area, is past what plain
renders ever reach), and ``adherence(..., style=)`` scores each caption as the style draws it.
"""

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fastgen.shapes import scenes as sc

_PALETTE_NAMES = list(sc.COLORS)
_PALETTE = np.array([sc.COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
TRIANGLE_TAPER = 0.45  # top-third width / bottom-third width below this: triangle (~0.25 drawn, ~1 otherwise)
# A corner of the bounding box is where |u| + |v| > CORNER, in box coordinates scaled to [-1, 1]; a drawn square fills
# it (1.0), a drawn disc mostly not (at most ~0.5). Both were calibrated on the first trained VAE's (4 latent channels)
# reconstructions of ground-truth renders, whose squares came back with rounded corners: there all-four-correct rose
# to 84% against 77% for the first guess (CORNER 1.5, threshold 0.5), while every ground-truth render still scores
# right. The current VAE (8 latent channels) keeps the corners: its reconstructions score 98%.
CORNER = 1.3
SQUARE_CORNERS = 0.54  # filled fraction of the corners at or above this: square
# Area of a shape of half-side h, in units of h^2: the half-side of a drawn shape is sqrt(area / this).
AREA_PER_HALF_SIDE_SQUARED = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
# Plain renders' half-sides are 5-7 px, large ones' 8-10: measured on every scene's jittered render and its VAE
# reconstruction, the estimate reaches at most 7.05 for plain and at least 7.38 for large shapes.
LARGE_HALF_SIDE = 7.25


@dataclass(frozen=True)
class Detection:
    """What the image shows; a field is None when nothing could be found."""

    background: str
    color: str | None
    position: str | None
    shape: str | None


@dataclass(frozen=True)
class Score:
    background: bool
    color: bool
    position: bool
    shape: bool

    @property
    def all(self) -> bool:
        return self.background and self.color and self.position and self.shape


def to_array(image) -> np.ndarray:
    """A PIL image or uint8 HxWx3 array as a float (32, 32, 3) array, box-downscaled when larger."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil = pil.convert("RGB")
    if pil.size != (sc.SIZE, sc.SIZE):
        pil = pil.resize((sc.SIZE, sc.SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def _labels(pixels: np.ndarray) -> np.ndarray:
    return np.argmin(((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1), axis=-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, region = deque([start]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    """Triangle by taper (narrow top, wide bottom), else square or circle by how full the box's corners are."""
    rows, cols = np.nonzero(mask)
    if len(rows) < 4:
        return None
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    widths = mask[rows.min() : rows.max() + 1].sum(axis=1).astype(np.float32)
    third = max(height // 3, 1)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1.0)
    if taper < TRIANGLE_TAPER:
        return "triangle"
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    u, v = xs / width * 2 - 1, ys / height * 2 - 1
    corners = np.abs(u) + np.abs(v) > CORNER
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # A shape cut off by the canvas edge fills the box's corners on that side, circle or not: judge by the others.
    cut = (
        (v < 0) & (rows.min() == 0)
        | (v > 0) & (rows.max() == mask.shape[0] - 1)
        | (u < 0) & (cols.min() == 0)
        | (u > 0) & (cols.max() == mask.shape[1] - 1)
    )
    if (corners & ~cut).any():
        corners &= ~cut
    return "square" if box[corners].mean() >= SQUARE_CORNERS else "circle"


def mask_centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """A mask's centre (x, y) in pixels, pixel centres at integer + 0.5; None for an empty mask."""
    rows, cols = np.nonzero(mask)
    return None if len(rows) == 0 else (float(cols.mean()) + 0.5, float(rows.mean()) + 0.5)


def nearest_position(mask: np.ndarray) -> str | None:
    centre = mask_centroid(mask)
    if centre is None:
        return None
    cx, cy = centre
    return min(sc.POSITIONS, key=lambda name: (sc.POSITIONS[name][0] - cx) ** 2 + (sc.POSITIONS[name][1] - cy) ** 2)


def _segment(image) -> tuple[int, int | None, np.ndarray | None]:
    """Palette indices of the background and the shape colour (None: no shape), and the shape's pixel mask."""
    pixels = to_array(image)
    labels = _labels(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    others = np.bincount(labels[labels != bg], minlength=len(_PALETTE))
    if others.sum() == 0:
        return bg, None, None
    fg = int(others.argmax())
    near_fg = ((pixels - _PALETTE[fg]) ** 2).sum(-1) < ((pixels - _PALETTE[bg]) ** 2).sum(-1)
    return bg, fg, _largest_component(near_fg)


def detect(image) -> Detection:
    """Background colour, shape colour, position and shape kind seen in an image."""
    bg, fg, mask = _segment(image)
    if fg is None:
        return Detection(_PALETTE_NAMES[bg], None, None, None)
    return Detection(_PALETTE_NAMES[bg], _PALETTE_NAMES[fg], nearest_position(mask), classify_shape(mask))


def centroid(image) -> tuple[float, float] | None:
    """Where the image's shape is: its centre (x, y) in pixels of the 32x32 canvas; None when no shape is seen."""
    _, fg, mask = _segment(image)
    return None if fg is None else mask_centroid(mask)


def half_side(image, shape: str) -> float:
    """The drawn shape's half-side in pixels, from its area as a ``shape`` (0 when there is no shape)."""
    _, fg, mask = _segment(image)
    return 0.0 if fg is None else float(np.sqrt(mask.sum() / AREA_PER_HALF_SIDE_SQUARED[shape]))


def style_check(image, caption: str, style: str) -> bool:
    """Whether the image shows the caption's scene in ``style``: its colours as the style swaps them (colour styles),
    or its shape larger than any plain render draws it (``large``). A caption that does not parse fails."""
    scene = sc.parse_caption(caption)
    if scene is None:
        return False
    if style == "large":
        return half_side(image, scene.shape) >= LARGE_HALF_SIDE
    want, seen = sc.styled(scene, style), detect(image)
    return (seen.color, seen.background) == (want.color, want.background)


def score(image, caption: str) -> Score:
    """Which of the caption's four attributes the image shows; a caption that does not parse scores all False."""
    scene = sc.parse_caption(caption)
    if scene is None:
        return Score(False, False, False, False)
    seen = detect(image)
    return Score(
        background=seen.background == scene.background,
        color=seen.color == scene.color,
        position=seen.position == scene.position,
        shape=seen.shape == scene.shape,
    )


def styled_caption(caption: str, style: str | None) -> str:
    """The caption of the scene ``style`` draws for ``caption`` (unchanged without a style, or when it does not
    parse)."""
    scene = sc.parse_caption(caption)
    return caption if scene is None or style is None else sc.caption(sc.styled(scene, style))


def adherence(images, captions, style: str | None = None) -> dict:
    """Fraction of images correct on each attribute and on all four together; with a style, each caption is scored
    as that style draws it (``complement``: "a red circle" should show a green one)."""
    scores = [score(image, styled_caption(text, style)) for image, text in zip(images, captions, strict=True)]
    if not scores:
        raise ValueError("images: need at least one image")
    fields = ("background", "color", "position", "shape", "all")
    result = {field: float(np.mean([getattr(s, field) for s in scores])) for field in fields}
    result["n"] = len(scores)
    return result
