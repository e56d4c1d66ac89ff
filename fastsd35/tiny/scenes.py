"""The tiny family's world: one flat shape in a named color on a named background color, drawn in code, with its
caption ("a red circle on a blue background"), and two pixel measures of whether an image follows its caption:
`adherence` (how well the caption's best-fitting layout matches, per pixel) and `judge` (the colours' fractions and
the shape a person would name, read from the largest blob of the shape's colour without the scenes' layouts).

Every scene is one of `COLORS` x `SHAPES` x (background color != shape color) x `LAYOUTS` (3 sizes, centred);
the caption names the colors and the shape, not the layout. Drawing is deterministic (4x4 supersampled coverage),
so the whole dataset is fixed and a seed only decides which scenes a training batch draws.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 64  # pixels: the tiny family is trained and used at 64x64
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 50),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# (centre x, centre y, radius) in pixels of a SIZE x SIZE image: the centre, 3 sizes. Centred because a shape that
# may sit anywhere is a far harder distribution for a small model trained for an hour on a CPU: with 9 centres 8 or 3
# pixels apart, 900-1200 steps drew blends of shapes at several places (a shape right in 7-9 of 24 images, by
# `judge`); centred, the sizes are concentric and the shape itself is what the model must learn (14 of 24 at 600).
LAYOUTS = tuple((SIZE // 2, SIZE // 2, r) for r in (10, 13, 16))
_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    layout: tuple[int, int, int] = LAYOUTS[len(LAYOUTS) // 2]

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    def render(self) -> np.ndarray:
        """(SIZE, SIZE, 3) uint8 RGB."""
        alpha = coverage(self.shape, self.layout)[..., None]
        fg, bg = (np.array(COLORS[c], dtype=np.float32) for c in (self.color, self.background))
        return np.round(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


def captions() -> list[str]:
    """Every caption of the dataset, in a fixed order."""
    return sorted({s.caption for s in all_scenes()})


def all_scenes() -> list[Scene]:
    """The whole dataset, in a fixed order: 5 colors x 4 other backgrounds x 3 shapes x 3 layouts = 180 scenes."""
    return [
        Scene(shape, color, background, layout)
        for color, background in itertools.permutations(COLORS, 2)
        for shape in SHAPES
        for layout in LAYOUTS
    ]


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (at the central layout). ValueError for a caption outside the dataset."""
    m = _CAPTION.fullmatch(caption.strip().lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in COLORS or m[1] == m[3]:
        raise ValueError(f"not a tiny-scenes caption: {caption!r} (e.g. 'a red circle on a blue background'; colors "
                         f"{', '.join(COLORS)}; shapes {', '.join(SHAPES)})")
    return Scene(m[2], m[1], m[3])


@lru_cache(maxsize=None)
def coverage(shape: str, layout: tuple[int, int, int]) -> np.ndarray:
    """(SIZE, SIZE) float32 in [0, 1]: how much of each pixel the shape covers (4x4 samples per pixel)."""
    cx, cy, r = layout
    n = SIZE * _SUPERSAMPLE
    t = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE  # sample positions in pixel units
    x, y = t[None, :] - cx, t[:, None] - cy
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":  # the same area as the circle of radius r
        half = r * np.sqrt(np.pi) / 2
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":  # apex up, width 2r at the base, height 2r
        inside = (y <= r) & (y >= -r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    return inside.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


# -- the metric --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adherence:
    """How well an image follows its caption. `score`: for the best-fitting layout of the named shape, the mean of
    two fractions: of the shape's pixels whose nearest palette color is the shape's color, and of the other pixels
    whose nearest is the background's (1.0 = exactly the caption's scene; 0.5 for the background color alone, which
    a plain fraction of all pixels would score 0.8-0.9; about 0.2 for colored noise). `best_shape`: the shape whose
    best layout fits best."""

    score: float
    best_shape: str
    layout: tuple[int, int, int]


def adherence(image, caption: str) -> Adherence:
    """Measure `image` (a PIL image or (H, W, 3) array, resized to SIZE x SIZE if needed) against `caption`. Each
    pixel is labelled with its nearest color of `COLORS`; for each shape and layout, the expected labels are the
    shape's color where the shape covers at least half the pixel and the background color elsewhere."""
    scene = parse_caption(caption)
    nearest, names = _nearest_palette(image), list(COLORS)
    is_fg, is_bg = nearest == names.index(scene.color), nearest == names.index(scene.background)
    fits = {}
    for shape in SHAPES:
        for layout in LAYOUTS:
            inside = coverage(shape, layout) >= 0.5
            fits[shape, layout] = 0.5 * float(is_fg[inside].mean() + is_bg[~inside].mean())
    best_shape = max(SHAPES, key=lambda s: max(v for (shape, _), v in fits.items() if shape == s))
    layout = max(LAYOUTS, key=lambda lay: fits[scene.shape, lay])
    return Adherence(fits[scene.shape, layout], best_shape, layout)


# Eight captions that name every colour as the shape's and as the background's, and every shape (3 squares, 2 circles,
# 3 triangles): the check that README and tests/tiny report, 3 seeds each.
CHECK_CAPTIONS = (
    "a red square on a blue background",
    "a green circle on a white background",
    "a blue triangle on a yellow background",
    "a yellow square on a red background",
    "a white circle on a green background",
    "a red triangle on a white background",
    "a green triangle on a blue background",
    "a blue square on a green background",
)


@dataclass(frozen=True)
class Judgement:
    """What an image shows, measured independently of the training loss and of `adherence`'s layout templates.

    `shape_fraction` / `background_fraction`: the fractions of pixels whose nearest palette colour is the caption's
    shape colour / background colour. `shape`: the shape the largest 4-connected blob of the shape colour has, by its
    `fill` (blob area over bounding-box area: a circle pi/4, a square 1, a triangle 1/2), its `taper` (mean width of
    the bottom quarter of its rows over that of the top quarter: a triangle about 6, a circle or a square 1) and its
    `aspect` (bounding-box height over width: 1 for every drawn shape); None when the blob is none of them or
    smaller than MIN_BLOB pixels. Every drawn scene is judged right (tests/tiny/test_scenes.py)."""

    shape_fraction: float
    background_fraction: float
    shape: str | None
    fill: float
    taper: float
    aspect: float

    @property
    def colours_right(self) -> bool:
        """The background colour covers most of the image, the shape colour a plausible part of it (drawn scenes:
        5% to 20%), and the two together nearly all of it."""
        return (self.background_fraction >= 0.5 and 0.02 <= self.shape_fraction <= 0.35
                and self.shape_fraction + self.background_fraction >= 0.9)


MIN_BLOB = 40  # pixels; the smallest drawn shape has 200


def judge(image, caption: str) -> Judgement:
    """Judge `image` (a PIL image or (SIZE, SIZE, 3) array) against `caption` (see `Judgement`)."""
    scene = parse_caption(caption)
    nearest, names = _nearest_palette(image), list(COLORS)
    shape_pixels = nearest == names.index(scene.color)
    blob = _largest_blob(shape_pixels)
    fractions = float(shape_pixels.mean()), float((nearest == names.index(scene.background)).mean())
    if blob.sum() < MIN_BLOB:
        return Judgement(*fractions, None, 0.0, 0.0, 0.0)
    ys, xs = np.nonzero(blob)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    fill = float(blob.sum() / (height * width))
    widths = blob[ys.min() : ys.max() + 1].sum(axis=1)
    quarter = max(1, height // 4)
    taper = float(widths[-quarter:].mean() / max(widths[:quarter].mean(), 0.5))
    aspect = height / width
    shape = None
    if 0.75 <= aspect <= 1.33:
        if taper >= 2.0 and 0.4 <= fill < 0.65:
            shape = "triangle"
        elif taper < 1.5 and fill >= 0.89:
            shape = "square"
        elif taper < 1.5 and 0.65 <= fill < 0.89:
            shape = "circle"
    return Judgement(*fractions, shape, fill, taper, aspect)


def _nearest_palette(image) -> np.ndarray:
    """(SIZE, SIZE) index into COLORS of each pixel's nearest colour."""
    pixels = _as_array(image).astype(np.float32)
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    return np.argmin(((pixels[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask` (the one with the smallest pixel index on a tie), as a mask: each
    pixel takes the smallest label among itself and its masked neighbours until nothing changes."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:], labels])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[mask], minlength=big) if mask.any() else np.zeros(1, int)
    return mask & (labels == np.argmax(counts)) if mask.any() else mask.copy()


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(image)
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a ({SIZE}, {SIZE}, 3) image, got {image.shape}")
    return image


__all__ = ["CHECK_CAPTIONS", "COLORS", "LAYOUTS", "SHAPES", "SIZE", "Adherence", "Judgement", "Scene", "adherence",
           "all_scenes", "captions", "coverage", "judge", "parse_caption"]
