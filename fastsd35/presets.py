"""Named generation presets (DESIGN.md "Sampling and presets"; the reference's CONFIGS, SPEC.md §2.2)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FastSD35Error
from .sampling import SLGConfig


@dataclass(frozen=True)
class Preset:
    name: str
    variant: str  # the transformer the preset expects (MMDiTXConfig.variant); "custom" for tiny
    checkpoints: tuple[str, ...]  # official file names to look for in a model folder, in order of preference
    shift: float
    steps: int
    cfg: float
    sampler: str
    slg: SLGConfig | None = None
    width: int = 1024
    height: int = 1024
    description: str = ""


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
            "tiny", "custom", (),
            shift=3.0, steps=8, cfg=4.5, sampler="dpmpp_2m", width=256, height=256,
            description="random-weight model built in code, for self-tests; needs no downloads",
        ),
    )
}

# The SD3.5 Large ControlNets (chosen by the checkpoint's `control_type`, never by file name).
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}
CONTROLNET_SETTINGS = dict(shift=3.0, steps=60, cfg=3.5, sampler="euler")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FastSD35Error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
