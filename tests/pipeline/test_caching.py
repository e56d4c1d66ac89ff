"""The step cache (fastsd35.pipeline.caching): threshold 0 is bit for bit no cache with everything else (CFG, SLG,
img2img, ControlNet, both samplers, batches, FP8, the Triton ops, CUDA graphs' staged passes); the decisions follow
the rules (warm-up, last step, max skip) and are replayed exactly from a schedule; the reused residual is the last
computed one or its first-order extrapolation; the command line records the cache and --from-png reproduces it."""

import json

import numpy as np
import pytest
import torch
from helpers.cli import FAST, fails, run
from helpers.pipelines import cpu_user  # noqa: F401  (autouse: the reference ops, no network)
from PIL import Image

from fastsd35.app.outputs import METADATA_KEY
from fastsd35.errors import FastSD35Error
from fastsd35.models.mmditx import MMDiTX, MMDiTXConfig
from fastsd35.pipeline.caching import CacheConfig, StepCache
from fastsd35.pipeline.graphs import CUDAGraphPasses
from fastsd35.pipeline.runner import Pipeline, TransformerPass
from fastsd35.pipeline.sampling import CFGDenoiser, SLGConfig, get_sigmas, sample
from fastsd35.tiny.family import randomize_, tiny_components, write_tiny_controlnet

SMALL = dict(width=64, height=48, progress=False, seed=5)
DEEP = MMDiTXConfig(depth=4, pos_embed_max_size=64, context_dim=64, adm_in_channels=64, qk_norm="rms",
                    x_block_self_attn_layers=(1,))  # fmt: skip


@pytest.fixture(scope="module")
def deep():
    """A random depth-4 model (one MMDiT-X block) behind the tiny text encoders and VAE: three blocks to cache."""
    _, vae, text = tiny_components(0)
    return Pipeline(randomize_(MMDiTX(DEEP), 3).eval().requires_grad_(False), vae, text, "tiny_random")


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.from_preset("tiny_random", device="cpu")


def pixels(gen):
    return np.stack([np.asarray(im) for im in gen.images])


def expected_schedule(n, warmup, max_skip):
    """The decisions when every distance is under the threshold."""
    out, in_a_row = [], 0
    for step in range(n):
        compute = step < warmup or step == n - 1 or in_a_row >= max_skip
        out.append("C" if compute else "R")
        in_a_row = 0 if compute else in_a_row + 1
    return "".join(out)


@pytest.mark.parametrize("case", ["dpmpp_2m", "euler", "batch", "slg", "img2img", "cfg1", "split"])
def test_threshold_zero_is_no_cache_bit_for_bit(deep, case):
    kw = dict(SMALL, steps=6)
    if case in ("dpmpp_2m", "euler"):
        kw["sampler"] = case
    elif case == "batch":
        kw["batch_size"] = 2
    elif case == "slg":
        kw["slg"] = SLGConfig(layers=(2,), start=0.0, end=0.6)
    elif case == "img2img":
        kw.update(init_image=Image.new("RGB", (64, 48), "red"), denoise=0.6)
    elif case == "cfg1":
        kw["cfg"] = 1.0
    else:
        from functools import partial

        kw["denoiser_cls"] = partial(CFGDenoiser, split=True)
    plain = deep.generate("a red cube", **kw)
    cached = deep.generate("a red cube", cache=CacheConfig(threshold=0.0), **kw)
    assert np.array_equal(pixels(plain), pixels(cached))
    steps = 6 if case != "img2img" else 4  # int(6 * (1 - 0.6)) = 2 steps cut
    assert cached.cache["schedule"] == "C" * steps and plain.cache is None
    guidance = 2 if case == "split" else 1
    slg = sum(SLGConfig(layers=(2,), start=0.0, end=0.6).active(i, 6) for i in range(6)) if case == "slg" else 0
    assert cached.cache["passes"] == cached.cache["computed"] == steps * guidance + slg


