"""fastsd35.diffusers.accelerate: the fast transformer behind diffusers' SD3 interface. Parity with
SD3Transformer2DModel (1e-4 in fp32) and with the unmodified diffusers pipelines (within 1/255: text-to-image with CFG,
SLG, img2img, ControlNet), weights moved rather than copied, and the errors."""

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd35.diffusers import FastSD3Transformer, accelerate, per_block_residuals
from fastsd35.pipeline.runner import Pipeline
from fastsd35.tiny.family import randomize_

from helpers.diffusers_ref import require_diffusers
from helpers.models import TINY_CONFIGS, inputs, make_diffusers, make_model, run_diffusers
from helpers.pipelines import diffusers_pipeline


@pytest.fixture(autouse=True)
def diffusers():
    """Every test here drives diffusers: without it they are collected and skipped, saying why."""
    return require_diffusers()

PIPE = dict(num_inference_steps=4, guidance_scale=4.5, height=32, width=32, max_sequence_length=77, output_type="np")


def residuals(config, x, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    return [0.5 * torch.randn(x.shape[0], tokens, config.hidden_size, generator=g) for _ in range(n)]


# -- the module --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_module_matches_sd3_transformer(tiny_config):
    """Triton ops (the interpreter on CPU) against diffusers in fp32: plain, SLG, fewer ControlNet residuals than
    blocks (diffusers spreads them as int(i / (depth / n)) and skips the last block), residuals with a skipped block
    (diffusers still adds its residual), fp16 timesteps and the output forms."""
    ref = make_diffusers(make_model(tiny_config))
    x, t, y, ctx = inputs(tiny_config)
    hs = residuals(tiny_config, x, 2)
    cases = [dict(), dict(skip_layers=[1]), dict(block_controlnet_hidden_states=hs),
             dict(block_controlnet_hidden_states=hs, skip_layers=[1]), dict(block_controlnet_hidden_states=hs[:1])]
    expected = [run_diffusers(ref, x, t, y, ctx, **kw) for kw in cases]
    expected_half_t = run_diffusers(ref, x, t.half(), y, ctx)
    fast = FastSD3Transformer.from_diffusers(ref)
    for kw, want in zip(cases, expected):
        out = fast(x, ctx, y, t, return_dict=False, **kw)
        assert isinstance(out, tuple) and len(out) == 1
        assert want.std() > 0.3
        torch.testing.assert_close(out[0], want, atol=1e-4, rtol=0)
    out = fast(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t.half(),
               joint_attention_kwargs={"scale": 0.7}).sample
    torch.testing.assert_close(out, expected_half_t, atol=1e-4, rtol=0)
    # the cases differ from each other, so each comparison above checks something
    assert min((a - b).abs().max() for a, b in zip(expected, expected[1:])) > 1e-2


def test_residual_schedule_is_diffusers():
    a, b, c = (torch.full((1,), v) for v in (1.0, 2.0, 4.0))
    per = per_block_residuals([a, b], 5)  # interval 2.5: blocks 0,1,2 -> a; 3 -> b; 4 (last) -> nothing
    assert [float(r) for r in per] == [1, 1, 1, 2, 0]
    per = per_block_residuals([a, b, c], 4, skip=(1, 2))  # interval 4/3: 0 -> a, 1 -> a, 2 -> b; 1, 2 skipped
    assert [float(r) for r in per] == [4, 0, 0, 0]
    with pytest.raises(ValueError, match="skip block 0 before any block ran"):
        per_block_residuals([a], 3, skip=(0,))
    with pytest.raises(ValueError, match="4 ControlNet residuals cannot be spread over 3 blocks"):
        per_block_residuals([a] * 4, 3)


def test_weights_are_moved_not_copied():
    ref = make_diffusers(make_model(TINY_CONFIGS["sd35_medium"]))
    shared = ref.transformer_blocks[0].attn.to_out[0].weight  # maps 1:1: its storage is taken over
    ptr = shared.data_ptr()
    qkv_part = weakref.ref(ref.transformer_blocks[1].attn.to_k.weight)  # concatenated into qkv: released
    module = weakref.ref(ref)
    fast = FastSD3Transformer.from_diffusers(ref)
    assert fast.model.joint_blocks[0].x_block.attn.proj.weight.data_ptr() == ptr
    del shared
    assert sum(p.numel() for p in ref.parameters()) == 0 and sum(b.numel() for b in ref.buffers()) == 0
    del ref
    gc.collect()
    assert qkv_part() is None and module() is None  # nothing in the adapter keeps the original alive
    assert not any(p.is_meta for p in fast.model.state_dict().values())


# -- the pipelines -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference ops, as on a user's CPU: pipelines run many steps
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.from_preset("tiny_random", device="cpu")


def latents(seed=0):
    return torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def both(make, *calls):
    """[(unmodified, accelerated) images] of each call (a dict of pipeline arguments) on two pipelines built alike;
    torch's global seed is reset before each call, for the VAE samples diffusers draws without a generator."""
    images = []
    for fast in (False, True):
        pipe = make()
        if fast:
            assert accelerate(pipe) is pipe and isinstance(pipe.transformer, FastSD3Transformer)
        for kwargs in calls:
            torch.manual_seed(0)
            with torch.no_grad():
                images.append(pipe("a red cube", negative_prompt="blurry", generator=torch.Generator().manual_seed(1),
                                   **{**PIPE, **kwargs}).images)
    return list(zip(images[: len(calls)], images[len(calls) :]))


def assert_same_image(a, b):
    assert a.shape == b.shape and a.std() > 0.02
    assert np.abs(a - b).max() <= 1 / 255


def test_txt2img_with_cfg_and_slg(tiny):
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.0,
               skip_layer_guidance_stop=0.6)  # fmt: skip
    (plain, fast), (plain_slg, fast_slg) = both(lambda: diffusers_pipeline(tiny), dict(latents=latents()),
                                                dict(latents=latents(), **slg))
    assert_same_image(plain, fast)
    assert_same_image(plain_slg, fast_slg)
    assert np.abs(plain_slg - plain).max() > 0.05  # SLG changed the image


