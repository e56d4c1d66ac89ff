"""Train the tiny SD3 family on `fastsd35.tiny_scenes` and write it as a model folder in the official layout:

    python -m fastsd35.train_tiny --out DIR                      # the full recipe (seed 0)
    python -m fastsd35.train_tiny --out DIR --vae-steps 2 --steps 2    # a smoke run

1. The VAE (`tiny.TRAINED_VAE_CONFIG`, 16 latent channels) learns to autoencode the scenes, its posterior sampled as
   at inference, with two light penalties: the latent after `process_in` has mean 0 and std 1 over a batch (so the
   fixed SD3 latent scale and shift fit it) and the posterior log-variance stays near a small fixed value.
2. The text encoders are the random-weight tiny CLIP-L / CLIP-G / T5 (`tiny_text_encoders`), frozen: every caption's
   context and pooled vectors are computed once.
3. The transformer (`tiny.TRAINED_MMDITX_CONFIG`) learns the SD3 objective: rectified flow x = sigma*noise +
   (1-sigma)*x0 with target v = noise - x0 (the samplers denoise with x - v*sigma), sigma = the preset's shift applied
   to a logit-normal t, the caption replaced by the empty prompt 10% of the time for CFG. The weights written are
   an exponential moving average.

Everything is seeded: the same seed and step counts give the same files on the same torch build. The folder loads
with `Pipeline.from_pretrained(DIR, "tiny")` / `fastsd35 run --preset tiny --model DIR --width 64 --height 64`, and
each checkpoint is scored with `tiny_scenes.adherence`.

Status: the pipeline of this recipe runs end to end, but its VAE does not yet learn the scenes' colors within the
default steps (see `train_vae`), so no trained family ships yet and `--preset tiny` stays random-weight.
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

from . import kernels, tiny, tiny_scenes
from .model import MMDiTX
from .presets import get_preset
from .sampling import shift_sigma
from .vae import SDVAE, load_vae, process_in

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


def train_vae(images: torch.Tensor, steps: int, seed: int, batch: int = 8, crop: int = 16, lr: float = 5e-4,
              log=print) -> SDVAE:
    """The VAE is convolutional apart from its small mid-block attention: it trains on `crop`-pixel crops at offsets
    that are multiples of 8 (latent-aligned), a sixteenth of the work of whole 64x64 scenes.

    Measured with seed 0 and 300 steps (whole-scene reconstruction MSE in [-1, 1]; < 0.01 would be needed): 0.23 at
    lr 5e-4, 0.43 at lr 2e-3; 32 channels (one per norm group) plateaued at 0.27-0.37 with colors wrong."""
    torch.manual_seed(seed)
    vae = SDVAE(tiny.TRAINED_VAE_CONFIG).train()
    with torch.no_grad():  # start with a narrow posterior: a std of 1 would drown the latent the decoder learns from
        half = vae.config.latent_channels
        vae.encoder.conv_out.weight[half:] *= 0.01
        vae.encoder.conv_out.bias[half:] = LOGVAR_TARGET
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        top, left = (8 * torch.randint((images.shape[-1] - crop) // 8 + 1, (2,), generator=g)).tolist()
        x = images[torch.randint(len(images), (batch,), generator=g), :, top : top + crop, left : left + crop]
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        recon = F.mse_loss(vae.decoder(z), x)
        latent = process_in(mean)
        stats = latent.mean() ** 2 + (latent.std() - 1) ** 2
        loss = recon + 0.01 * stats + 0.001 * ((logvar - LOGVAR_TARGET) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps}: recon {recon.item():.5f} latent mean {latent.mean().item():+.3f} "
                f"std {latent.std().item():.3f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: SDVAE, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Posterior means after process_in: the transformer's x0."""
    return torch.cat([process_in(vae.encode(images[i : i + batch])) for i in range(0, len(images), batch)])


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
    tiny.save_model_folder(staging, transformer, vae, text)
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
    from .runner import Pipeline

    pipe = Pipeline.from_pretrained(folder, "tiny", device="cpu", fast=False)
    captions = tiny_scenes.captions()[:: max(1, len(tiny_scenes.captions()) // n)][:n]
    images = pipe(captions, seed=seed, width=tiny_scenes.SIZE, height=tiny_scenes.SIZE, progress=False)
    scores = [tiny_scenes.adherence(im, c) for im, c in zip(images, captions)]
    mean = float(np.mean([s.score for s in scores]))
    shapes = sum(s.best_shape == tiny_scenes.parse_caption(c).shape for s, c in zip(scores, captions))
    log(f"adherence over {n} captions: mean {mean:.3f}, min {min(s.score for s in scores):.3f}, "
        f"shape right {shapes}/{n}")
    return mean


def train(out, *, seed: int = 0, vae_steps: int = 300, steps: int = 3000, batch: int = 64, every: int = 200,
          evaluate_checkpoints: bool = True, vae_from=None, every_nth_scene: int = 1, log=print) -> Path:
    """The whole recipe: dataset -> VAE -> latents -> transformer -> `out` (written after the VAE, at checkpoints and
    at the end). `vae_from`: reuse the VAE of a model folder or file instead of training one. `every_nth_scene`:
    train on a subset (27 keeps one layout of every caption; for smoke runs)."""
    images, captions = scene_images()
    images, captions = images[::every_nth_scene], captions[::every_nth_scene]
    log(f"{len(images)} scenes, {len(set(captions))} captions")
    if vae_from is None:
        vae = train_vae(images, vae_steps, seed, log=log)
    else:
        vae = load_vae(vae_from, dtype=torch.float32, device="cpu")
        log(f"VAE from {vae_from}")
    latents = encode_all(vae, images)
    log(f"latents {tuple(latents.shape)}: mean {latents.mean().item():+.3f} std {latents.std().item():.3f}")
    from .conditioning import tiny_text_encoders

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
    parser = argparse.ArgumentParser(prog="python -m fastsd35.train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3000, help="transformer steps")
    parser.add_argument("--batch", type=int, default=64, help="transformer batch size")
    parser.add_argument("--every", type=int, default=200, help="write (and evaluate) the model every N steps")
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