def test_threshold_zero_with_a_controlnet_and_in_fp8(tiny, tmp_path):
    cn = write_tiny_controlnet(tmp_path / "cn.safetensors")
    for pipe in (Pipeline.from_preset("tiny_random", device="cpu", controlnet=cn),
                 Pipeline.from_preset("tiny_random", device="cpu", dtype="fp8")):
        control = Image.new("RGB", (64, 48), "white") if pipe.controlnet is not None else None
        kw = dict(SMALL, steps=4, control_image=control)
        plain = pipe.generate("a", **kw)
        assert np.array_equal(pixels(plain), pixels(pipe.generate("a", cache=CacheConfig(threshold=0.0), **kw)))
        reused = pipe.generate("a", cache=CacheConfig(threshold=1e9, warmup=1), **kw)
        assert reused.cache["schedule"] == "CRRC" and not np.array_equal(pixels(plain), pixels(reused))


def test_every_skip_allowed_still_computes_warmup_max_skip_and_the_last_step(deep):
    for warmup, max_skip, steps in ((3, 2, 12), (0, 4, 9), (5, 1, 6), (2, 0, 5)):
        gen = deep.generate("a", cache=CacheConfig(threshold=1e9, warmup=warmup, max_skip=max_skip), steps=steps,
                            **SMALL)  # fmt: skip
        assert gen.cache["schedule"] == expected_schedule(steps, max(warmup, 1), max_skip), (warmup, max_skip)
        assert gen.cache["computed"] == gen.cache["schedule"].count("C")


def test_decisions_follow_the_distance_and_replay_exactly(deep, monkeypatch):
    kw = dict(SMALL, steps=10)
    decided = deep.generate("a red cube", cache=CacheConfig(threshold=1e9, warmup=2, max_skip=2), **kw)
    schedule = decided.cache["schedule"]
    assert schedule == expected_schedule(10, 2, 2)
    for threshold in (0.0, 1e9):  # a schedule is replayed whatever the threshold says
        replay = deep.generate("a red cube", cache=CacheConfig(threshold=threshold, schedule=schedule), **kw)
        assert replay.cache["schedule"] == schedule and np.array_equal(pixels(replay), pixels(decided))

    # The distance really decides: with it forced just under / over the threshold, the steps reuse / compute.
    for distance, expected in ((0.29, expected_schedule(10, 2, 2)), (0.31, "C" * 10)):
        monkeypatch.setattr(StepCache, "partial_distance", staticmethod(lambda r, ref: torch.tensor([distance, 1.0])))
        gen = deep.generate("a red cube", cache=CacheConfig(threshold=0.3, warmup=2, max_skip=2), **kw)
        assert gen.cache["schedule"] == expected


def test_the_distance_is_relative_l1_of_the_head_residual_against_the_last_computed_step():
    cache = StepCache(CacheConfig(threshold=0.5, warmup=1, max_skip=5), calls=6)
    ref = torch.tensor([[1.0, -2.0, 3.0]])
    assert cache.decide(0, [ref]) is True  # warm-up: the reference
    assert cache.decide(1, [ref * 1.4]) is False  # |0.4 * r| / |r| = 0.4 < 0.5: reused
    assert cache.schedule == "CR" and torch.equal(cache.reference[0], ref)  # a reused step keeps the reference
    assert cache.decide(2, [ref * 1.6]) is True and cache.schedule == "CRC"  # 0.6: computed, new reference
    assert torch.equal(cache.reference[0], ref * 1.6)
    halves = [torch.stack([ref[0], ref[0]]), torch.stack([2 * ref[0], 2 * ref[0]])]  # two passes: one sum
    partial = [StepCache.partial_distance(h, r).tolist() for h, r in zip(halves, halves)]
    assert partial == [[0.0, 12.0], [0.0, 24.0]]


def test_the_reused_residual_is_the_last_computed_one_or_its_extrapolation():
    plain, extra = (StepCache(CacheConfig(extrapolate=e), calls=10) for e in (False, True))
    for cache in (plain, extra):
        cache.keep(0, 2, torch.tensor([1.0]))
        assert torch.equal(cache.tail(0, 3), torch.tensor([1.0]))  # one computed step: nothing to extrapolate from
        cache.keep(0, 4, torch.tensor([2.0]))
        cache.keep(0, 6, torch.tensor([5.0]))  # only the last two are kept
    assert torch.equal(plain.tail(0, 9), torch.tensor([5.0]))
    assert torch.equal(extra.tail(0, 9), torch.tensor([5.0 + (5.0 - 2.0) * 3 / 2]))


