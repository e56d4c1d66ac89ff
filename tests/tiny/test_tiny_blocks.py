"""What the trained tiny model's depth lets the tests prove across blocks: every block matters (the step cache measures
its quality on this model: no dead blocks), skip-layer guidance on chosen layers changes the picture and runs as the
reference's SkipLayerCFGDenoiser (SPEC.md §5.3), and a ControlNet's residuals are spread over the blocks as the
released 19-over-38 layout spreads them (block i gets residual i // (N // n), SPEC.md §8.4)."""

import numpy as np
import pytest
import torch

from helpers.pipelines import reference_ops  # noqa: F401  (autouse, module-wide: the reference ops)

from fastsd35.models.vae import process_in, process_out, tensor_to_images
from fastsd35.pipeline.runner import Pipeline
from fastsd35.pipeline.sampling import SLGConfig, get_sigmas, make_noise
from fastsd35.tiny import family as tiny
from fastsd35.tiny.scenes import CHECK_CAPTIONS, LAYOUTS, SIZE, Scene, parse_caption

CAPTION = CHECK_CAPTIONS[0]  # a red square on a blue background


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset("tiny", device="cpu")


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_every_block_matters(pipe):
    """Skipping any one of the 4 blocks changes the velocity by more than 5% of it (relative L2) at every noise
    level, on noised latents of drawn scenes of the 8 check captions: no block is dead weight (measured: 16% to 48%
    on the shipped model; a block that learned nothing gives 0)."""
    model = pipe.transformer
    assert model.depth >= 4
    scenes = [parse_caption(c) for c in CHECK_CAPTIONS]
    drawn = np.stack([Scene(s.shape, s.color, s.background, LAYOUTS[i % len(LAYOUTS)]).render() for i, s in enumerate(scenes)])
    context, pooled = pipe.text_encoders.encode(list(CHECK_CAPTIONS))
    with torch.no_grad():
        x0 = process_in(pipe.vae.encode(torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 127.5 - 1))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        for sigma in (0.9, 0.5, 0.1):
            x, t = sigma * noise + (1 - sigma) * x0, torch.full((len(scenes),), sigma * 1000)
            full = model(x, t, pooled, context)
            for block in range(model.depth):
                change = (model(x, t, pooled, context, skip_layers=(block,)) - full).norm() / full.norm()
                assert change > 0.05, (sigma, block, change.item())