def test_img2img(tiny, diffusers):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    [(plain, fast)] = both(lambda: diffusers.StableDiffusion3Img2ImgPipeline(**diffusers_pipeline(tiny).components),
                           dict(image=image, strength=0.6))
    assert_same_image(plain, fast)


def test_controlnet(tiny, diffusers):
    cfg = tiny.transformer.config

    def make():
        controlnet = diffusers.SD3ControlNetModel(
            patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=cfg.num_heads,
            joint_attention_dim=None, caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.adm_in_channels,
            out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
            force_zeros_for_pooled_projection=False,
        )  # fmt: skip
        return diffusers.StableDiffusion3ControlNetPipeline(**diffusers_pipeline(tiny).components,
                                                  controlnet=randomize_(controlnet, 3).eval())

    control = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    (plain, fast), (without, _) = both(make, dict(latents=latents(), control_image=control),
                                       dict(latents=latents(), control_image=control, controlnet_conditioning_scale=0.0))
    assert_same_image(plain, fast)
    assert np.abs(without - plain).max() > 0.05  # the residuals changed the image


# -- errors ------------------------------------------------------------------------------------------------------


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_not_an_sd3_pipeline_or_transformer(tiny):
    with pytest.raises(ValueError, match="accelerate.. takes a diffusers StableDiffusion3Pipeline.*not a dict") as e:
        accelerate({})
    assert one_line(e)
    pipe = diffusers_pipeline(tiny)
    pipe.transformer = make_diffusers(make_model(TINY_CONFIGS["sd3"])).to(torch.float32)
    pipe.transformer.register_to_config(attention_head_dim=32)  # a config SD3 never has
    with pytest.raises(ValueError, match="not an SD3/SD3.5 transformer: 2 heads of 32 for 2 layers") as e:
        accelerate(pipe)
    assert one_line(e)
    pipe.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="pipe.transformer is a Linear, not a diffusers SD3Transformer2DModel"):
        accelerate(pipe)
    pipe = accelerate(diffusers_pipeline(tiny))
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate(pipe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a refusal needs a machine without CUDA")
def test_a_refused_accelerate_leaves_the_pipeline_working(tiny):
    """graphs=True without CUDA (or graphs of the wrong type) is refused before any weight moves: the pipeline still
    generates, and a second accelerate() works."""
    pipe = diffusers_pipeline(tiny)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    for graphs, message in ((True, "graphs=True needs the transformer on CUDA; it is on cpu"),
                            ("yes", "graphs must be True or False, got 'yes'")):
        with pytest.raises(ValueError, match=message):
            accelerate(pipe, graphs=graphs)
        assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    first = pipe(prompt="a cat", **PIPE, generator=torch.Generator().manual_seed(1)).images
    accelerate(pipe)
    again = pipe(prompt="a cat", **PIPE, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(first - again).max() < 1e-2


def test_what_the_adapter_cannot_honour(diffusers):
    ref = make_diffusers(make_model(TINY_CONFIGS["sd3"]))
    ref.transformer_blocks[1].attn.set_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks.1.attn.processor is a AttnProcessor2_0: .* only runs"):
        FastSD3Transformer.from_diffusers(ref)
    assert ref.transformer_blocks[0].attn.to_q.weight.numel() > 0  # refused before anything was moved

    fast = FastSD3Transformer.from_diffusers(make_diffusers(make_model(TINY_CONFIGS["sd3"])))
    x, t, y, ctx = inputs(fast.model.config)
    with pytest.raises(ValueError, match=r"joint_attention_kwargs \['ip_adapter_image_embeds'\] are not supported"):
        fast(x, ctx, y, t, joint_attention_kwargs={"ip_adapter_image_embeds": [], "scale": 1.0})
    with pytest.raises(ValueError, match="scale'] must be a finite number, got nan"):
        fast(x, ctx, y, t, joint_attention_kwargs={"scale": float("nan")})
    with pytest.raises(TypeError, match="unexpected keyword argument 'attention_mask'"):
        fast(x, ctx, y, t, attention_mask=None)
    with pytest.raises(ValueError, match=r"skip_layers \[5\] are not blocks of this 2-block transformer"):
        fast(x, ctx, y, t, skip_layers=[5])
    with pytest.raises(ValueError, match="graphs=True needs the transformer on CUDA; it is on cpu"):
        FastSD3Transformer(fast.model, fast.config, graphs=True)
    with pytest.raises(ValueError, match="attention processors cannot be set"):
        fast.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replay_equals_eager():
    config = TINY_CONFIGS["sd35_medium"]
    ref = make_diffusers(make_model(config)).to("cuda")
    eager = FastSD3Transformer.from_diffusers(ref)
    graphed = FastSD3Transformer(eager.model, eager.config, graphs=True)
    for seed in (1, 2):  # the second call replays the graph with new inputs
        x, t, y, ctx = (v.cuda() for v in inputs(config, seed=seed))
        hs = residuals(config, x, 2, seed=seed)
        hs = [h.cuda() for h in hs]
        for kw in (dict(), dict(skip_layers=[1], block_controlnet_hidden_states=hs)):
            torch.testing.assert_close(graphed(x, ctx, y, t, **kw).sample, eager(x, ctx, y, t, **kw).sample,
                                       atol=0, rtol=0)
    assert len(graphed._graphs) == 2
