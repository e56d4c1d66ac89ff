"""The Pipeline end to end on the tiny model: parity with diffusers' StableDiffusion3Pipeline built from the same
components, determinism, loading from official and diffusers folders, and missing-file errors."""

import contextlib
import dataclasses
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fastsd35.pipeline.runner
import fastsd35.pipeline.sampling
from fastsd35 import CheckpointError, FastSD35Error
from fastsd35.models.vae import process_out, tensor_to_images
from fastsd35.pipeline.runner import Pipeline
from fastsd35.pipeline.sampling import SLGConfig, initial_latent, make_noise
from fastsd35.tiny.family import write_tiny_controlnet, write_tiny_model

from helpers.pipelines import SMALL, cpu_user, diffusers_pipeline, pixels  # noqa: F401  (cpu_user: autouse)


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.from_preset("tiny_random", device="cpu")


def run_both(tiny, prompts, seed):
    ours = tiny.generate(prompts, "blurry", seed=seed, sampler="euler", cfg=4.5, **SMALL)
    latents = initial_latent(torch.tensor(1.0), make_noise(seed, len(prompts), (16, 6, 8))).float()
    with torch.no_grad():
        ref = diffusers_pipeline(tiny)(
            prompts, negative_prompt=["blurry"] * len(prompts), num_inference_steps=4, guidance_scale=4.5,
            height=48, width=64, latents=latents, max_sequence_length=77, output_type="np",
        ).images  # fmt: skip
    return pixels(ours.images), (np.clip(ref, 0, 1) * 255).astype(np.int16)  # truncated like ours


def test_matches_diffusers_pipeline(tiny, monkeypatch):
    """Euler, cfg 4.5, T5 length 77 on both sides, the same initial latents. diffusers feeds the model fp32 sigmas
    and timesteps; with ours fed the same (instead of the reference's fp16-rounded ones) the images agree to one
    level in 255."""
    monkeypatch.setattr(fastsd35.pipeline.sampling, "model_sigma", lambda sigma: sigma)
    monkeypatch.setattr(fastsd35.pipeline.runner, "model_timestep", lambda sigma: sigma * 1000)
    ours, ref = run_both(tiny, ["a red cube on a table", "two cats"], seed=11)
    assert ours.std() > 10  # a real image, not a flat one
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_reference_sigma_rounding_is_a_small_visible_difference(tiny):
    ours, ref = run_both(tiny, ["two cats"], seed=11)
    diff = np.abs(ours - ref)
    assert 0 < diff.max() <= 10 and diff.mean() < 2, (diff.max(), diff.mean())


def test_same_seed_same_images_different_seed_different(tiny):
    a = pixels(tiny("a house", seed=5, batch_size=2, **SMALL))
    b = pixels(tiny("a house", seed=5, batch_size=2, **SMALL))
    c = pixels(tiny("a house", seed=6, **SMALL))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # image i uses seed + i
    assert np.abs(c[0] - a[1]).max() <= 1  # seed 6 alone is image 1 of the seed-5 batch (same noise)
    assert np.abs(c[0] - a[0]).max() > 10


def test_settings_and_negative_prompt_change_the_image(tiny):
    base = pixels(tiny("a house", **SMALL))
    assert np.abs(pixels(tiny("a house", "ugly", **SMALL)) - base).max() > 10
    assert np.abs(pixels(tiny("a house", sampler="euler", **SMALL)) - base).max() > 10
    assert np.abs(pixels(tiny("a house", cfg=1.0, **SMALL)) - base).max() > 10


