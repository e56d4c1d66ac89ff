"""The tiny-family training script (fastsd35/tiny/train.py) and its VAE (fastsd35/tiny/autoencoder.py): the autograd
forward is the model's forward, the constructed VAE is the sub-block autoencoder it says, and a reduced run writes,
from its seed, the same family twice, which the real loaders read and the pipeline runs."""

import pytest
import torch

from fastsd35.models.mmditx import MMDiTX
from fastsd35.pipeline.runner import Pipeline
from fastsd35.tiny import family as tiny
from fastsd35.tiny import autoencoder
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
    for _ in range(tiny.TRAINED_MMDITX_CONFIG.depth + 2):  # adaLN-Zero: each step reaches one level deeper past the zero gates
        model.zero_grad()
        (train_tiny.training_forward(model, x, torch.tensor([500.0, 900.0]), y, context) - target).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    unused = {f"joint_blocks.{tiny.TRAINED_MMDITX_CONFIG.depth - 1}.context_block.attn.ln_q.weight"}
    untrained = [n for n, p in model.named_parameters() if n not in unused and not p.grad.abs().sum() > 0]
    assert not untrained


def reduced_run(out, parallel=False):
    return train_tiny.train(out, vae_steps=2, steps=2, batch=4, every=0, evaluate_checkpoints=False, every_nth_scene=9,
                            parallel=parallel, log=lambda message: None)


def test_reduced_training_run_writes_a_loadable_family(tmp_path):
    out = reduced_run(tmp_path / "tiny_model")
    assert sorted(p.name for p in out.iterdir()) == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                                     "tiny.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"]
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 20 * 2**20
    pipe = Pipeline.from_pretrained(out, "tiny", device="cpu")
    assert pipe.transformer.config == tiny.TRAINED_MMDITX_CONFIG and pipe.vae.config == tiny.TRAINED_VAE_CONFIG
    image = pipe("a red circle on a blue background", steps=2, width=SIZE, height=SIZE, progress=False)[0]
    assert image.size == (SIZE, SIZE)
    again = reduced_run(tmp_path / "again", parallel=True)  # the same seed, the decoder in its own process: the same bytes
    for name in ("tiny.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_constructed_vae_is_a_sub_block_autoencoder():
    """The VAE `train_decoder` starts from: the encoder's posterior mean is the seeded orthonormal mix of each 8x8
    block's four 4x4 sub-block mean colours (about unit std after process_in), the decoder repeats each block's mean
    colour over the block. Exact to ~1e-3 on scenes of every colour pair, through both GroupNorms (which, without the
    reference pattern, give any flat colour as +-1)."""
    from torch.nn import functional as F

    from fastsd35.models.vae import SDVAE, process_in

    images, _ = train_tiny.scene_images()
    vae = autoencoder.construct_(SDVAE(tiny.TRAINED_VAE_CONFIG).eval(), images[::9], seed=0)
    check = images[4::9]  # 20 scenes, every (colour, background) pair
    with torch.no_grad():
        mean, logvar = vae.encoder(check).chunk(2, dim=1)
        decoded = vae.decoder(mean)
    values = autoencoder.sub_block_means(check)
    mix = autoencoder.mixing_matrix(16, seed=0)
    torch.testing.assert_close(mix.T @ mix, torch.eye(12), atol=1e-5, rtol=0)
    got = torch.einsum("lk,blhw->bkhw", mix, mean)  # the values back, up to the one scale the std sets
    scale = (got * values).sum() / (values * values).sum()
    assert F.mse_loss(got / scale, values).item() < 1e-4 * values.square().mean().item() + 1e-6
    assert F.mse_loss(decoded, F.interpolate(autoencoder.block_means(values), scale_factor=8)).item() < 1e-3
    assert torch.allclose(logvar, torch.full_like(logvar, autoencoder.LOGVAR_TARGET))
    assert 0.8 < process_in(mean).std().item() < 1.25
    assert (values[:, 0::4] - values[:, 3::4]).abs().max() > 0.5  # the sub-blocks differ: more than block means
