"""The tiny family's dataset and its two measures of whether a picture follows its caption (fastsd35/tiny/scenes.py):
the layout-fitting `adherence` and the layout-free `judge` (colour fractions, the shape of the largest blob)."""

import numpy as np
import pytest

from fastsd35.tiny.scenes import (CHECK_CAPTIONS, COLORS, LAYOUTS, SHAPES, SIZE, Scene, adherence, all_scenes, captions,
                                  coverage, judge, parse_caption)


def test_dataset_is_fixed_and_complete():
    scenes = all_scenes()
    assert len(scenes) == len(COLORS) * (len(COLORS) - 1) * len(SHAPES) * len(LAYOUTS)
    assert len(captions()) == len(COLORS) * (len(COLORS) - 1) * len(SHAPES)
    a, b = scenes[7].render(), Scene(**vars(scenes[7])).render()
    np.testing.assert_array_equal(a, b)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert all(s.color != s.background for s in scenes)


def test_scene_draws_its_caption():
    scene = Scene("circle", "red", "blue", (32, 32, 16))
    assert scene.caption == "a red circle on a blue background"
    pixels = scene.render()
    assert tuple(pixels[32, 32]) == COLORS["red"] and tuple(pixels[2, 2]) == COLORS["blue"]
    red = (pixels == COLORS["red"]).all(-1).mean()
    assert abs(red - np.pi * 16**2 / SIZE**2) < 0.02  # a disc of radius 16


def test_caption_parsing():
    assert parse_caption("A green triangle on a white background") == Scene("triangle", "green", "white")
    for bad in ("a red circle on a red background", "a purple circle on a blue background", "a red cube", ""):
        with pytest.raises(ValueError, match="not a tiny-scenes caption"):
            parse_caption(bad)


@pytest.mark.parametrize("scene", all_scenes()[::7])
def test_metric_scores_the_drawn_scene_fully(scene):
    """The drawn scene scores nearly 1 with its own shape at its own centre (a neighbouring size may tie: the
    anti-aliased rim counts on either side)."""
    fit = adherence(scene.render(), scene.caption)
    assert fit.score > 0.95 and fit.best_shape == scene.shape and fit.layout[:2] == scene.layout[:2]


def test_metric_rejects_noise_and_wrong_captions():
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert adherence(noise, "a red circle on a blue background").score < 0.4
    pixels = Scene("circle", "red", "blue").render()
    assert adherence(pixels, "a blue circle on a red background").score < 0.35  # colors swapped
    assert adherence(pixels, "a red circle on a green background").score <= 0.5  # background wrong
    background = np.broadcast_to(np.array(COLORS["blue"], np.uint8), pixels.shape)
    assert adherence(background, "a red circle on a blue background").score == 0.5  # no shape: half the credit
    assert adherence(pixels, "a red square on a blue background").score < 0.99  # shape wrong: only the corners
    assert adherence(pixels, "a red square on a blue background").best_shape == "circle"


def test_judge_names_every_drawn_scene_right():
    """Every scene of the dataset: colours right and the drawn shape named, with margins (fill: a circle about
    pi/4, a square 1, a triangle 1/2; taper: a triangle about 6)."""
    for scene in all_scenes():
        j = judge(scene.render(), scene.caption)
        assert j.colours_right and j.shape == scene.shape, (scene, j)


def test_check_captions_cover_every_colour_and_shape():
    scenes = [parse_caption(c) for c in CHECK_CAPTIONS]
    assert len(set(CHECK_CAPTIONS)) == 8
    assert {s.color for s in scenes} == {s.background for s in scenes} == set(COLORS)
    assert {s.shape for s in scenes} == set(SHAPES)


def shape_image(mask, color="red", background="blue"):
    fg, bg = (np.array(COLORS[c], np.uint8) for c in (color, background))
    return np.where(mask[..., None], fg, bg).astype(np.uint8)