def test_img2img_and_slg(tiny):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    slg = SLGConfig(scale=2.5, start=0.0, end=0.5, layers=(0,))
    gen = tiny.generate("a house", init_image=init, denoise=0.5, slg=slg, **SMALL)
    assert gen.images[0].size == (64, 48) and gen.settings.denoise == 0.5 and gen.settings.slg == slg
    plain = tiny.generate("a house", init_image=init, denoise=0.5, **SMALL)
    assert np.abs(pixels(gen.images) - pixels(plain.images)).max() > 10
    with pytest.raises(FastSD35Error, match=r"skip-layer guidance layers \(7, 8, 9\) do not exist in a 2-block model"):
        tiny("a house", slg=True, **SMALL)
    last, past = (SLGConfig(scale=2.5, start=0.0, end=0.5, layers=(n,)) for n in (1, 2))  # blocks 0 and 1 exist
    assert tiny.generate("a house", slg=last, **SMALL).settings.slg == last
    with pytest.raises(FastSD35Error, match=r"skip-layer guidance layers \(2,\) do not exist in a 2-block model"):
        tiny("a house", slg=past, **SMALL)


def test_generation_reports_what_it_did(tiny):
    started = time.perf_counter()
    gen = tiny.generate(["one", "two"], ["n1", "n2"], seed=3, **SMALL)
    wall = time.perf_counter() - started
    assert gen.seeds == [3, 4] and gen.prompts == ["one", "two"] and gen.negative_prompts == ["n1", "n2"]
    assert set(gen.timings) == {"encode", "sample", "decode"} and gen.settings.steps == 4
    assert all(0 < seconds for seconds in gen.timings.values()) and sum(gen.timings.values()) <= wall  # durations
    with pytest.raises(FastSD35Error, match="got 2 prompts and 3 negative prompts"):
        tiny.generate(["one", "two"], ["a", "b", "c"], **SMALL)


def test_a_vae_of_another_model_is_refused(tmp_path, tiny):
    """A 4-channel (SD1/SDXL-style) VAE beside a 16-channel transformer: one CheckpointError at load, in the
    constructor and through a model folder."""
    from fastsd35.models.vae import SDVAE
    from fastsd35.tiny.family import TINY_VAE_CONFIG, save_model_folder

    vae4 = SDVAE(dataclasses.replace(TINY_VAE_CONFIG, latent_channels=4)).eval()
    message = "the VAE has 4 latent channels but the transformer takes 16: they come from different models"
    with pytest.raises(CheckpointError, match=message):
        Pipeline(tiny.transformer, vae4, tiny.text_encoders, "tiny_random")
    folder = save_model_folder(tmp_path / "mixed", tiny.transformer, vae4, tiny.text_encoders)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_pretrained(folder, "tiny_random", device="cpu")


def test_official_folder_loads_the_same_model(tmp_path, tiny):
    folder = write_tiny_model(tmp_path / "models")
    loaded = Pipeline.from_pretrained(folder, "tiny_random", device="cpu")
    assert set(loaded.timings) == {"load"}
    assert loaded.text_encoders.t5_tokens == tiny.text_encoders.t5_tokens == 256  # the default of both constructors
    np.testing.assert_array_equal(pixels(loaded("a house", **SMALL)), pixels(tiny("a house", **SMALL)))


def test_diffusers_folder_loads_the_same_model(tmp_path, tiny):
    diffusers_pipeline(tiny).save_pretrained(tmp_path / "sd3-tiny")
    loaded = Pipeline.from_pretrained(tmp_path / "sd3-tiny", "tiny_random", device="cpu")
    np.testing.assert_array_equal(pixels(loaded("a house", **SMALL)), pixels(tiny("a house", **SMALL)))


@pytest.mark.parametrize(
    "remove, message",
    [
        ("clip_g.safetensors", "clip_g.safetensors"),
        ("t5xxl_fp16.safetensors", "--no-t5"),
        ("tokenizer_3", "tokenizer"),
    ],
)
def test_missing_encoder_or_tokenizer_files(tmp_path, remove, message):
    import shutil

    folder = write_tiny_model(tmp_path / "models")
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FastSD35Error, match=message) as e:
        Pipeline.from_pretrained(folder, "tiny_random", device="cpu")
    assert "\n" not in str(e.value)


def test_no_t5_runs_without_its_files(tmp_path):
    folder = write_tiny_model(tmp_path / "models")
    (folder / "t5xxl_fp16.safetensors").unlink()
    pipe = Pipeline.from_pretrained(folder, "tiny_random", device="cpu", t5=False)
    assert pipe.text_encoders.t5 is None
    assert len(pipe("a house", **SMALL)) == 1


