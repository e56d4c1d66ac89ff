"""Train the tiny SD3 family on `fastsd35.tiny.scenes` and write it as a model folder in the official layout:

    python -m fastsd35.tiny.train --out fastsd35/tiny/trained           # the shipped model (seed 0; README: time)
    python -m fastsd35.tiny.train --out DIR --vae-steps 2 --steps 2    # a smoke run

1. The VAE (`tiny.TRAINED_VAE_CONFIG`, 16 latent channels, factor 8): a constructed encoder whose latent holds the
   mean colours of each 8x8 block's four 4x4 sub-blocks, and a decoder that starts as its block-mean inverse and
   learns to draw the scenes' sharp edges (`fastsd35.tiny.autoencoder`).
2. The text encoders are the random-weight tiny CLIP-L / CLIP-G / T5 (`tiny_text_encoders`), frozen: every caption's
   context and pooled vectors are computed once.
3. The transformer (`tiny.TRAINED_MMDITX_CONFIG`: 4 blocks) learns the SD3 objective: rectified flow x = sigma*noise +
   (1-sigma)*x0 with target v = noise - x0 (the samplers denoise with x - v*sigma), sigma = the preset's shift applied
   to a logit-normal t, the caption replaced by the empty prompt 10% of the time for CFG; AdamW with a warm-up and a
   cosine decay. The weights written are an exponential moving average.

The decoder trains in a second process beside the transformer (the transformer needs only the constructed encoder),
each process on one thread: everything is seeded, so the same seed and steps give the same files on the same torch
build and CPU kind, whatever the core count (GEMM results depend on the thread count). The files are fp16, as the releases; the folder loads with
`Pipeline.from_pretrained(DIR, "tiny")` / `fastsd35 run --preset tiny --model DIR`, and each checkpoint is judged
with `tiny_scenes.judge` (colours and shapes) and `tiny_scenes.adherence`. `--preset tiny` without `--model` loads the
copy shipped in the package (`tiny.TRAINED_MODEL_DIR`).
"""

from __future__ import annotations

import argparse
import copy
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
from ..models.vae import SDVAE
from ..pipeline.presets import get_preset
from ..pipeline.sampling import shift_sigma
from ..weights.vae import load_vae
from . import family as tiny
from . import scenes as tiny_scenes
from .autoencoder import build as build_vae
from .autoencoder import encode_all, schedule, train_decoder

TEXT_SEED_OFFSET = 2  # the text encoders are tiny_text_encoders(seed + 2), as in tiny.tiny_components
CAPTION_DROPOUT = 0.1
# The recipe (README "The tiny model" gives its time): VAE decoder steps, transformer steps and batch, checkpoints.
VAE_STEPS, STEPS, BATCH, EVERY = 600, 1800, 32, 600


# -- data --------------------------------------------------------------------------------------------------------


def scene_images(every_nth: int = 1) -> tuple[torch.Tensor, list[str]]:
    """The dataset (every `every_nth` scene) as (N, 3, 64, 64) float32 in [-1, 1] and the N captions."""
    scenes = tiny_scenes.all_scenes()[::every_nth]
    pixels = np.stack([s.render() for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


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
                      shift: float, batch: int = 32, lr: float = 1e-3, warmup: int = 100, ema_decay: float = 0.998,
                      checkpoint=None, every: int = 0, config=None, log=print) -> MMDiTX:
    """Rectified-flow training; returns the EMA model. `checkpoint(ema_model, step)` is called every `every` steps."""
    model = init_transformer(MMDiTX(config or tiny.TRAINED_MMDITX_CONFIG), seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed + 1)
    empty = len(cond.captions)
    start, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup)
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


