"""GPU memory: what a generation needs (weights + activations) against what the device has, checked before loading.

Weights are parameter counts times bytes per parameter; the counts come from the released configs, built on the meta
device (no memory, no files), so they follow the model code. Activations are estimates from the shapes:

* the transformer pass holds about TRANSFORMER_ACTIVATIONS values of width D per token (residual streams, q/k/v and
  the joint attention buffers, the 4x MLP hidden), for batch x (2 with classifier-free guidance) sequences of
  (h/16)(w/16) image tokens + 77 + T5 tokens;
* the VAE decode holds about VAE_ACTIVATIONS values per output pixel and image (its full-resolution levels);
* the larger of the two, since the decode runs after sampling; plus OVERHEAD (allocator slack, CUDA graph pools).

Text encoders run on the GPU in bf16 when they fit (`--text-encoder-device auto`), else on the CPU, as the runner
places them. A ControlNet's weights are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from ..errors import FastSD35Error

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}  # per transformer weight; FP8 keeps non-Linear weights in bf16
TEXT_ENCODER_BYTES = 2  # bf16 on a GPU (checkpoints.default_dtype)
TRANSFORMER_ACTIVATIONS = 16  # values per token and hidden unit, live at the peak of one transformer pass
VAE_ACTIVATIONS = 1536  # values per output pixel and image, live at the peak of the VAE decode
OVERHEAD = (0.05, 0.5e9)  # fraction of the total, plus bytes
LABELS = {"sd3_medium": "SD3 Medium", "sd3.5_medium": "SD3.5 Medium", "sd3.5_large": "SD3.5 Large"}

# The released text encoders (SPEC.md §6.1), as conditioning.clip_config / t5_config arguments.
ENCODER_CONFIGS = {
    "clip_l": ("clip", (49408, 768, 3072, 12, 77, 768, "clip_l")),
    "clip_g": ("clip", (49408, 1280, 5120, 32, 77, 1280, "clip_g")),
    "t5xxl": ("t5", (32128, 4096, 10240, 64, 64, 24)),
}


@lru_cache(maxsize=None)
def transformer_parameters(variant: str) -> tuple[int, int]:
    """(all weights, those in Linear layers) of a released transformer (model.CONFIGS), counted on the meta device;
    all weights = every tensor of its state dict (the position table is a buffer)."""
    from ..models.mmditx import CONFIGS, MMDiTX

    with torch.device("meta"):
        model = MMDiTX(CONFIGS[variant])
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(t.numel() for t in model.state_dict().values()), linear


@lru_cache(maxsize=None)
def encoder_parameters(name: str) -> int:
    """Parameters of a released text encoder ("clip_l", "clip_g", "t5xxl"), counted on the meta device."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ..models.text_encoders import clip_config, t5_config

    kind, args = ENCODER_CONFIGS[name]
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(clip_config(*args)) if kind == "clip" else T5EncoderModel(t5_config(*args))
    return sum(p.numel() for p in model.parameters())  # T5's tied embedding counts once


@lru_cache(maxsize=None)
def vae_parameters() -> int:
    from ..models.vae import SDVAE

    with torch.device("meta"):
        return sum(p.numel() for p in SDVAE().parameters())


@dataclass(frozen=True)
class Request:
    """What decides the memory a generation needs."""

    variant: str  # model.CONFIGS key
    dtype: str  # "fp32", "fp16", "bf16" or "fp8"
    width: int
    height: int
    batch: int = 1
    guided: bool = True  # cfg > 1: cond and uncond in one batch
    t5: bool = True
    t5_tokens: int = 256
    text_encoder_device: str = "auto"  # "auto", "cuda..." or "cpu"


@dataclass(frozen=True)
class Estimate:
    request: Request
    parts: dict  # name -> bytes
    text_encoders_on_gpu: bool

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {b / 1e9:.1f}" for name, b in self.parts.items() if b)
        return f"about {self.total / 1e9:.1f} GB ({parts})"