def test_graphs_stage_the_head_tail_and_reuse_and_equal_eager(deep):
    """The staged passes through CUDAGraphPasses (with a capturer that runs eagerly on the CPU) give the eager
    results bit for bit, capturing each stage once per shape."""
    from test_graphs import EagerCapturer

    capturer = EagerCapturer()
    graphed = CUDAGraphPasses(TransformerPass(deep.transformer), "cpu", capturer=capturer)
    text = deep.text_encoders.encode(["a", ""])
    cond, uncond = (text[0][:1], text[1][:1]), (text[0][1:], text[1][1:])
    sigmas, x = get_sigmas(3.0, 8), torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for model in (deep.model_pass, graphed):
        cache = StepCache(CacheConfig(threshold=1e9, warmup=2, max_skip=2), calls=8)
        denoiser = CFGDenoiser(model, cond, uncond, 4.5, 8, cache=cache)
        results.append((sample("euler", denoiser, x.half(), sigmas, progress=False), cache.schedule))
    assert results[0][1] == results[1][1] == "CCRRCRRC"
    assert torch.equal(results[0][0], results[1][0])
    assert capturer.captures == 3  # head, tail, reuse: one graph each for this shape


def test_fast_mmditx_threshold_zero_is_no_cache(monkeypatch):
    """The Triton ops (in the interpreter here) through the staged passes: the same bits as one pass."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastsd35 import kernels

    if kernels.backend("cpu") != "triton-interpreter":
        pytest.skip("the Triton interpreter was not chosen when fastsd35.kernels was imported")
    pipe = Pipeline.from_preset("tiny_random", device="cpu")
    kw = dict(SMALL, steps=3, width=32, height=32)
    assert np.array_equal(pixels(pipe.generate("a", **kw)), pixels(pipe.generate("a", cache=CacheConfig(threshold=0.0), **kw)))


@pytest.mark.parametrize("config, message", [
    (CacheConfig(threshold=-1.0), "cache threshold must be a finite number >= 0"),
    (CacheConfig(threshold=float("nan")), "cache threshold must be a finite number"),
    (CacheConfig(blocks=0), "cache blocks must be an integer in [1, 127]"),
    (CacheConfig(blocks=4), "cache blocks 4: the transformer has 4 blocks"),
    (CacheConfig(warmup=-1), "cache warmup must be an integer"),
    (CacheConfig(max_skip=1.5), "cache max skip must be an integer"),
    (CacheConfig(extrapolate=1), "cache extrapolate must be true or false"),
    (CacheConfig(schedule="CCX"), "a cache schedule is a string of C (computed) and R (reused) ending in C"),
    (CacheConfig(schedule="CCR"), "ending in C"),
    (CacheConfig(schedule="CCC"), "the cache schedule has 3 steps but this generation runs 4"),
    ("on", "cache must be None, True, False or a CacheConfig"),
])  # fmt: skip
def test_bad_cache_settings_are_one_line(deep, config, message):
    with pytest.raises(FastSD35Error) as info:
        deep.generate("a", cache=config, steps=4, **SMALL)
    assert message in str(info.value)


# -- the command line ------------------------------------------------------------------------------------------


def test_cli_records_the_cache_and_from_png_reproduces_it(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--preset", "tiny_random", "--prompt", "a red cube", "--steps", 8, "--width", 64, "--height", 48]
    assert run(*args, "--cache", "on", "--cache-threshold", "1e9", "--cache-warmup", 2, "--cache-max-skip", 2,
               "--out", out) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "; step cache: 4 of 8 transformer passes computed, deciding " in last and last.endswith(" s)"), last
    [png] = out.glob("*.png")
    with Image.open(png) as image:
        record, first = json.loads(image.info[METADATA_KEY]), np.asarray(image)
    assert record["cache"] == {"threshold": 1e9, "warmup": 2, "max_skip": 2, "blocks": 1, "extrapolate": False,
                               "schedule": "CCRRCRRC", "passes": 8, "computed": 4}  # fmt: skip
    assert run("--from-png", png, "--out", out) == 0
    with Image.open(out / f"{png.stem}-2.png") as again:
        assert np.array_equal(np.asarray(again), first)
        assert json.loads(again.info[METADATA_KEY])["cache"]["schedule"] == "CCRRCRRC"
    assert run(*args[:-6], "--out", tmp_path / "plain") == 0  # no --cache: the record says so
    [plain] = (tmp_path / "plain").glob("*.png")
    with Image.open(plain) as image:
        assert json.loads(image.info[METADATA_KEY])["cache"] is None

    # Changing the steps (or any cache option) decides anew instead of replaying the record's schedule.
    assert run("--from-png", png, "--steps", 6, "--out", tmp_path / "six") == 0
    [six] = (tmp_path / "six").glob("*.png")
    with Image.open(six) as image:
        assert json.loads(image.info[METADATA_KEY])["cache"]["schedule"] == "CCRRCC"


@pytest.mark.parametrize("extra, message", [
    (["--cache-threshold", "0.1"], "--cache-threshold needs --cache on"),
    (["--cache-warmup", "2", "--cache-blocks", "1"], "--cache-warmup, --cache-blocks need --cache on"),
    (["--cache", "on", "--cache-blocks", "2"], "--cache-blocks 2: the transformer has 2 blocks"),
    (["--cache", "on", "--cache-threshold", "inf"], "--cache-threshold must be a finite number >= 0"),
    (["--cache", "on", "--cache-max-skip", "-1"], "--cache-max-skip must be an integer in [0, 1000]"),
    (["--cache", "maybe"], "argument --cache: invalid choice"),
])  # fmt: skip
def test_cli_cache_options_are_checked(tmp_path, capsys, extra, message):
    if extra[:2] == ["--cache", "maybe"]:
        with pytest.raises(SystemExit):
            run("--preset", "tiny_random", "--prompt", "a", *extra)
        assert message in capsys.readouterr().err
        return
    fails(capsys, message, "--preset", "tiny_random", "--prompt", "a", *FAST, *extra, "--out", tmp_path / "o",
          out=tmp_path)  # fmt: skip


def test_a_record_with_a_schedule_for_other_steps_is_refused(tmp_path, capsys):
    from fastsd35.app.outputs import png_bytes

    record = {"prompt": "a", "preset": "tiny_random", "steps": 4, "width": 64, "height": 48, "seed": 1, "cfg": 4.5,
              "sampler": "euler", "shift": 3.0,
              "cache": {"threshold": 0.1, "warmup": 1, "max_skip": 2, "blocks": 1, "extrapolate": False,
                        "schedule": "CRRRRC"}}  # fmt: skip
    png = tmp_path / "r.png"
    png.write_bytes(png_bytes(Image.new("RGB", (8, 8)), record))
    fails(capsys, "the cache schedule has 6 steps but this generation runs 4", "--from-png", png, "--out",
          tmp_path / "o", out=tmp_path)  # fmt: skip


def test_defaults_are_readme_s_and_a_config_refuses_what_cannot_be_cached():
    """README "Step caching": threshold 0.12, warm-up 4, max-skip 3, one block first, no extrapolation; a transformer
    of one block has nothing left to cache; a replayed schedule shorter than the generation is refused at its end."""
    assert CacheConfig() == CacheConfig(threshold=0.12, warmup=4, max_skip=3, blocks=1, extrapolate=False, schedule=None)
    with pytest.raises(FastSD35Error, match="^step caching needs a transformer of 2 blocks or more; this one has 1$"):
        CacheConfig().checked(depth=1)
    assert CacheConfig(blocks=1).checked(depth=2).blocks == 1
    cache = StepCache(CacheConfig(schedule="CRC"), calls=4)
    assert [cache.forced(step) for step in range(3)] == [True, False, True]
    with pytest.raises(FastSD35Error, match="^the cache schedule has 3 steps; this generation runs more$"):
        cache.forced(3)


def test_nothing_decided_costs_no_deciding_time(deep):
    """Threshold 0 never measures a distance: its deciding time is exactly 0, and the counts start from 0."""
    gen = deep.generate("a", cache=CacheConfig(threshold=0.0), steps=3, **SMALL)
    assert gen.cache["decide_s"] == 0.0 and gen.cache["passes"] == gen.cache["computed"] == 3
    cache = StepCache(CacheConfig(), calls=5)
    assert (cache.passes, cache.computed, cache.decide_s, cache.reused_in_a_row) == (0, 0, 0.0, 0)
