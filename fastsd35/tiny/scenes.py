"""The tiny family's world: one flat shape in a named color on a named background color, drawn in code, with its
caption ("a red circle on a blue background"), and the pixel metric that says whether an image follows its caption.

Every scene is one of `COLORS` x `SHAPES` x (background color != shape color) x `LAYOUTS` (a few centres and sizes);
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
# (centre x, centre y, radius) in pixels of a SIZE x SIZE image: 3 x 3 centres, 3 sizes
LAYOUTS = tuple((32 + dx, 32 + dy, r) for dy in (-8, 0, 8) for dx in (-8, 0, 8) for r in (10, 13, 16))
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
    """The whole dataset, in a fixed order: 5 colors x 4 other backgrounds x 3 shapes x 27 layouts = 1620 scenes."""
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
    pixels = _as_array(image).astype(np.float32)
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)
    names = list(COLORS)
    is_fg, is_bg = nearest == names.index(scene.color), nearest == names.index(scene.background)
    fits = {}
    for shape in SHAPES:
        for layout in LAYOUTS:
            inside = coverage(shape, layout) >= 0.5
            fits[shape, layout] = 0.5 * float(is_fg[inside].mean() + is_bg[~inside].mean())
    best_shape = max(SHAPES, key=lambda s: max(v for (shape, _), v in fits.items() if shape == s))
    layout = max(LAYOUTS, key=lambda lay: fits[scene.shape, lay])
    return Adherence(fits[scene.shape, layout], best_shape, layout)


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


__all__ = ["COLORS", "LAYOUTS", "SHAPES", "SIZE", "Adherence", "Scene", "adherence", "all_scenes", "captions",
           "coverage", "parse_caption"]
