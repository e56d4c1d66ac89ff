"""Named generation presets (DESIGN.md "Sampling and presets"; the reference's CONFIGS, SPEC.md §2.2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import FastSD35Error
from .inputs import check, shown
from .sampling import SLGConfig


@dataclass(frozen=True)
class Preset:
    name: str
    variant: str  # the transformer the preset expects (MMDiTXConfig.variant); "custom" for the tiny ones
    checkpoints: tuple[str, ...]  # official file names to look for in a model folder, in order of preference
    shift: float
    steps: int
    cfg: float
    sampler: str
    slg: SLGConfig | None = None
    width: int = 1024
    height: int = 1024
    description: str = ""
    built_in: bool = False  # the model ships with the package or is built in code: no --model needed

    def with_controlnet(self) -> "Preset":
        """The settings the reference uses whenever an SD3.5 ControlNet is given (all three kinds alike)."""
        return replace(self, slg=None, **CONTROLNET_SETTINGS)

    def resolve(
        self,
        *,
        steps=None,
        cfg=None,
        shift=None,
        sampler=None,
        width=None,
        height=None,
        slg: bool | SLGConfig | None = None,
        denoise: float = 1.0,
        max_pixels: int | None = None,
    ) -> "Settings":
        """This preset's settings with the given overrides (None keeps the preset's value), checked: a bad value
        raises FastSD35Error saying what is wrong and what would work. `slg`: None = the preset's default, False =
        off, True = on with the preset's (or the default) config. While SLG is on and cfg is not given, the SLG
        config's cfg applies. `max_pixels`: the largest side the model's position table allows."""
        if not (slg is None or isinstance(slg, (bool, SLGConfig))):
            raise FastSD35Error(f"slg must be None, True, False or an SLGConfig, got {shown(slg)}")
        if slg is None or slg is True:
            slg = self.slg if slg is None else (self.slg or SLGConfig())
        settings = Settings(
            steps=self.steps if steps is None else steps,
            cfg=(slg.cfg if slg else self.cfg) if cfg is None else cfg,
            shift=self.shift if shift is None else shift,
            sampler=self.sampler if sampler is None else sampler,
            width=self.width if width is None else width,
            height=self.height if height is None else height,
            slg=slg or None,
            denoise=denoise,
        )
        settings.check(max_pixels)
        return settings


@dataclass(frozen=True)
class Settings:
    """Everything that decides the sampled latent apart from prompts, seed, model and init image."""

    steps: int
    cfg: float
    shift: float
    sampler: str
    width: int
    height: int
    slg: SLGConfig | None
    denoise: float = 1.0

    def check(self, max_pixels: int | None = None):
        for name in ("steps", "cfg", "shift", "sampler", "denoise", "width", "height"):
            check(name, getattr(self, name))  # types and ranges (inputs.FIELDS), the same checks as the CLI's
        for name, value in (("width", self.width), ("height", self.height)):
            if value < 16 or value % 16:
                lower, upper = max(16, value // 16 * 16), max(16, -(-value // 16) * 16)
                nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
                raise FastSD35Error(f"{name} {shown(value)} is not a multiple of 16: use {nearest if len(nearest) < 80 else 'a multiple of 16'}")
            if max_pixels and value > max_pixels:
                raise FastSD35Error(f"{name} {shown(value)} is beyond this model's position-embedding limit of {max_pixels} pixels")
        if self.slg:
            slg = self.slg
            for name in ("scale", "start", "end", "cfg"):
                check(f"slg_{name}" if name != "cfg" else "cfg", getattr(slg, name), f"skip-layer guidance {name}")
            if not slg.start < slg.end:
                raise FastSD35Error(f"skip-layer guidance needs start < end, got start {slg.start:g}, end {slg.end:g}")
            layers = slg.layers
            if not (isinstance(layers, tuple) and layers and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  and 0 <= i < MAX_BLOCKS for i in layers)):
                raise FastSD35Error(f"skip-layer guidance layers must be block numbers from 0 to {MAX_BLOCKS - 1}, "
                                    f"got {shown(layers)}")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "sd3_medium", "sd3_medium",
            ("sd3_medium.safetensors", "sd3_medium_incl_clips_t5xxlfp16.safetensors", "sd3_medium_incl_clips.safetensors"),
            shift=1.0, steps=50, cfg=5.0, sampler="dpmpp_2m", description="SD3 Medium (2B)",
        ),
        Preset(
            "medium", "sd3.5_medium", ("sd3.5_medium.safetensors",),
            shift=3.0, steps=50, cfg=5.0, sampler="dpmpp_2m", slg=SLGConfig(),
            description="SD3.5 Medium (2.5B, MMDiT-X) with skip-layer guidance",
        ),
        Preset(
            "large", "sd3.5_large", ("sd3.5_large.safetensors",),
            shift=3.0, steps=40, cfg=4.5, sampler="dpmpp_2m", description="SD3.5 Large (8B)",
        ),
        Preset(
            "large_turbo", "sd3.5_large", ("sd3.5_large_turbo.safetensors",),
            shift=3.0, steps=4, cfg=1.0, sampler="euler", description="SD3.5 Large Turbo (8B, distilled, 4 steps)",
        ),
        Preset(
            "tiny", "custom", ("tiny.safetensors",),
            shift=3.0, steps=16, cfg=1.5, sampler="dpmpp_2m", width=64, height=64, built_in=True,
            description="a small SD3 trained on simple scenes ('a red circle on a blue background'; "
                        "fastsd35.tiny.scenes), shipped with the package: seconds on a CPU",
        ),
        Preset(
            "tiny_random", "custom", ("tiny.safetensors",),
            shift=3.0, steps=8, cfg=4.5, sampler="dpmpp_2m", width=256, height=256, built_in=True,
            description="random-weight model built in code, for self-tests; needs no downloads",
        ),
    )
}

MAX_BLOCKS = 128  # weights.checkpoints.MAX_DEPTH: no transformer has more blocks

# The SD3.5 Large ControlNets' settings (their kinds: models.controlnet.CONTROL_TYPES).
CONTROLNET_SETTINGS = dict(shift=3.0, steps=60, cfg=3.5, sampler="euler")


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise FastSD35Error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