def evaluate(folder: Path, seeds=(23,), grid: Path | None = None, log=print) -> dict:
    """Generate each of `tiny_scenes.CHECK_CAPTIONS` for `seeds` (one batch per caption: seed, seed + 1, ... must be
    consecutive) at 64x64 with the tiny preset's settings, loaded from `folder` by the same loaders as real
    checkpoints, and judge them: the fractions with the colours right and with the shape right (`tiny_scenes.judge`)
    and the mean `adherence`. `grid`: also write the images there as a PNG, a column per caption and a row per seed,
    at twice their size."""
    from ..pipeline.runner import Pipeline

    seeds = list(seeds)
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds must be consecutive (one batch per caption), got {seeds}")
    pipe = Pipeline.from_pretrained(folder, "tiny", device="cpu", fast=False)
    captions = list(tiny_scenes.CHECK_CAPTIONS)
    images = [pipe(caption, seed=seeds[0], batch_size=len(seeds), progress=False) for caption in captions]
    colours = shapes = 0
    scores = []
    for caption, column in zip(captions, images):
        for image in column:
            judged = tiny_scenes.judge(image, caption)
            colours += judged.colours_right
            shapes += judged.shape == tiny_scenes.parse_caption(caption).shape
            scores.append(tiny_scenes.adherence(image, caption).score)
    n = len(scores)
    result = dict(colours=colours / n, shapes=shapes / n, adherence=float(np.mean(scores)))
    log(f"{n} images: colours right {colours}/{n}, shape right {shapes}/{n}, mean adherence {result['adherence']:.3f}")
    if grid is not None:
        write_grid(grid, images)
        log(f"wrote {grid}")
    return result


def write_grid(path: Path, columns, gap: int = 4, zoom: int = 2) -> Path:
    """Lay out columns of equal-size images side by side on white, `gap` pixels apart, enlarged `zoom` times."""
    from PIL import Image

    w, h = columns[0][0].size
    rows = max(len(c) for c in columns)
    sheet = Image.new("RGB", (len(columns) * (w + gap) - gap, rows * (h + gap) - gap), "white")
    for i, column in enumerate(columns):
        for j, image in enumerate(column):
            sheet.paste(image, (i * (w + gap), j * (h + gap)))
    sheet = sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.Resampling.NEAREST)
    sheet.save(path)
    return Path(path)


