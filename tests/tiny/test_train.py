"""The tiny-family training script (fastsd35/train_tiny.py): its autograd forward is the model's forward, and a
reduced run writes a family that the real loaders read and the pipeline runs."""

import pytest
import torch

from fastsd35.models.mmditx import MMDiTX
from fastsd35.pipeline.runner import Pipeline
from fastsd35.tiny import family as tiny
from fastsd35.tiny import train as train_tiny
from fastsd35.tiny.scenes import SIZE


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference ops, as on a user's CPU


@pytest.mark.parametrize("config", [tiny.TRAINED_MMDITX_CONFIG, tiny.TINY_MMDITX_CONFIG], ids=["trained", "attn2"])
def test_training_forward_is_the_model_forward(config):
    """train_tiny's autograd-friendly forward computes what the inference forward computes, on any weights."""
    model = tiny.randomize_(MMDiTX(config), 3)
    model._fuse_adaln()
    g = torch.Generator().manual_seed(0)
    x, y, context = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 64, generator=g), torch.randn(2, 20, 64, generator=g)
    t = torch.tensor([700.0, 20.0])
    with torch.no_grad():
        torch.testing.assert_close(train_tiny.training_forward(model, x, t, y, context), model(x, t, y, context))


def test_training_forward_trains_every_weight():
    """Gradients reach every weight that affects the output (the last block's context queries do not: its context
    stream is pre-only, as in the released models)."""
    model = train_tiny.init_transformer(MMDiTX(tiny.TRAINED_MMDITX_CONFIG), 0)
    g = torch.Generator().manual_seed(0)
    x, y, context = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 64, generator=g), torch.randn(2, 20, 64, generator=g)
    target = torch.randn(2, 16, 8, 8, generator=g)
    for _ in range(3):  # adaLN-Zero: each step reaches one level deeper past the zero-initialised gates
        model.zero_grad()
        (train_tiny.training_forward(model, x, torch.tensor([500.0, 900.0]), y, context) - target).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    unused = {f"joint_blocks.{tiny.TRAINED_MMDITX_CONFIG.depth - 1}.context_block.attn.ln_q.weight"}
    untrained = [n for n, p in model.named_parameters() if n not in unused and not p.grad.abs().sum() > 0]
    assert not untrained


def test_reduced_training_run_writes_a_loadable_family(tmp_path):
    out = train_tiny.train(tmp_path / "tiny_model", vae_steps=2, steps=2, batch=4, every=0, evaluate_checkpoints=False,
                           every_nth_scene=27, log=lambda message: None)
    assert sorted(p.name for p in out.iterdir()) == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                                     "tiny.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"]
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 10 * 2**20
    pipe = Pipeline.from_pretrained(out, "tiny", device="cpu")
    assert pipe.transformer.config == tiny.TRAINED_MMDITX_CONFIG and pipe.vae.config == tiny.TRAINED_VAE_CONFIG
    image = pipe("a red circle on a blue background", steps=2, width=SIZE, height=SIZE, progress=False)[0]
    assert image.size == (SIZE, SIZE)


def test_colour_passing_init_is_a_block_mean_autoencoder():
    """The VAE `train_vae` starts from: the encoder's posterior mean is a fixed mix of each 8x8 block's mean colour
    (scaled to about unit std by process_in), the decoder repeats that colour over the block. Exact to ~1e-3 on
    scenes of every colour pair, through both GroupNorms (which, without the reference pattern, give any flat colour
    as +-1)."""
    from torch.nn import functional as F

    from fastsd35.models.vae import SDVAE, process_in

    images, _ = train_tiny.scene_images()
    vae = train_tiny.colour_passing_init_(SDVAE(tiny.TRAINED_VAE_CONFIG).eval(), images[::40], seed=0)
    check = images[7::81]  # 20 scenes, every (colour, background) pair
    with torch.no_grad():
        mean, logvar = vae.encoder(check).chunk(2, dim=1)
        blocks = F.avg_pool2d(check, 8)
        assert F.mse_loss(vae.decoder(mean), F.interpolate(blocks, scale_factor=8, mode="nearest")).item() < 1e-3
    assert torch.allclose(logvar, torch.full_like(logvar, train_tiny.LOGVAR_TARGET))
    assert 0.5 < process_in(mean).std().item() < 2.0
    colours = torch.linalg.lstsq(mean.permute(0, 2, 3, 1).reshape(-1, 16), blocks.permute(0, 2, 3, 1).reshape(-1, 3))
    assert colours.residuals.sum().item() < 1e-3 * blocks.numel()  # the latent is linear in the block colours
