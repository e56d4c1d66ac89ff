"""Schedule, samplers and denoisers against SPEC.md §5 and hand computation."""

import dataclasses
import math

import pytest
import torch

from fastsd35.pipeline.sampling import (
    SAMPLERS,
    CFGDenoiser,
    SLGConfig,
    get_sigmas,
    img2img_sigmas,
    initial_latent,
    make_noise,
    model_sigma,
    model_timestep,
    sample,
)

from helpers.diffusers_ref import require_diffusers


def test_schedule_values_from_spec():
    assert get_sigmas(3.0, 4).tolist() == pytest.approx([1.0, 0.857692, 0.602151, 0.008929, 0.0], abs=1e-6)
    s40 = get_sigmas(3.0, 40)
    assert s40[:5].tolist() == pytest.approx([1.0, 0.991331, 0.982356, 0.973058, 0.963421], abs=1e-6)
    assert s40[-4:].tolist() == pytest.approx([0.146509, 0.081046, 0.008929, 0.0], abs=1e-6)
    s50 = get_sigmas(3.0, 50)
    assert s50[:3].tolist() == pytest.approx([1.0, 0.993124, 0.986057], abs=1e-6)
    assert s50[-4:].tolist() == pytest.approx([0.120533, 0.0669, 0.008929, 0.0], abs=1e-6)
    s60 = get_sigmas(3.0, 60)
    assert s60[:2].tolist() == pytest.approx([1.0, 0.994303], abs=1e-6)
    assert s60[-3:].tolist() == pytest.approx([0.057394, 0.008929, 0.0], abs=1e-6)
    s1 = get_sigmas(1.0, 50)
    assert s1[:2].tolist() == pytest.approx([1.0, 0.979612], abs=1e-6)
    assert s1[-3:].tolist() == pytest.approx([0.021388, 0.001, 0.0], abs=1e-6)
    assert s1.dtype == torch.float32 and len(s1) == 51


@pytest.mark.parametrize("shift, steps", [(3.0, 4), (3.0, 28), (3.0, 50), (1.0, 50)])
def test_schedule_matches_diffusers(shift, steps):
    scheduler = require_diffusers().FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(get_sigmas(shift, steps), scheduler.sigmas.float(), atol=2e-6, rtol=0)


def test_img2img_slice_uses_reference_rounding():
    assert len(img2img_sigmas(get_sigmas(3.0, 40), 0.8)) - 1 == 33  # int(40 * 0.19999...) = 7
    assert len(img2img_sigmas(get_sigmas(3.0, 50), 0.8)) - 1 == 41  # int(9.99...) = 9
    assert len(img2img_sigmas(get_sigmas(3.0, 50), 1.0)) - 1 == 50
    # where steps * (1 - denoise) is a whole number the cut is exactly there
    sigmas = get_sigmas(3.0, 4)
    torch.testing.assert_close(img2img_sigmas(sigmas, 0.5), sigmas[2:], atol=0, rtol=0)
    torch.testing.assert_close(img2img_sigmas(sigmas, 0.75), sigmas[1:], atol=0, rtol=0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="denoise must be in"):
            img2img_sigmas(get_sigmas(3.0, 10), bad)


def test_noise_is_per_image_seeded():
    noise = make_noise(23, 3, (16, 4, 6))
    assert noise.dtype == torch.float32 and noise.shape == (3, 16, 4, 6)
    torch.testing.assert_close(noise[0], torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(23)), atol=0, rtol=0)
    torch.testing.assert_close(noise[2], make_noise(25, 1, (16, 4, 6))[0], atol=0, rtol=0)
    assert not torch.equal(noise[0], noise[1])


def test_torch_promotion_facts_the_reference_relies_on():
    """A 0-d float32 tensor times an fp16 tensor is an fp16 tensor: the scalar is rounded to fp16 and the product
    rounded to fp16 (the reference's start latent arithmetic, SPEC.md §5.4)."""
    x = torch.randn(1000).half()
    s = torch.tensor(0.8576923)
    product = s * x
    assert product.dtype == torch.float16
    torch.testing.assert_close(product, (s.half().float() * x.float()).half(), atol=0, rtol=0)
    assert not torch.equal(product.float(), s * x.float())  # not computed in float32