def reference_sample(pipe, caption, seed, steps, cfg, slg=None):
    """The reference's txt2img loop written out (SPEC.md §5.3-5.4): fp16 start and fp16 sigmas (s_in made from the
    fp16 x), the model's timestep sigma*1000 in fp16, CFG as one batched pass [cond, uncond] then
    neg + (pos - neg) * cfg, SkipLayerCFGDenoiser's cond-only pass without `slg.layers` on the steps with
    start*steps < step < end*steps adding (pos - skip) * scale, and sample_euler."""
    model = pipe.transformer
    context, pooled = pipe.text_encoders.encode([caption, ""])
    sigmas = get_sigmas(pipe.preset.shift, steps)
    x = make_noise(seed, 1, (16, SIZE // 8, SIZE // 8)).half()
    s_in = x.new_ones([1])
    with torch.no_grad():
        for step in range(steps):
            sigma = sigmas[step] * s_in  # fp16

            def denoised(xs, ctx, y, skip_layers=()):
                timestep = (sigma * 1000).float().expand(xs.shape[0])
                v = model(xs.float(), timestep, y, ctx, skip_layers=skip_layers).float()
                return xs - v * sigma

            pos, neg = denoised(torch.cat([x, x]), context, pooled).chunk(2)
            out = neg + (pos - neg) * cfg
            if slg is not None and slg.scale > 0 and slg.start * steps < step < slg.end * steps:
                out = out + (pos - denoised(x, context[:1], pooled[:1], slg.layers)) * slg.scale
            x = x + (x - out) / sigmas[step] * (sigmas[step + 1] - sigmas[step])
        return tensor_to_images(pipe.vae.decode(process_out(x.float())))


@pytest.mark.parametrize("layers", [(1,), (2, 3)], ids=["block1", "blocks2-3"])
def test_skip_layer_guidance_runs_as_the_reference(pipe, layers):
    """The pipeline's CFG and SLG on the trained model give the reference loop's picture (within one level in 255),
    with and without SLG, and skipping a chosen block changes the picture."""
    slg = SLGConfig(scale=2.5, start=0.0, end=0.5, layers=layers)
    kw = dict(seed=23, steps=8, cfg=4.5, sampler="euler", progress=False)
    guided = pixels(pipe(CAPTION, slg=slg, **kw))
    assert np.abs(guided - pixels(reference_sample(pipe, CAPTION, 23, 8, 4.5, slg))).max() <= 1
    plain = pixels(pipe(CAPTION, slg=False, **kw))
    assert np.abs(plain - pixels(reference_sample(pipe, CAPTION, 23, 8, 4.5))).max() <= 1
    assert np.abs(guided - plain).max() > 20


def test_skipping_different_blocks_draws_different_pictures(pipe):
    """SLG's layer choice matters: each block skipped gives its own picture."""
    kw = dict(seed=24, steps=8, progress=False)
    images = [pixels(pipe(CAPTION, slg=SLGConfig(scale=2.5, start=0.0, end=0.5, layers=(b,)), **kw))
              for b in range(pipe.transformer.depth)]
    for a in range(len(images)):
        for b in range(a):
            assert np.abs(images[a] - images[b]).max() > 20, (a, b)


def test_controlnet_residuals_are_spread_over_the_blocks_as_released(tmp_path):
    """A ControlNet of 2 blocks on the 4-block model: block i gets residual i // 2, the last block included (the
    released ControlNets' 19 over SD3.5 Large's 38). Read from the model as it runs: what block i hands on minus
    what it computed is residual i // 2, on every pass of the CFG batch."""
    cn_file = tiny.write_tiny_controlnet(tmp_path / "cn.safetensors", "canny", trained=True)
    pipe = Pipeline.from_preset("tiny", device="cpu", controlnet=cn_file)
    model, controlnet = pipe.transformer, pipe.controlnet
    assert (model.depth, controlnet.config.num_layers) == (4, tiny.TRAINED_CONTROLNET_LAYERS) == (4, 2)

    residuals, outputs, handed_on = [], {}, {}  # the first pass's: block i's output x, the x block i + 1 receives

    def keep(store, i, x):
        store.setdefault(i, x.clone())

    run_controlnet = controlnet.forward
    controlnet.forward = lambda *a, **k: residuals.append(run_controlnet(*a, **k)) or residuals[-1]
    hooks = [block.register_forward_hook(lambda m, args, out, i=i: keep(outputs, i, out[1]))
             for i, block in enumerate(model.joint_blocks)]
    receivers = [*model.joint_blocks[1:], model.final_layer]  # x is a block's 2nd argument, the final layer's 1st
    hooks += [r.register_forward_pre_hook(lambda m, args, i=i: keep(handed_on, i, args[1 if i < 3 else 0]))
              for i, r in enumerate(receivers)]
    try:
        control = np.zeros((SIZE, SIZE, 3), np.uint8)
        control[16:48, 16:48] = 255
        from PIL import Image

        pipe(CAPTION, control_image=Image.fromarray(control), steps=1, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    (first,) = residuals  # one step: one guided pass of 2 (cond, uncond)
    assert len(first) == 2 and first[0].shape == (2, (SIZE // 8) ** 2, model.config.hidden_size)
    assert (first[0] - first[1]).abs().max() > 0.1 and min(r.abs().max() for r in first) > 0.1
    for i in range(model.depth):
        torch.testing.assert_close(handed_on[i] - outputs[i], first[i // 2], atol=1e-5, rtol=1e-5)
