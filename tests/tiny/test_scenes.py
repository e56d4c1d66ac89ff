"""The tiny family's dataset and its prompt-adherence metric (fastsd35/tiny_scenes.py)."""

import numpy as np
import pytest

from fastsd35.tiny.scenes import COLORS, LAYOUTS, SHAPES, SIZE, Scene, adherence, all_scenes, captions, parse_caption


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


@pytest.mark.parametrize("scene", all_scenes()[::97])
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
