"""Flow-matching sampling as the reference does it (SPEC.md §5): the shifted sigma schedule, euler and dpmpp_2m,
the CFG and skip-layer-guidance denoisers, noise and the img2img start.

The sampler state is float32 after the first update. The reference's precision details that change the trajectory
are kept, since they cost nothing (SPEC.md §5.4): the initial latent is an fp16 tensor, as the reference's latent
is, until the first sampler update (so img2img's start and dpmpp_2m's first `ratio * x` are fp16 arithmetic); the
sigma the model pass gets, and the one in `x - v * sigma`, is fp16-rounded; and the transformer's timestep is that
sigma times 1000 computed in fp16 (`model_timestep`), while a ControlNet gets the product in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

SAMPLERS = ("euler", "dpmpp_2m")


# -- schedule -----------------------------------------------------------------------------------------------------


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma(t) = shift*t / (1 + (shift-1)*t) for t in [0, 1] (identity for shift 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas(shift: float, steps: int) -> torch.Tensor:
    """steps+1 float32 sigmas: `steps` values linear in timestep from sigma_max*1000 to sigma_min*1000 (each
    shifted), then 0. sigma_min = sigma(1/1000) is shifted once more on the way, as in the reference and diffusers:
    shift 3, 4 steps gives 1.0, 0.857692, 0.602151, 0.008929, 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = shift_sigma(torch.arange(1, 1001) / 1000.0, shift)  # float32, as the reference's ModelSampling table
    timesteps = torch.linspace(float(table[-1] * 1000), float(table[0] * 1000), steps)
    return torch.cat([shift_sigma(timesteps / 1000.0, shift), torch.zeros(1)])