def estimate(r: Request, free: float | None = None) -> Estimate:
    """The peak GPU memory of `r`. With `text_encoder_device="auto"` the text encoders count only when everything fits
    in `free` bytes with them (as the runner places them); without `free`, they count."""
    params, linear = transformer_parameters(r.variant)
    dtype = BYTES[r.dtype]
    other = BYTES["bf16"] if r.dtype == "fp8" else dtype  # FP8 applies to the Linear weights only
    dit = linear * dtype + (params - linear) * other
    encoders = sum(encoder_parameters(n) for n in ("clip_l", "clip_g", "t5xxl")[: 3 if r.t5 else 2]) * TEXT_ENCODER_BYTES
    vae = vae_parameters() * other
    hidden = _config(r.variant).hidden_size
    tokens = (r.width // 16) * (r.height // 16) + 77 + max(77, r.t5_tokens if r.t5 else 77)
    sampling = TRANSFORMER_ACTIVATIONS * r.batch * (2 if r.guided else 1) * tokens * hidden * other
    decode = VAE_ACTIVATIONS * r.batch * r.width * r.height * other
    activations = max(sampling, decode)

    def with_overhead(parts):
        total = sum(parts.values())
        return {**parts, "overhead": OVERHEAD[0] * total + OVERHEAD[1]}

    base = {"transformer": dit, "text encoders": 0.0, "VAE": vae, "activations": activations}
    on_gpu = {**base, "text encoders": encoders}
    te = r.text_encoder_device
    if te.startswith("cuda") or (te == "auto" and (free is None or sum(with_overhead(on_gpu).values()) <= free)):
        return Estimate(r, with_overhead(on_gpu), True)
    return Estimate(r, with_overhead(base), False)


def _config(variant: str):
    from ..models.mmditx import CONFIGS

    return CONFIGS[variant]


def dtype_name(dtype) -> str:
    """A --dtype name for a torch dtype (or a name)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if isinstance(dtype, str):
        return dtype
    return names.get(dtype) or ("fp8" if "float8" in str(dtype) else str(dtype))


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device (the seam tests replace)."""
    return torch.cuda.mem_get_info(device)


def preflight(r: Request, device, dtypes=tuple(BYTES)) -> Estimate | None:
    """Raise FastSD35Error, in one line with what would fit, when `r` will not fit in the free memory of `device`;
    else return the estimate. Nothing to check on a CPU (None). `dtypes`: the --dtype values on offer."""
    device = torch.device(device)
    if device.type != "cuda" or r.variant not in LABELS:
        return None
    free, _ = device_memory(device)
    e = estimate(r, free)
    if e.total <= free:
        return e
    raise FastSD35Error(
        f"{LABELS[r.variant]} in {r.dtype} at {r.width}x{r.height}, batch {r.batch} needs {e.describe()} of GPU memory "
        f"but {device} has {free / 1e9:.1f} GB free: {fit_hint(r, free, dtypes)}"
    )


def fit_hint(r: Request, free: float, dtypes=tuple(BYTES)) -> str:
    """What would fit in `free` bytes: each single change that fits, else the changes together."""
    fits = lambda x: estimate(x, free).total <= free  # noqa: E731
    gb = lambda x: f"about {estimate(x, free).total / 1e9:.1f} GB"  # noqa: E731
    smaller = [d for d in ("fp8", "bf16") if d in dtypes and BYTES[d] < BYTES[r.dtype]]
    cheaper = [(f"--dtype {smaller[0]}", replace(r, dtype=smaller[0]))] if smaller else []
    if r.text_encoder_device.startswith("cuda"):  # "auto" already moves them to the CPU when short
        cheaper.append(("--text-encoder-device cpu", replace(r, text_encoder_device="cpu")))
    options = [(flag, c) for flag, c in cheaper + _smaller_shapes(r, fits) if fits(c)]
    if options:
        return "it would fit with " + ", or ".join(f"{flag} ({gb(c)})" for flag, c in options)
    together, flags = r, []
    for flag, c in cheaper:
        together = replace(together, **{k: v for k, v in vars(c).items() if v != getattr(r, k)})
        flags.append(flag)
    for flag, c in _smaller_shapes(together, fits):
        together = c if c.batch < together.batch else replace(together, width=c.width, height=c.height)
        flags.append(flag)
        if fits(together):
            break
    if flags and fits(together):
        return f"it would fit with {' '.join(flags)} together ({gb(together)})"
    tried = f"it does not fit even with {' '.join(flags)} ({gb(together)}): " if flags else ""
    return tried + "use a GPU with more memory, or --device cpu"


def _smaller_shapes(r: Request, fits) -> list[tuple[str, Request]]:
    """The largest smaller batch and the largest smaller size (multiples of 64, at least 256) that fit, else the
    smallest tried."""
    shapes = []
    if r.batch > 1:
        b = next((b for b in range(r.batch - 1, 0, -1) if fits(replace(r, batch=b))), 1)
        shapes.append((f"--batch-size {b}", replace(r, batch=b)))
    sizes = [(max(256, int(r.width * s) // 64 * 64), max(256, int(r.height * s) // 64 * 64)) for s in (0.875, 0.75, 0.625, 0.5)]
    sizes = [wh for wh in dict.fromkeys(sizes) if wh != (r.width, r.height)]
    if sizes:
        w, h = next((wh for wh in sizes if fits(replace(r, width=wh[0], height=wh[1]))), sizes[-1])
        shapes.append((f"--width {w} --height {h}", replace(r, width=w, height=h)))
    return shapes


__all__ = ["Estimate", "Request", "device_memory", "dtype_name", "encoder_parameters", "estimate", "fit_hint", "preflight",
           "transformer_parameters", "vae_parameters"]