def train(out, *, seed: int = 0, vae_steps: int = VAE_STEPS, steps: int = STEPS, batch: int = BATCH,
          every: int = EVERY, evaluate_checkpoints: bool = True, vae_from=None, every_nth_scene: int = 1,
          parallel: bool = True, log=print) -> Path:
    """The whole recipe: dataset -> VAE -> latents -> transformer -> `out` (written at checkpoints and at the end).

    The transformer's latents need only the VAE's constructed encoder, so the decoder trains meanwhile in a second
    process (`parallel`; inline otherwise: the same bytes, one after the other), each single-threaded: deterministic
    whatever the machine's core count, and the two cores of a small machine both busy. Checkpoints before the decoder
    is done carry the constructed block-mean decoder. `vae_from`: reuse the VAE of a model folder or file instead.
    `every_nth_scene`: train on a subset (3 keeps one size of every caption, 9 one scene of every colour pair; for
    smoke runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(Path(out), seed, vae_steps, steps, batch, every, evaluate_checkpoints, vae_from, every_nth_scene,
                      parallel, log)
    finally:
        torch.set_num_threads(threads)


def _train(out, seed, vae_steps, steps, batch, every, evaluate_checkpoints, vae_from, every_nth_scene, parallel, log):
    images, captions = scene_images(every_nth_scene)
    log(f"{len(images)} scenes, {len(set(captions))} captions")
    decoder = None
    if vae_from is not None:
        vae = load_vae(vae_from, dtype=torch.float32, device="cpu")
        log(f"VAE from {vae_from}")
    elif parallel:
        vae = build_vae(images, seed)
        decoder = DecoderProcess(seed, vae_steps, every_nth_scene)
    else:
        vae = train_decoder(build_vae(images, seed), images, vae_steps, seed, log=log)
    try:
        latents = encode_all(vae, images)
        log(f"latents {tuple(latents.shape)}: mean {latents.mean().item():+.3f} std {latents.std().item():.3f}")
        text = tiny.tiny_text_encoders(seed + TEXT_SEED_OFFSET)
        cond = Conditioning(text, captions)

        def checkpoint(model, step):
            if decoder is not None:
                decoder.relay(log)
                if decoder.ready():
                    decoder.load_into(vae)
            write_folder(out, model, vae, text)
            log(f"wrote {out} at step {step}")
            if evaluate_checkpoints:
                evaluate(out, log=log)

        transformer = train_transformer(latents, cond.ids(captions), cond, steps, seed, shift=get_preset("tiny").shift,
                                        batch=batch, checkpoint=checkpoint, every=every, log=log)
        if decoder is not None:
            decoder.load_into(vae)  # waits for it
            decoder.relay(log)
        checkpoint(transformer, steps)
    finally:
        if decoder is not None:
            decoder.close()
    return out


class DecoderProcess:
    """`train_decoder` in a spawned, single-threaded process (`_decoder_main`), which writes the trained decoder to a
    temporary safetensors file for `load_into` and its log lines to a file for `relay`."""

    def __init__(self, seed: int, steps: int, every_nth_scene: int):
        import multiprocessing
        import tempfile

        self.folder = tempfile.TemporaryDirectory(prefix="fastsd35-tiny-decoder-")
        self.path = Path(self.folder.name) / "decoder.safetensors"
        self.log_path, self.relayed = Path(self.folder.name) / "log.txt", 0
        self.process = multiprocessing.get_context("spawn").Process(
            target=_decoder_main, args=(seed, steps, every_nth_scene, str(self.path), str(self.log_path)), daemon=True)
        self.process.start()
        self.loaded = False

    def ready(self) -> bool:
        return not self.process.is_alive()

    def relay(self, log):
        """Pass the process's log lines written since the last call to `log`."""
        lines = self.log_path.read_text().splitlines() if self.log_path.is_file() else []
        for line in lines[self.relayed :]:
            log(f"VAE process: {line}")
        self.relayed = len(lines)

    def load_into(self, vae: SDVAE):
        """Wait for the process, then load its decoder into `vae` (RuntimeError when it failed)."""
        if self.loaded:
            return
        self.process.join()
        if self.process.exitcode != 0 or not self.path.is_file():
            raise RuntimeError(f"the VAE decoder's training process failed (exit code {self.process.exitcode})")
        from safetensors.torch import load_file

        vae.decoder.load_state_dict(load_file(str(self.path)))
        self.loaded = True

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.folder.cleanup()


def _decoder_main(seed: int, steps: int, every_nth_scene: int, path: str, log_path: str):
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    images, _ = scene_images(every_nth_scene)
    with open(log_path, "a", buffering=1) as log_file:
        vae = train_decoder(build_vae(images, seed), images, steps, seed, log=lambda line: print(line, file=log_file))
    save_file({k: v.contiguous() for k, v in vae.decoder.state_dict().items()}, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsd35.tiny.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="model folder to write")
    parser.add_argument("--evaluate", type=Path, metavar="DIR",
                        help="train nothing: judge the model folder DIR on the check captions (seeds 23-25)")
    parser.add_argument("--grid", type=Path, help="with --evaluate: also write the images there as one PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="VAE decoder steps")
    parser.add_argument("--steps", type=int, default=STEPS, help="transformer steps")
    parser.add_argument("--batch", type=int, default=BATCH, help="transformer batch size")
    parser.add_argument("--every", type=int, default=EVERY, help="write (and evaluate) the model every N steps")
    parser.add_argument("--inline", action="store_true",
                        help="train the VAE decoder before the transformer instead of beside it (the same result)")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the VAE of this model folder or file")
    parser.add_argument("--no-eval", action="store_true", help="skip the adherence check at each checkpoint")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.evaluate is None) or (args.grid and not args.evaluate):
        parser.error("give --out DIR to train, or --evaluate DIR (optionally with --grid PNG) to judge a model")
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:7.0f} s] {message}", flush=True)

    if args.evaluate:
        evaluate(args.evaluate, seeds=(23, 24, 25), grid=args.grid, log=log)
        return 0
    train(args.out, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps, batch=args.batch, every=args.every,
          evaluate_checkpoints=not args.no_eval, vae_from=args.vae_from, parallel=not args.inline, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