def img2img_sigmas(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of the schedule an img2img run samples: sigmas[int(steps * (1 - denoise)):], with the reference's
    float rounding (denoise 0.8 runs 33 of 40 steps)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    steps = len(sigmas) - 1
    return sigmas[int(steps * (1 - denoise)) :]


def sampler_steps(settings) -> int:
    """How many steps the sampler runs for `settings` (presets.Settings): img2img's shortened schedule counts."""
    sigmas = get_sigmas(settings.shift, settings.steps)
    return len(img2img_sigmas(sigmas, settings.denoise) if settings.denoise < 1 else sigmas) - 1


def make_noise(seed: int, batch: int, shape: Sequence[int]) -> torch.Tensor:
    """(batch, *shape) float32 noise on the CPU; image i is drawn from a generator seeded with seed + i, so a seed
    gives the same noise on any device and at any batch size."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(batch)])


def initial_latent(sigma0: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
    """The fp16 start x0 = sigma0*noise + (1 - sigma0)*latent (the fp16 noise for txt2img), with the reference's
    arithmetic: noise and latent are fp16 tensors and sigma0 a 0-d float32 tensor, so each product and the sum are
    rounded to fp16 (PyTorch gives a 0-d float tensor times an fp16 tensor in fp16). The samplers keep x in fp16
    until their first update, as the reference does. Compute it on the device the sampler runs on."""
    noise = noise.to(torch.float16)
    if latent is None:
        return noise
    sigma0 = torch.as_tensor(sigma0, dtype=torch.float32, device=noise.device)
    return sigma0 * noise + (1 - sigma0) * latent.to(noise.device, torch.float16)


def model_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The sigma the reference feeds its model: rounded to fp16 (SPEC.md §5.4)."""
    return sigma.to(torch.float16).float()


def model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep from a model sigma: sigma * 1000 computed in fp16, as the reference's apply_model
    does with its fp16 sigma (at sigma ~0.86 fp16 steps by 0.5), returned as float32."""
    return (sigma.to(torch.float16) * 1000).float()


# -- denoisers ----------------------------------------------------------------------------------------------------


class VelocityModel(Protocol):
    """One transformer pass: v = model(x, sigma, y, context). `sigma` (B,) is the model sigma (fp16-rounded); the
    pass forms the timestep with `model_timestep`. `control` = (control latent, strength tensor) adds ControlNet
    residuals."""

    def __call__(self, x, sigma, y, context, *, skip_layers: Sequence[int] = (), control=None) -> torch.Tensor: ...


@dataclass(frozen=True)
class SLGConfig:
    """Skip-layer guidance: an extra cond-only pass without `layers`, on steps with start*steps < step < end*steps."""

    scale: float = 2.5
    start: float = 0.01
    end: float = 0.20
    layers: tuple[int, ...] = (7, 8, 9)
    cfg: float = 4.0  # the CFG scale to use while SLG is on (the reference's config has it and never applies it)

    def active(self, step: int, steps: int) -> bool:
        return self.scale > 0 and self.start * steps < step < self.end * steps


class CFGDenoiser:
    """denoised(x, sigma, step) with classifier-free guidance and optional skip-layer guidance.

    cond and uncond run as one batched pass [cond, uncond]; with cfg <= 1 only the cond pass runs (the reference
    also runs the uncond half and then weights it by zero at cfg 1). `split=True` runs them as two passes of the
    batch each instead: the numerics of a CFG-parallel pair (fastsd35.pipeline.distributed), whose ranks run one pass each;
    on a CPU a batch of 2B rounds a sample's GEMMs differently from a batch of B (last-bit differences). `steps` is
    the full configured step count (img2img included), against which SLG's start/end are measured; `step` counts
    denoiser calls from 0. `control` (ControlNet inputs) goes to the guidance passes, not to the skip-layer pass,
    as in the reference. `cache` (a caching.StepCache) caches the guidance passes' later blocks from step to step;
    the model is then a staged pass (runner.TransformerPass: head, tail, reuse).
    """

    def __init__(self, model: VelocityModel, cond, uncond, cfg: float, steps: int, slg: SLGConfig | None = None,
                 control=None, split: bool = False, cache=None):
        self.model, self.cfg, self.steps, self.slg, self.control, self.split = model, cfg, steps, slg, control, split
        (self.context, self.y), self.uncond = cond, uncond
        self.cache = cache
        self.batched = cfg > 1 and not split  # cond and uncond as one pass of 2B
        if self.batched:
            self.batched_context = torch.cat([cond[0], uncond[0]])
            self.batched_y = torch.cat([cond[1], uncond[1]])

    def denoise(self, x, sigma, context, y, **kw):
        x, s = x.float(), model_sigma(sigma)  # x is fp16 before the first update: exact in float32
        v = self.model(x, s.expand(x.shape[0]), y, context, **kw).float()
        return x - v * s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        skip = self.slg is not None and self.slg.active(step, self.steps)
        return self.combine(*self.passes(x, sigma, skip, step))

    def guidance(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """This process's guidance passes, in order: (copies of x, context, pooled)."""
        if self.batched:
            return [(2, self.batched_context, self.batched_y)]
        return [(1, self.context, self.y)] + ([(1, *self.uncond)] if self.cfg > 1 else [])

    def run_guidance(self, x, sigma, step: int, passes, gather=None) -> list[torch.Tensor]:
        """The denoised outputs of `passes` (see `guidance`). With a cache, one decision for all of them: their heads
        run, then either their tails or the kept tail residuals; `gather` lets the passes of other processes (a
        CFG-parallel pair) count in the decision."""
        inputs = [(torch.cat([x] * n) if n > 1 else x, context, y) for n, context, y in passes]
        if self.cache is None:
            return [self.denoise(xi, sigma, context, y, control=self.control) for xi, context, y in inputs]
        s, blocks = model_sigma(sigma), self.cache.config.blocks
        xs = [xi.float() for xi, _, _ in inputs]
        heads = [self.model.head(xi, s.expand(xi.shape[0]), y, context, blocks=blocks, control=self.control)
                 for xi, (_, context, y) in zip(xs, inputs)]  # fmt: skip
        compute = self.cache.decide(step, [h["residual"] for h in heads], gather)
        outs = []
        for i, (xi, head) in enumerate(zip(xs, heads)):
            if compute:
                v, tail = self.model.tail(head, blocks=blocks, hw=xi.shape[-2:])
                self.cache.keep(i, step, tail)
            else:
                v = self.model.reuse(head, self.cache.tail(i, step), hw=xi.shape[-2:])
            outs.append(xi - v.float() * s)
        return outs

    def passes(self, x, sigma, skip: bool, step: int = 0):
        """The denoised outputs of this step's passes: (cond, uncond or None when cfg <= 1, skip-layer or None)."""
        outs = self.run_guidance(x, sigma, step, self.guidance())
        if self.batched:
            pos, neg = outs[0].chunk(2)
        else:
            pos, neg = outs[0], (outs[1] if len(outs) > 1 else None)
        skipped = self.skip_pass(x, sigma) if skip else None
        return pos, neg, skipped

    def skip_pass(self, x, sigma):
        """The cond-only pass without the SLG layers (never cached; counted as a computed pass)."""
        if self.cache is not None:
            self.cache.count_full_pass()
        return self.denoise(x, sigma, self.context, self.y, skip_layers=self.slg.layers)

    def combine(self, pos, neg, skipped):
        """neg + (pos - neg) * cfg (pos alone when cfg <= 1), plus (pos - skipped) * scale when SLG is active."""
        out = pos if neg is None else neg + (pos - neg) * self.cfg
        if skipped is not None:
            out = out + (pos - skipped) * self.slg.scale
        return out


# -- samplers -----------------------------------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _steps(n: int, progress: bool):
    """range(n) under a progress bar that is closed however the loop ends (the `with`): an interrupt's message then
    starts on a line of its own, not on the bar's."""
    return tqdm(range(n), disable=not progress, desc="sampling")


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """x += (x - D)/sigma_i * (sigma_{i+1} - sigma_i) per step."""
    with _steps(len(sigmas) - 1, progress) as steps:
        for i in steps:
            denoised = denoiser(x, sigmas[i], i)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) on t = -log(sigma), as k-diffusion and the reference apply it to flow sigmas (no alpha
    scaling). The first step and a step to sigma 0 are first order; the last step therefore returns D. On the
    first step x is the fp16 start, so `ratio * x` is rounded to fp16 before the float32 term is subtracted, as in
    the reference."""
    old = None
    t = -sigmas.log()  # t[-1] = inf for the final sigma 0
    with _steps(len(sigmas) - 1, progress) as steps:
        for i in steps:
            denoised = denoiser(x, sigmas[i], i)
            h = t[i + 1] - t[i]
            if old is None or sigmas[i + 1] == 0:
                d = denoised
            else:
                r = (t[i] - t[i - 1]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            ratio = (-t[i + 1]).exp() / (-t[i]).exp()
            if x.dtype == torch.float16:  # the fp16 start: a 0-d tensor on x's device times it is an fp16 product
                ratio = ratio.to(x.device)
            x = ratio * x - torch.expm1(-h) * d
            old = denoised
    return x


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """Run sampler `name` from x over `sigmas`. The sigmas stay on the CPU: the step arithmetic uses them as
    scalars, so choosing a branch never waits for the GPU."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return (sample_euler if name == "euler" else sample_dpmpp_2m)(denoiser, x, sigmas.cpu(), progress)