def test_preset_checkpoint_mismatch_is_caught_before_loading(tmp_path):
    folder = write_tiny_model(tmp_path / "models")
    (folder / "tiny.safetensors").rename(folder / "sd3.5_medium.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a custom transformer, but preset 'medium' needs sd3\.5_medium"):
        Pipeline.from_pretrained(folder, "medium", device="cpu")


# -- ControlNet ---------------------------------------------------------------------------------------------------


def edges_image():
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[10:38, 16:48] = 255
    return Image.fromarray(image)


def test_controlnet_pipeline(tmp_path, tiny):
    cn_file = write_tiny_controlnet(tmp_path / "cn.safetensors", "canny")
    pipe = Pipeline.from_preset("tiny_random", device="cpu", controlnet=cn_file)
    assert pipe.controlnet.control_name == "canny"
    s = pipe.preset.resolve()
    assert (s.shift, s.steps, s.cfg, s.sampler, s.slg) == (3.0, 60, 3.5, "euler", None)  # the ControlNet settings

    kw = dict(SMALL, sampler="euler", cfg=3.5)
    control = pipe.encode_control(edges_image(), 64, 48, seed=23)
    assert control.shape == (1, 16, 6, 8)
    steered = pixels(pipe("a house", control_image=control, **kw))
    np.testing.assert_array_equal(pixels(pipe("a house", control_image=control, control_strength=1.0, **kw)), steered)
    torch.testing.assert_close(pipe.encode_control(edges_image(), 64, 48, seed=23), control, atol=0, rtol=0)
    np.testing.assert_array_equal(pixels(pipe("a house", control_image=edges_image(), **kw)), steered)
    # Strength 0 adds zero residuals: exactly the plain transformer's image at the same settings.
    np.testing.assert_array_equal(pixels(pipe("a house", control_image=control, control_strength=0.0, **kw)),
                                  pixels(tiny("a house", **kw)))  # fmt: skip
    assert np.abs(steered - pixels(tiny("a house", **kw))).max() > 10
    assert np.abs(pixels(pipe("a house", control_image=control, control_strength=0.5, **kw)) - steered).max() > 0

    with pytest.raises(FastSD35Error, match="a ControlNet needs a control image"):
        pipe("a house", **kw)
    with pytest.raises(FastSD35Error, match=r"a control image needs a ControlNet \(--controlnet\)"):
        tiny("a house", control_image=control, **kw)


def test_controlnet_for_another_transformer_is_refused(tmp_path):
    from safetensors.torch import save_file

    from fastsd35.models.controlnet import ControlNet, ControlNetConfig

    other = ControlNet(ControlNetConfig(num_layers=1, hidden_size=192, pooled_dim=64))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    with pytest.raises(CheckpointError, match=r"cn\.safetensors \(a 1-block ControlNet, hidden size 192\) does not fit the custom transformer"):
        Pipeline.from_preset("tiny_random", device="cpu", controlnet=tmp_path / "cn.safetensors")


def test_an_unfit_controlnet_is_refused_before_the_vae_and_text_encoders_load(tmp_path, monkeypatch):
    """From files, the ControlNet is checked against the transformer as soon as both are loaded: a real T5-XXL takes
    minutes to load, so the mismatch must not wait for it."""
    from safetensors.torch import save_file

    from fastsd35.models.controlnet import ControlNet, ControlNetConfig
    from fastsd35.tiny import family as tiny_module

    other = ControlNet(ControlNetConfig(num_layers=1, hidden_size=192, pooled_dim=64))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "cn.safetensors"))

    def too_late(*args, **kwargs):
        raise AssertionError("loaded before the ControlNet was checked")

    monkeypatch.setattr(fastsd35.pipeline.runner, "load_vae", too_late)
    monkeypatch.setattr(fastsd35.pipeline.runner, "load_text_encoders", too_late)
    with pytest.raises(CheckpointError, match=r"cn\.safetensors \(a 1-block ControlNet, hidden size 192\) does not fit"):
        Pipeline.from_pretrained(tiny_module.trained_model_dir(), "tiny", device="cpu", controlnet=tmp_path / "cn.safetensors")