def test_initial_latent_is_the_reference_fp16_start():
    noise = make_noise(0, 1, (16, 16))
    latent = torch.randn(1, 16, 16)
    x = initial_latent(torch.tensor(1.0), noise)
    assert x.dtype == torch.float16
    torch.testing.assert_close(x, noise.half(), atol=0, rtol=0)
    s = torch.tensor(0.6)
    x = initial_latent(s, noise, latent)
    assert x.dtype == torch.float16
    # Each product and the sum rounded to fp16, as the reference's noise_scaling on fp16 noise and latent.
    s16 = s.half().float()
    a = (s16 * noise.half().float()).half().float()
    b = ((1 - s).half().float() * latent.half().float()).half().float()
    torch.testing.assert_close(x, (a + b).half(), atol=0, rtol=0)
    assert not torch.equal(x, (s * noise + (1 - s) * latent).half())  # the fp32-then-round formula differs


def float_denoiser(x, sigma, step):  # a model's denoised output is float32, whatever x's dtype
    return ideal_denoiser(x.float(), sigma, step)


def reference_first_steps(x16, sigmas, den):
    """The reference loop's dtypes written out: x the fp16 start until the first update."""
    old, x = None, x16
    t = -sigmas.log()  # k-diffusion's t; sigma_fn(t) = exp(-t), which is not exactly sigma
    for i in range(len(sigmas) - 1):
        d = den(x.float(), sigmas[i], i)
        h = t[i + 1] - t[i]
        ratio = (-t[i + 1]).exp() / (-t[i]).exp()
        if old is None or sigmas[i + 1] == 0:
            if x.dtype == torch.float16:  # fp16 product, then the float32 term
                x = (ratio.half().float() * x.float()).half().float() - torch.expm1(-h) * d
            else:
                x = ratio * x - torch.expm1(-h) * d
        else:
            r = (t[i] - t[i - 1]) / h
            x = ratio * x - torch.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    return x


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_dpmpp_2m_and_img2img_follow_the_reference_start(denoise):
    sigmas = img2img_sigmas(get_sigmas(3.0, 5), denoise)
    noise, latent = make_noise(3, 1, (16, 8, 8)), torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    x16 = initial_latent(sigmas[0], noise, latent if denoise < 1 else None)
    ours = sample("dpmpp_2m", float_denoiser, x16, sigmas, progress=False)
    expected = reference_first_steps(x16, sigmas, float_denoiser)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
    # Starting from the float32 copy (the old behaviour) differs by about one fp16 step.
    assert not torch.equal(sample("dpmpp_2m", float_denoiser, x16.float(), sigmas, progress=False), ours)


def test_euler_is_unaffected_by_the_fp16_start():
    sigmas = get_sigmas(3.0, 4)
    x16 = initial_latent(sigmas[0], make_noise(1, 1, (16, 8, 8)))
    torch.testing.assert_close(sample("euler", float_denoiser, x16, sigmas, progress=False),
                               sample("euler", float_denoiser, x16.float(), sigmas, progress=False), atol=0, rtol=0)


# -- samplers on a problem with a known exact flow --------------------------------------------------------------
# Data x0 ~ N(mu, s^2) per element, x_sigma = (1 - sigma) x0 + sigma eps. The ideal denoiser is
# E[x0 | x_sigma] = mu + (1-sigma) s^2 / v(sigma) * (x - (1-sigma) mu), v = (1-sigma)^2 s^2 + sigma^2, and the
# probability-flow ODE keeps z = (x - (1-sigma) mu) / sqrt(v) constant: from x = eps at sigma 1, x(0) = mu + s eps.

MU, S = 0.7, 0.4


def ideal_denoiser(x, sigma, step):
    v = (1 - sigma) ** 2 * S**2 + sigma**2
    return MU + (1 - sigma) * S**2 / v * (x - (1 - sigma) * MU)


