"""Train the tiny SD3 family on `fastsd35.tiny.scenes` and write it as a model folder in the official layout:

    python -m fastsd35.tiny.train --out fastsd35/tiny/trained           # the shipped model (seed 0, ~20 min, 2 cores)
    python -m fastsd35.tiny.train --out DIR --vae-steps 2 --steps 2    # a smoke run

1. The VAE (`tiny.TRAINED_VAE_CONFIG`, 16 latent channels, factor 8) starts as an exact autoencoder of each 8x8
   block's mean colour (`colour_passing_init_`: how colours get through its GroupNorms), then its decoder's residual
   branches learn to draw the scenes' edges from those latents (`train_vae`).
2. The text encoders are the random-weight tiny CLIP-L / CLIP-G / T5 (`tiny_text_encoders`), frozen: every caption's
   context and pooled vectors are computed once.
3. The transformer (`tiny.TRAINED_MMDITX_CONFIG`) learns the SD3 objective: rectified flow x = sigma*noise +
   (1-sigma)*x0 with target v = noise - x0 (the samplers denoise with x - v*sigma), sigma = the preset's shift applied
   to a logit-normal t, the caption replaced by the empty prompt 10% of the time for CFG. The weights written are
   an exponential moving average.

Everything is seeded: the same seed and step counts give the same files on the same torch build. The files are fp16,
as the releases; the folder loads with `Pipeline.from_pretrained(DIR, "tiny")` / `fastsd35 run --preset tiny
--model DIR`, and each checkpoint is scored with `tiny_scenes.adherence`. `--preset tiny` without `--model` loads the
copy shipped in the package (`tiny.TRAINED_MODEL_DIR`).
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..models.mmditx import MMDiTX
from ..models.vae import SDVAE, AttnBlock, ResnetBlock, process_in
from ..pipeline.presets import get_preset
from ..pipeline.sampling import shift_sigma
from ..weights.vae import load_vae
from . import family as tiny
from . import scenes as tiny_scenes

TEXT_SEED_OFFSET = 2  # the text encoders are tiny_text_encoders(seed + 2), as in tiny.tiny_components
CAPTION_DROPOUT = 0.1


# -- data --------------------------------------------------------------------------------------------------------


def scene_images() -> tuple[torch.Tensor, list[str]]:
    """The whole dataset as (N, 3, 64, 64) float32 in [-1, 1] and the N captions."""
    scenes = tiny_scenes.all_scenes()
    pixels = np.stack([s.render() for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


# -- VAE ---------------------------------------------------------------------------------------------------------

LOGVAR_TARGET = 2 * math.log(0.05)  # a posterior std of 0.05 in raw latent units
REFERENCE = 20.0  # amplitude of the fixed pattern that gives each colour-carrying norm group its scale
SILU_AT = 8.0  # the norm_out bias that puts both channels of a pair where SiLU is almost the identity
LATENT_NOISE = 0.02  # std of the noise added to the latents the decoder trains on (raw units)


@torch.no_grad()
def colour_passing_init_(vae: SDVAE, images: torch.Tensor, seed: int) -> SDVAE:
    """Set `vae` to an exact autoencoder of the 8x8-block mean colours, the starting point of `train_vae`.

    Why: the scenes are flat colours, and a GroupNorm normalises each image's groups to mean 0 and std 1. With two
    channels per group (64 channels, 32 groups) a flat colour comes out of the norm as +-1 whatever it was, so a VAE
    of this size trained from random weights learns colours very slowly (measured: after 300 steps green and blue
    still decoded alike). Only `norm_out` (encoder and decoder) stands in the colours' way: everything else is
    residual. So each colour c enters a group as the pair (K P + c, K P - c), where P is a fixed pattern made from
    a constant channel by a convolution's zero padding (the first downsample's bottom/right padding in the encoder,
    the first upsample's top/left padding in the decoder): the group's mean is K mean(P) and its variance
    K^2 var(P) + mean(c^2), independent of c to first order, so the normalised difference of the pair is
    2c / (K std(P)): the colour, linearly. conv_out takes that difference, with one gain per side fitted on
    `images` (the pattern's statistics are those of a 64x64 image: other sizes shift the colours).

    The result: the encoder's posterior mean is a fixed random mix (16 x 3, seeded) of each 8x8 block's mean colour,
    the log-variance LOGVAR_TARGET; the decoder unmixes it and repeats it over the block; every residual branch
    (ResnetBlock conv2, attention proj_out) is zero, for `train_vae` to teach the decoder the edges."""
    cfg, (enc, dec) = vae.config, (vae.encoder, vae.decoder)
    C = cfg.ch
    if any(c != C for c in cfg.channels) or C != 2 * cfg.norm_groups or cfg.latent_channels < 3:
        raise ValueError(f"colour_passing_init_ needs equal widths of two channels per norm group: {cfg}")
    ref, pairs = C - 1, [(2 * i, 2 * i + 1) for i in range(3)]  # the constant channel; colour i in group i

    def clear(conv):
        conv.weight.zero_()
        conv.bias.zero_()

    for m in vae.modules():
        if isinstance(m, ResnetBlock):
            clear(m.conv2)
        elif isinstance(m, AttnBlock):
            clear(m.proj_out)
    clear(enc.conv_in)  # rgb -> (+c, -c) pairs, the constant channel
    for i, (a, b) in enumerate(pairs):
        enc.conv_in.weight[a, i, 1, 1], enc.conv_in.weight[b, i, 1, 1] = 1.0, -1.0
    enc.conv_in.bias[ref] = 1.0
    for level in enc.down:
        if level.downsample is not None:  # each channel's 2x2 mean
            clear(level.downsample.conv)
            level.downsample.conv.weight[range(C), range(C), :2, :2] = 0.25
    pattern_taps = [(enc.down[0].downsample.conv, 2), (dec.up[-1].upsample.conv, 0)]  # the tap that hits padding
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cfg.latent_channels, 3, generator=g)
    mix /= mix.norm(dim=1, keepdim=True)
    unmix = torch.linalg.pinv(mix)  # (3, latent)
    clear(dec.conv_in)  # latent -> (+c, -c) pairs, the constant channel
    for i, (a, b) in enumerate(pairs):
        dec.conv_in.weight[a, :, 1, 1], dec.conv_in.weight[b, :, 1, 1] = unmix[i], -unmix[i]
    dec.conv_in.bias[ref] = 1.0
    for level in dec.up:
        if level.upsample is not None:  # nearest x2, then the identity
            clear(level.upsample.conv)
            level.upsample.conv.weight[range(C), range(C), 1, 1] = 1.0
    for conv, tap in pattern_taps:
        for channel in (c for pair in pairs for c in pair):
            conv.weight[channel, ref, tap, tap] = REFERENCE
    half = cfg.latent_channels
    for side in (enc, dec):
        side.norm_out.weight.fill_(1.0)
        side.norm_out.bias.fill_(SILU_AT)
        clear(side.conv_out)
    enc.conv_out.bias[half:] = LOGVAR_TARGET
    for i, (a, b) in enumerate(pairs):
        enc.conv_out.weight[:half, a, 1, 1], enc.conv_out.weight[:half, b, 1, 1] = mix[:, i], -mix[:, i]
        dec.conv_out.weight[i, a, 1, 1], dec.conv_out.weight[i, b, 1, 1] = 1.0, -1.0
    # the gains: least squares against the block means (encoder), then against their repetition (decoder)
    blocks = F.avg_pool2d(images, 8)
    got = torch.einsum("cl,blhw->bchw", unmix, enc(images)[:, :half])
    enc.conv_out.weight[:half] *= (got * blocks).sum() / (got * got).sum()
    got = dec(torch.einsum("lc,bchw->blhw", mix, blocks))
    want = F.interpolate(blocks, scale_factor=8, mode="nearest")
    dec.conv_out.weight *= (got * want).sum() / (got * got).sum()
    return vae


def train_vae(images: torch.Tensor, steps: int, seed: int, batch: int = 8, lr: float = 5e-4,
              log=print) -> tuple[SDVAE, torch.Tensor]:
    """`colour_passing_init_`, then the decoder's residual branches learn to draw the scenes from the latents (with
    LATENT_NOISE added, as the transformer's latents will not be exact): sharp edges instead of 8x8 blocks. The
    encoder stays the exact block-mean encoder, and the colour path (conv_in/out, resampling, norm_out) stays as
    set: with them trainable, lr 2e-4 already undid the colours before the edges improved. Returns the VAE and the
    raw posterior means of `images` (the transformer's data, after process_in)."""
    torch.manual_seed(seed)
    vae = SDVAE(tiny.TRAINED_VAE_CONFIG).eval().requires_grad_(False)
    colour_passing_init_(vae, images[:: max(1, len(images) // 40)], seed)
    latents = encode_all(vae, images, process=False)
    branches = [p for m in vae.decoder.modules() if isinstance(m, (ResnetBlock, AttnBlock)) for p in m.parameters()]
    for p in branches:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(branches, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pick = torch.randint(len(images), (batch,), generator=g)
        z = latents[pick] + LATENT_NOISE * torch.randn(latents[pick].shape, generator=g)
        recon = F.mse_loss(vae.decoder(z), images[pick])
        opt.zero_grad(set_to_none=True)
        recon.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps}: recon {recon.item():.5f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval().requires_grad_(False), latents


@torch.no_grad()
def encode_all(vae: SDVAE, images: torch.Tensor, batch: int = 128, process: bool = True) -> torch.Tensor:
    """Posterior means, after process_in (the transformer's x0) unless `process` is False (raw, as decoded)."""
    means = torch.cat([vae.encoder(images[i : i + batch]).chunk(2, dim=1)[0] for i in range(0, len(images), batch)])
    return process_in(means) if process else means


# -- transformer -------------------------------------------------------------------------------------------------


def sincos_2d(size: int, dim: int) -> torch.Tensor:
    """(size*size, dim) 2D sin-cos position table: half the channels for the row, half for the column."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(size, dtype=torch.float64)[:, None] * freqs
    one = torch.cat([pos.sin(), pos.cos()], dim=1)  # (size, dim/2)
    rows = one[:, None, :].expand(size, size, dim // 2)
    cols = one[None, :, :].expand(size, size, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(size * size, dim).float()


@torch.no_grad()
def init_transformer(model: MMDiTX, seed: int) -> MMDiTX:
    """adaLN-Zero initialisation: Xavier Linears with zero biases, timestep MLP N(0, 0.02), every modulation and the
    final projection zero (each block starts as the identity), a fixed 2D sin-cos position table."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for lin in model.t_embedder.mlp[0], model.t_embedder.mlp[2]:
        nn.init.normal_(lin.weight, std=0.02)
    for lin in model._adaln_linears():
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    model.pos_embed.copy_(sincos_2d(model.pos_embed_max_size, model.config.hidden_size)[None])
    return model


def _heads(attn, h: torch.Tensor):
    """q, k, v (B, H, L, Dh) of a SelfAttention, q and k RMS-normalised as the model's split_qkv_rmsnorm does."""
    B, L, _ = h.shape
    q, k, v = attn.qkv(h).view(B, L, 3, attn.num_heads, attn.head_dim).unbind(2)
    if attn.ln_q is not None:
        q, k = attn.ln_q(q), attn.ln_k(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _attend(q, k, v) -> torch.Tensor:
    B, H, L, Dh = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * Dh)


def training_forward(model: MMDiTX, x, t, y, context) -> torch.Tensor:
    """`model(x, t, y, context)` written out of place so that autograd can run through it: the model's own modules
    and reference ops, but fresh tensors where the inference forward reuses its q/k/v and output buffers, and one
    Linear per adaLN modulation instead of the fused matrix. tests/test_tiny_trained.py checks it equals `model`."""
    ops, hw = kernels.REFERENCE_OPS, x.shape[-2:]
    x = model.x_embedder(x) + model.cropped_pos_embed(hw)
    c = F.silu(model.t_embedder(t, x.dtype) + model.y_embedder(y))
    context = model.context_embedder(context)
    B, D = c.shape[0], model.config.hidden_size
    mods = [lin(c).view(B, -1, D) for lin in model._adaln_linears()]
    for i, block in enumerate(model.joint_blocks):
        cb, xb = block.context_block, block.x_block
        c_mods, x_mods = mods[2 * i], mods[2 * i + 1]
        qc, kc, vc = _heads(cb.attn, ops.ln_modulate(context, c_mods[:, 0], c_mods[:, 1]))
        if xb.x_block_self_attn:
            h, h2 = ops.ln_modulate2(x, x_mods[:, 0], x_mods[:, 1], x_mods[:, 6], x_mods[:, 7])
        else:
            h = ops.ln_modulate(x, x_mods[:, 0], x_mods[:, 1])
        qx, kx, vx = _heads(xb.attn, h)
        out = _attend(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))
        n_ctx = context.shape[1]
        attn2 = xb.attn2.proj(_attend(*_heads(xb.attn2, h2))) if xb.x_block_self_attn else None
        new_x = xb.post_attention(x, xb.attn.proj(out[:, n_ctx:]), x_mods, ops, attn2)
        if not cb.pre_only:
            context = cb.post_attention(context, cb.attn.proj(out[:, :n_ctx]), c_mods, ops)
        x = new_x
    final = model.final_layer.linear(ops.ln_modulate(x, mods[-1][:, 0], mods[-1][:, 1]))
    return model.unpatchify(final, hw)


class Conditioning:
    """Every caption's (context, pooled) from the frozen text encoders, plus the empty prompt's (for dropout)."""

    def __init__(self, text, captions: list[str]):
        self.captions = sorted(set(captions))
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.context, self.pooled = text.encode(self.captions + [""])  # "" last: the unconditional row

    def ids(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in captions])


def train_transformer(latents: torch.Tensor, caption_ids: torch.Tensor, cond: Conditioning, steps: int, seed: int, *,
                      shift: float, batch: int = 64, lr: float = 1e-3, warmup: int = 100, ema_decay: float = 0.998,
                      checkpoint=None, every: int = 0, log=print) -> MMDiTX:
    """Rectified-flow training; returns the EMA model. `checkpoint(ema_model, step)` is called every `every` steps."""
    model = init_transformer(MMDiTX(tiny.TRAINED_MMDITX_CONFIG), seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed + 1)
    empty = len(cond.captions)
    start, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        pick = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[pick]
        ids = caption_ids[pick].clone()
        ids[torch.rand(batch, generator=g) < CAPTION_DROPOUT] = empty
        noise = torch.randn(x0.shape, generator=g)
        sigma = shift_sigma(torch.sigmoid(torch.randn(batch, generator=g)), shift)  # logit-normal, shifted
        s = sigma[:, None, None, None]
        xt = s * noise + (1 - s) * x0
        v = training_forward(model, xt, sigma * 1000, cond.pooled[ids], cond.context[ids])
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0 or step == steps:
            log(f"transformer step {step}/{steps}: loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
        if checkpoint is not None and every and step % every == 0 and step < steps:
            checkpoint(ema, step)
    return ema


# -- the model folder --------------------------------------------------------------------------------------------


def write_folder(out: Path, transformer: MMDiTX, vae: SDVAE, text) -> Path:
    """Write the family to `out`, replacing any folder there only once the new one is complete."""
    out = Path(out)
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    transformer._fuse_adaln()  # the EMA copy's per-block adaLN tensors -> one matrix again, as after loading
    tiny.save_model_folder(staging, transformer, vae, text, dtype=torch.float16)  # as the releases: fp16
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def evaluate(folder: Path, n: int = 6, seed: int = 1, log=print) -> float:
    """Mean adherence of `n` generations (captions spread over the dataset) at 64x64 with the tiny preset's settings,
    loaded from `folder` by the same loaders as real checkpoints."""
    from ..pipeline.runner import Pipeline

    pipe = Pipeline.from_pretrained(folder, "tiny", device="cpu", fast=False)
    captions = tiny_scenes.captions()[:: max(1, len(tiny_scenes.captions()) // n)][:n]
    images = pipe(captions, seed=seed, width=tiny_scenes.SIZE, height=tiny_scenes.SIZE, progress=False)
    scores = [tiny_scenes.adherence(im, c) for im, c in zip(images, captions)]
    mean = float(np.mean([s.score for s in scores]))
    shapes = sum(s.best_shape == tiny_scenes.parse_caption(c).shape for s, c in zip(scores, captions))
    log(f"adherence over {n} captions: mean {mean:.3f}, min {min(s.score for s in scores):.3f}, "
        f"shape right {shapes}/{n}")
    return mean


def train(out, *, seed: int = 0, vae_steps: int = 1000, steps: int = 3000, batch: int = 64, every: int = 500,
          evaluate_checkpoints: bool = True, vae_from=None, every_nth_scene: int = 1, log=print) -> Path:
    """The whole recipe: dataset -> VAE -> latents -> transformer -> `out` (written after the VAE, at checkpoints and
    at the end). `vae_from`: reuse the VAE of a model folder or file instead of training one. `every_nth_scene`:
    train on a subset (27 keeps one layout of every caption; for smoke runs)."""
    images, captions = scene_images()
    images, captions = images[::every_nth_scene], captions[::every_nth_scene]
    log(f"{len(images)} scenes, {len(set(captions))} captions")
    if vae_from is None:
        vae, raw = train_vae(images, vae_steps, seed, log=log)
        latents = process_in(raw)
    else:
        vae = load_vae(vae_from, dtype=torch.float32, device="cpu")
        log(f"VAE from {vae_from}")
        latents = encode_all(vae, images)
    log(f"latents {tuple(latents.shape)}: mean {latents.mean().item():+.3f} std {latents.std().item():.3f}")
    from .family import tiny_text_encoders

    text = tiny_text_encoders(seed + TEXT_SEED_OFFSET)
    cond = Conditioning(text, captions)
    shift = get_preset("tiny").shift

    def checkpoint(model, step):
        write_folder(out, model, vae, text)
        log(f"wrote {out} at step {step}")
        if evaluate_checkpoints:
            evaluate(out, log=log)

    write_folder(out, init_transformer(MMDiTX(tiny.TRAINED_MMDITX_CONFIG), seed), vae, text)  # the VAE is kept early
    transformer = train_transformer(latents, cond.ids(captions), cond, steps, seed, shift=shift, batch=batch,
                                    checkpoint=checkpoint, every=every, log=log)
    checkpoint(transformer, steps)
    return Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsd35.tiny.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE decoder steps")
    parser.add_argument("--steps", type=int, default=3000, help="transformer steps")
    parser.add_argument("--batch", type=int, default=64, help="transformer batch size")
    parser.add_argument("--every", type=int, default=500, help="write (and evaluate) the model every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the VAE of this model folder or file")
    parser.add_argument("--no-eval", action="store_true", help="skip the adherence check at each checkpoint")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:7.0f} s] {message}", flush=True)

    train(args.out, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps, batch=args.batch, every=args.every,
          evaluate_checkpoints=not args.no_eval, vae_from=args.vae_from, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