def test_judge_refuses_what_is_not_the_caption():
    """Wrong colours, a blob of no shape, a shape too small, a stretched shape, pieces: not right."""
    caption = "a red square on a blue background"
    square = coverage("square", (32, 32, 13)) >= 0.5
    assert judge(shape_image(square), caption).shape == "square"
    assert not judge(shape_image(square, "green"), caption).colours_right  # the shape in another colour
    assert not judge(shape_image(square, background="white"), caption).colours_right
    assert not judge(shape_image(~square), caption).colours_right  # the colours swapped: mostly red
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert not judge(noise, caption).colours_right and judge(noise, caption).shape is None
    tiny = np.zeros((SIZE, SIZE), bool)
    tiny[30:36, 30:36] = True  # 36 pixels: below MIN_BLOB
    assert judge(shape_image(tiny), caption).shape is None
    bar = np.zeros((SIZE, SIZE), bool)
    bar[20:44, 28:36] = True  # a filled rectangle three times taller than wide
    assert judge(shape_image(bar), caption).shape is None
    ring = (coverage("circle", (32, 32, 16)) >= 0.5) & ~(coverage("circle", (32, 32, 10)) >= 0.5)
    assert judge(shape_image(ring), caption).shape is None  # fill 0.48, no taper
    apart = np.zeros((SIZE, SIZE), bool)
    apart[8:20, 8:20] = apart[40:56, 40:56] = True  # two squares: the larger blob is judged
    assert judge(shape_image(apart), caption).shape == "square" and judge(shape_image(apart), caption).fill == 1.0
    upside_down = (coverage("triangle", (32, 32, 16)) >= 0.5)[::-1]
    assert judge(shape_image(upside_down), "a red triangle on a blue background").shape is None  # apex down


def test_the_world_is_what_readme_says():
    """Five named colours, three shapes, centred in 3 sizes (README "The tiny model"; the shipped model learned them)."""
    assert COLORS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 50),
                      "white": (240, 240, 240)}  # fmt: skip
    assert LAYOUTS == ((32, 32, 10), (32, 32, 13), (32, 32, 16)) and Scene("circle", "red", "blue").layout == LAYOUTS[1]
    assert len(all_scenes()) == 180


@pytest.mark.parametrize("r", [10, 16])
def test_shapes_have_their_documented_geometry(r):
    """A square of the circle's area; a triangle with its apex up, base 2r wide at y = r, height 2r (area 2r^2)."""
    circle, square, triangle = (coverage(s, (32, 32, r)) for s in SHAPES)
    assert abs(square.sum() - circle.sum()) < 0.03 * circle.sum()  # equal, but for the square edges on the 1/4 px grid
    assert abs(triangle.sum() - 2 * r * r) < 0.01 * 2 * r * r
    rows = triangle.sum(axis=1)
    assert rows[32 - r : 32 - r + 2].sum() <= 2 and abs(rows[32 + r - 1] - 2 * r) < 1  # apex at the top, base at the bottom
    assert rows[: 32 - r].sum() == 0 and rows[32 + r :].sum() == 0
    side = np.sqrt(np.pi) * r
    assert abs((square >= 0.5).sum(axis=1).max() - side) < 1.5


def test_judge_colour_bounds():
    """Colours right: background at least half the image, the shape's colour 2% to 35%, the two at least 90%."""
    from fastsd35.tiny.scenes import Judgement

    def ok(shape, background):
        return Judgement(shape, background, "square", 1.0, 1.0, 1.0).colours_right

    assert ok(0.02, 0.9) and ok(0.35, 0.55) and ok(0.1, 0.8) and ok(0.3, 0.65)
    assert not ok(0.019, 0.95) and not ok(0.351, 0.6) and not ok(0.1, 0.499) and not ok(0.1, 0.79)


def test_judge_aspect_and_taper_bounds():
    """A rectangle 5:4 is still a square's blob for the judge; 3:2 is not; a wide top never makes a triangle."""
    caption = "a red square on a blue background"
    for h, w, want in ((24, 24, "square"), (24, 19, "square"), (19, 24, "square"), (24, 16, None), (16, 24, None)):
        mask = np.zeros((SIZE, SIZE), bool)
        mask[20 : 20 + h, 20 : 20 + w] = True
        assert judge(shape_image(mask), caption).shape == want, (h, w)
    wedge = np.zeros((SIZE, SIZE), bool)
    for i in range(24):  # one pixel at the top row, 24 at the bottom: taper 4x the first quarter's mean
        wedge[20 + i, 32 - (i + 1) // 2 : 32 + (i + 2) // 2] = True
    j = judge(shape_image(wedge), "a red triangle on a blue background")
    assert j.shape == "triangle" and j.taper > 2.0


def test_judge_reads_a_pil_image_of_another_size():
    """A PIL image is read as RGB at SIZE x SIZE (a 128 px picture of a scene is judged as the scene); an array of
    another shape is an error, not a guess."""
    from PIL import Image

    scene = Scene("triangle", "green", "white", (32, 32, 16))
    big = Image.fromarray(scene.render()).resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST)
    assert judge(big, scene.caption).shape == "triangle" and judge(big.convert("RGBA"), scene.caption).colours_right
    with pytest.raises(ValueError, match="expected a"):
        judge(np.zeros((SIZE, SIZE + 1, 3), np.uint8), scene.caption)