def hand_euler(x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - ideal_denoiser(x, sigmas[i], i)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def hand_dpmpp_2m(x, sigmas):
    old = None
    for i in range(len(sigmas) - 1):
        den = ideal_denoiser(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            if old is None:
                x = sigmas[i + 1] / sigmas[i] * x - math.expm1(-h) * den
            else:
                r = (math.log(sigmas[i - 1]) - math.log(sigmas[i])) / h
                x = sigmas[i + 1] / sigmas[i] * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old)
        old = den
    return x


@pytest.mark.parametrize("name, hand", [("euler", hand_euler), ("dpmpp_2m", hand_dpmpp_2m)])
def test_samplers_match_hand_computation(name, hand):
    sigmas = get_sigmas(3.0, 6)
    eps = torch.tensor([-1.3, 0.2, 0.9], dtype=torch.float64)
    out = sample(name, ideal_denoiser, eps.clone(), sigmas.double(), progress=False)
    expected = [hand(float(e), sigmas.double().tolist()) for e in eps]
    assert out.tolist() == pytest.approx(expected, abs=1e-12)


def test_samplers_converge_to_the_exact_flow_solution_at_their_order():
    eps = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = MU + S * eps
    errors = {}
    for name in ("euler", "dpmpp_2m"):
        for steps in (200, 1000):
            out = sample(name, ideal_denoiser, eps.clone(), get_sigmas(3.0, steps).double(), progress=False)
            errors[name, steps] = (out - exact).abs().max().item()
    # 5x more steps: first order gains ~5x, second order ~25x.
    assert 4 < errors["euler", 200] / errors["euler", 1000] < 6
    assert errors["dpmpp_2m", 200] / errors["dpmpp_2m", 1000] > 15
    assert errors["dpmpp_2m", 1000] < 1e-4


@pytest.mark.parametrize("steps", [0, -1])
def test_schedule_needs_a_step(steps):
    with pytest.raises(ValueError, match=f"steps must be >= 1, got {steps}"):
        get_sigmas(3.0, steps)


def test_sampler_progress_bar_is_on_by_default(capsys):
    """`sample` draws its progress bar (stderr) unless told not to."""
    sample("euler", ideal_denoiser, torch.zeros(1), get_sigmas(3.0, 2))
    assert "sampling" in capsys.readouterr().err
    sample("euler", ideal_denoiser, torch.zeros(1), get_sigmas(3.0, 2), progress=False)
    assert capsys.readouterr().err == ""


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample("heun", ideal_denoiser, torch.zeros(1), get_sigmas(3.0, 2))


# -- denoisers --------------------------------------------------------------------------------------------------


def velocity(x, y, context, skip_layers=()):
    return 0.1 * x + context.mean(dim=(1, 2))[:, None, None, None] + y.sum(-1)[:, None, None, None] + len(skip_layers)


class RecordingModel:
    """v = velocity(...); records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, y, context, *, skip_layers=(), control=None):
        self.calls.append(dict(batch=x.shape[0], sigma=sigma.clone(), y=y.clone(), skip=tuple(skip_layers), control=control))
        return velocity(x, y, context, skip_layers)


def conds(batch=2):
    cond = (torch.full((batch, 3, 4), 1.0), torch.full((batch, 5), 0.5))
    uncond = (torch.full((batch, 3, 4), -1.0), torch.full((batch, 5), 0.0))
    return cond, uncond


@pytest.mark.parametrize("cfg", [4.5, 1.5, 1.001])  # any cfg above 1 guides, however little
def test_cfg_is_one_batched_pass_cond_first(cfg):
    model = RecordingModel()
    cond, uncond = conds()
    den = CFGDenoiser(model, cond, uncond, cfg=cfg, steps=10)
    x = torch.randn(2, 16, 2, 2)
    sigma = torch.tensor(0.857692)
    out = den(x, sigma, 0)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 4
    assert model.calls[0]["y"][:2].eq(0.5).all() and model.calls[0]["y"][2:].eq(0.0).all()
    s = model_sigma(sigma)
    pos = x - velocity(x, cond[1], cond[0]) * s
    neg = x - velocity(x, uncond[1], uncond[0]) * s
    torch.testing.assert_close(out, neg + (pos - neg) * cfg)


@pytest.mark.parametrize("cfg", [4.5, 1.5, 1.001, 1.0])
def test_split_cfg_is_two_passes_cond_then_uncond(cfg):
    """split=True (a CFG-parallel pair's numerics): the same guidance from a cond pass and an uncond pass of the
    batch each; at cfg 1 only the cond pass."""
    model = RecordingModel()
    cond, uncond = conds()
    x, sigma = torch.randn(2, 16, 2, 2), torch.tensor(0.857692)
    out = CFGDenoiser(model, cond, uncond, cfg=cfg, steps=10, split=True)(x, sigma, 0)
    s = model_sigma(sigma)
    pos = x - velocity(x, cond[1], cond[0]) * s
    if cfg > 1:
        assert [c["batch"] for c in model.calls] == [2, 2]
        assert model.calls[0]["y"].eq(0.5).all() and model.calls[1]["y"].eq(0.0).all()
        neg = x - velocity(x, uncond[1], uncond[0]) * s
        torch.testing.assert_close(out, neg + (pos - neg) * cfg)
    else:
        assert [c["batch"] for c in model.calls] == [2]
        torch.testing.assert_close(out, pos)


def test_slg_defaults_are_the_reference_medium_config():
    """SPEC.md §2.2 CONFIGS table, sd3.5_medium's skip_layer_config: scale 2.5, start 0.01, end 0.20, layers 7-9, cfg 4.0."""
    assert dataclasses.astuple(SLGConfig()) == (2.5, 0.01, 0.20, (7, 8, 9), 4.0)


def test_cfg_at_most_one_runs_only_the_cond_pass():
    model = RecordingModel()
    cond, uncond = conds()
    den = CFGDenoiser(model, cond, uncond, cfg=1.0, steps=4)
    x = torch.randn(2, 16, 2, 2)
    out = den(x, torch.tensor(0.5), 0)
    assert [c["batch"] for c in model.calls] == [2]
    torch.testing.assert_close(out, x - velocity(x, cond[1], cond[0]) * 0.5)


def test_model_sees_fp16_rounded_sigma_and_timestep():
    model = RecordingModel()
    cond, uncond = conds(1)
    CFGDenoiser(model, cond, uncond, cfg=1.0, steps=4)(torch.zeros(1, 16, 2, 2), torch.tensor(0.857692), 0)
    assert model.calls[0]["sigma"].tolist() == [0.85791015625]  # fp16(0.857692)
    # The transformer's timestep is fp16(0.85791015625 * 1000) = 858.0 (fp16 steps by 0.5 there), not 857.91.
    assert model_timestep(model.calls[0]["sigma"]).tolist() == [858.0]
    assert model_timestep(torch.tensor([0.008929]).half().float()).tolist() == [8.9296875]


# 50 and 100 steps put a window edge on a whole step (0.2 * 50 = 10, 0.01 * 100 = 1, 0.2 * 100 = 20): the reference's
# comparisons are strict, so that step is outside the window.
@pytest.mark.parametrize("steps, active", [(50, list(range(1, 10))), (60, list(range(1, 12))), (10, [1]),
                                           (100, list(range(2, 20)))])
def test_slg_runs_on_exactly_the_reference_steps(steps, active):
    model = RecordingModel()
    cond, uncond = conds()
    slg = SLGConfig()
    den = CFGDenoiser(model, cond, uncond, cfg=4.0, steps=steps, slg=slg)
    x = torch.randn(2, 16, 2, 2)
    for step in range(steps):
        den(x, torch.tensor(0.5), step)
    skipped = [i for i, c in enumerate(model.calls) if c["skip"]]
    # calls alternate: CFG pass, then the SLG pass on active steps
    steps_with_slg = []
    step = -1
    for c in model.calls:
        if not c["skip"]:
            step += 1
        else:
            steps_with_slg.append(step)
            assert c["skip"] == (7, 8, 9) and c["batch"] == 2 and c["control"] is None
            assert c["y"].eq(0.5).all()  # cond only
    assert steps_with_slg == active and len(skipped) == len(active)


def test_slg_formula():
    model = RecordingModel()
    cond, uncond = conds()
    slg = SLGConfig(scale=2.5, start=0.0, end=1.0, layers=(1,))
    x = torch.randn(2, 16, 2, 2)
    sigma = torch.tensor(0.5)
    out = CFGDenoiser(model, cond, uncond, cfg=4.0, steps=10, slg=slg)(x, sigma, 3)
    plain = CFGDenoiser(model, cond, uncond, cfg=4.0, steps=10)(x, sigma, 3)
    pos = x - velocity(x, cond[1], cond[0]) * 0.5
    skipped = x - velocity(x, cond[1], cond[0], skip_layers=(1,)) * 0.5
    torch.testing.assert_close(out, plain + (pos - skipped) * 2.5)


def test_control_goes_to_the_guidance_passes_only():
    model = RecordingModel()
    cond, uncond = conds()
    control = (torch.ones(1, 16, 2, 2), torch.tensor(0.7))
    slg = SLGConfig(start=0.0, end=1.0, layers=(1,))
    CFGDenoiser(model, cond, uncond, cfg=4.0, steps=10, slg=slg, control=control)(torch.zeros(2, 16, 2, 2), torch.tensor(0.5), 3)
    CFGDenoiser(model, cond, uncond, cfg=1.0, steps=10, control=control)(torch.zeros(2, 16, 2, 2), torch.tensor(0.5), 3)
    assert [(c["batch"], c["skip"], c["control"] is control) for c in model.calls] == [(4, (), True), (2, (1,), False), (2, (), True)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interrupt_leaves_the_progress_bar_closed(sampler, capsys):
    """The bar is closed (its line ended) before an interrupt leaves the sampler, so the one-line message that
    follows starts on a line of its own, whenever the signal comes."""
    def denoiser(x, sigma, i):
        if i == 2:
            raise KeyboardInterrupt
        return x * 0.5

    with pytest.raises(KeyboardInterrupt):
        sample(sampler, denoiser, torch.ones(1, 4), get_sigmas(3.0, 6), progress=True)
    err = capsys.readouterr().err  # the traceback (and the sampler's frame) is still alive here
    assert "sampling:" in err and err.endswith("\n"), repr(err)
