"""The preset table (DESIGN.md) and settings resolution with its up-front checks."""

import math

import pytest

from fastsd35 import FastSD35Error
from fastsd35.pipeline.presets import PRESETS, get_preset
from fastsd35.pipeline.sampling import SLGConfig


@pytest.mark.parametrize(
    "name, shift, steps, cfg, sampler, slg",
    [
        ("sd3_medium", 1.0, 50, 5.0, "dpmpp_2m", None),
        ("medium", 3.0, 50, 4.0, "dpmpp_2m", SLGConfig(2.5, 0.01, 0.20, (7, 8, 9), 4.0)),  # cfg 4.0 while SLG is on
        ("large", 3.0, 40, 4.5, "dpmpp_2m", None),
        ("large_turbo", 3.0, 4, 1.0, "euler", None),
    ],
)
def test_preset_defaults(name, shift, steps, cfg, sampler, slg):
    s = get_preset(name).resolve()
    assert (s.shift, s.steps, s.cfg, s.sampler, s.slg) == (shift, steps, cfg, sampler, slg)
    assert (s.width, s.height, s.denoise) == (1024, 1024, 1.0)


def test_slg_switches_and_cfg():
    medium = get_preset("medium")
    assert medium.resolve(slg=False).slg is None and medium.resolve(slg=False).cfg == 5.0
    assert medium.resolve(cfg=6.0).cfg == 6.0  # an explicit cfg wins over SLG's
    large = get_preset("large").resolve(slg=True)
    assert large.slg == SLGConfig() and large.cfg == 4.0
    custom = SLGConfig(scale=3.0, layers=(5,), cfg=3.0)
    assert large.slg != custom and get_preset("large").resolve(slg=custom).slg == custom


def test_overrides_keep_the_rest():
    s = get_preset("large_turbo").resolve(steps=8, width=768, height=1344, sampler="dpmpp_2m", shift=2.0)
    assert (s.steps, s.width, s.height, s.sampler, s.shift, s.cfg) == (8, 768, 1344, "dpmpp_2m", 2.0, 1.0)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FastSD35Error, match="unknown preset 'xl'; choose one of: sd3_medium, medium, large, large_turbo, tiny"):
        get_preset("xl")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=1000), "width 1000 is not a multiple of 16: use 992 or 1008"),
        (dict(height=1080), "height 1080 is not a multiple of 16: use 1072 or 1088"),
        (dict(width=8), "width 8 is not a multiple of 16: use 16"),
        (dict(width=3088, max_pixels=3072), "width 3088 is beyond this model's position-embedding limit of 3072 pixels"),
        (dict(steps=0), r"steps must be an integer in \[1, 1000\], got 0"),
        (dict(cfg=math.nan), "cfg must be a finite number >= 0, got nan"),
        (dict(cfg=math.inf), "cfg must be a finite number >= 0, got inf"),
        (dict(shift=0.0), "shift must be a finite number > 0"),
        (dict(sampler="heun"), "sampler must be one of euler, dpmpp_2m, got 'heun'"),
        (dict(denoise=0.0), r"denoise must be a finite number in \(0, 1\], got 0.0"),
        (dict(denoise=1.2), r"denoise must be a finite number in \(0, 1\], got 1.2"),
        (dict(slg=SLGConfig(start=0.5, end=0.2)), "skip-layer guidance needs"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(FastSD35Error, match=message):
        get_preset("large").resolve(**kwargs)


def test_every_preset_resolves():
    for preset in PRESETS.values():
        preset.resolve()