def test_control_latent_needs_a_controlnet(tiny):
    with pytest.raises(FastSD35Error, match=r"a control image needs a ControlNet \(--controlnet\)"):
        tiny.encode_control(edges_image(), 64, 48, seed=1)


@pytest.mark.parametrize("t5, need", [(True, 11.2e9 + 6e9), (False, 1.7e9 + 6e9)])
def test_text_encoders_go_to_the_gpu_only_with_room_to_sample_beside_them(monkeypatch, t5, need):
    """--text-encoder-device auto: the encoders (T5-XXL + CLIPs ~11.2 GB in bf16, the CLIPs alone ~1.7 GB) stay on
    the GPU only when more than that plus 6 GB for sampling at 1024^2 is free; otherwise the CPU. (Faked free memory:
    the rule, not the GPU.)"""
    gpu = torch.device("cuda:0")
    for free, where in ((need + 1, gpu), (need, torch.device("cpu"))):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f), 80 << 30))
        assert fastsd35.pipeline.runner._text_encoder_device("auto", gpu, t5) == where
    assert fastsd35.pipeline.runner._text_encoder_device("cpu", gpu, t5) == torch.device("cpu")
    assert fastsd35.pipeline.runner._text_encoder_device("auto", torch.device("cpu"), t5) == torch.device("cpu")


def test_text_encoders_leave_a_gpu_short_of_room_to_sample(monkeypatch):
    """Before sampling: encoders on a GPU with less than 6 GB free move to the CPU; with 6 GB they stay."""
    moved = []
    encoders = types.SimpleNamespace(device=torch.device("cuda:0"), to=lambda device: moved.append(device))
    pipe = types.SimpleNamespace(text_encoders=encoders)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    for free, expected in ((int(6e9), []), (int(6e9) - 1, ["cpu"])):
        moved.clear()
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 80 << 30))
        Pipeline._make_room_for_sampling(pipe)
        assert moved == expected, free


@torch.no_grad()
def test_img2img_starts_from_the_seeded_noised_init_latent(tiny, monkeypatch):
    """With a model whose velocity is 0 every euler step keeps x, so the image is the decoded start latent: the init
    image's VAE sample (seeded from seed + 2**32) noised to the first sigma of the denoise-cut schedule. This pins that
    the init image, the denoise strength and the seeded posterior sample all reach the start latent, and how."""
    monkeypatch.setattr(tiny, "model_pass", lambda x, sigma, y, context, **kw: torch.zeros_like(x))
    rng = np.random.default_rng(0)
    init, other = (Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(2))

    def run(image, denoise, seed=23):
        return pixels(tiny(["a house"], init_image=image, denoise=denoise, seed=seed, sampler="euler", **SMALL))

    sigmas = fastsd35.pipeline.sampling.img2img_sigmas(fastsd35.pipeline.sampling.get_sigmas(tiny.preset.shift, 4), 0.5)
    latent = tiny.encode_image(init, 64, 48, 23)
    x0 = initial_latent(sigmas[0], make_noise(23, 1, (16, 6, 8)), latent)
    expected = pixels(tensor_to_images(tiny.vae.decode(process_out(x0.float()).to(tiny.vae.dtype))))  # x0 is fp16; the sampler's first update makes it fp32
    np.testing.assert_array_equal(run(init, 0.5), expected)

    assert np.abs(run(other, 0.5) - expected).max() > 10  # the init image matters
    assert np.abs(run(init, 0.75) - expected).max() > 10  # so does the strength
    # the VAE posterior is sampled, from the image's seed: same seed same latent, another seed another sample
    torch.testing.assert_close(tiny.encode_image(init, 64, 48, 23), latent, atol=0, rtol=0)
    assert (tiny.encode_image(init, 64, 48, 24) - latent).abs().max() > 1e-3
    # denoise 1.0 starts from pure noise: the init image no longer matters
    np.testing.assert_array_equal(run(init, 1.0), run(other, 1.0))
