"""The tiny family's VAE (`family.TRAINED_VAE_CONFIG`): a constructed encoder and a decoder trained to draw the scenes.

The latent is built, not learned: each 8x8 pixel block becomes 16 numbers that mix (a fixed, seeded 16x12 matrix with
orthonormal columns) the mean colours of its four 4x4 sub-blocks. So a latent is a 16x16 RGB picture of the scene
stored 2x2 per position: coarse enough for a small transformer to learn, fine enough that a circle, a square and a
triangle differ in many latent values and not only in the partial colours of their edge blocks (the first tiny
model's latent held one mean colour per 8x8 block: its shapes came out as blobs). The encoder stays this exact map;
the decoder starts as its block-mean inverse and its residual branches learn to draw sharp edges from it.

Why a construction: the SD3 VAE normalises with GroupNorms (32 groups; two channels per group at width 64), which
give any flat colour as +-1. Only `norm_out` (encoder and decoder) stands in the way of the colours, everything else
is residual (`ResnetBlock.conv2`, `AttnBlock.proj_out` zero = identity). Each value c enters its norm group as the pair
(K P + c, K P - c), where P is a fixed pattern made from a constant channel by a convolution's zero padding (a
downsample's bottom/right padding in the encoder, an upsample's top/left padding in the decoder): the group's mean is
K mean(P) and its variance K^2 var(P) + mean(c^2), so the normalised difference of the pair is 2c / (K std(P)) to
within mean(c^2) / (2 K^2 var(P)) (< 1%): the value, linearly. conv_out reads that difference with one gain per value,
fitted by least squares on the scenes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..models.vae import LATENT_SCALE, SDVAE, AttnBlock, ResnetBlock, process_in

LOGVAR_TARGET = 2 * math.log(0.05)  # a posterior std of 0.05 in raw latent units
REFERENCE = 20.0  # K: the amplitude of the pattern that gives each value-carrying norm group its scale
SILU_AT = 8.0  # the norm_out bias that puts both channels of a pair where SiLU is almost the identity
SUB = 2  # sub-blocks per latent position and side: 2x2 sub-blocks of 4x4 pixels
LATENT_STD = 1.0  # the std the latents have after process_in (what the transformer sees)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(2 * k, 2 * k + 1) for k in range(n)]


def mixing_matrix(latent_channels: int, seed: int) -> torch.Tensor:
    """(latent_channels, 3 * SUB^2): orthonormal columns from a seeded Gaussian matrix (QR, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(latent_channels, 3 * SUB * SUB, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def sub_block_means(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3 * SUB^2, H/8, W/8): channel 3 * (SUB * sy + sx) + colour... ordered (colour, sy, sx)."""
    B, C, H, W = images.shape
    means = F.avg_pool2d(images, 8 // SUB)  # (B, 3, H/4, W/4)
    means = means.view(B, C, H // 8, SUB, W // 8, SUB).permute(0, 1, 3, 5, 2, 4)
    return means.reshape(B, C * SUB * SUB, H // 8, W // 8)


def block_means(values: torch.Tensor) -> torch.Tensor:
    """Sub-block values (B, 3 * SUB^2, h, w) -> the 8x8-block mean colours (B, 3, h, w)."""
    B, _, h, w = values.shape
    return values.view(B, 3, SUB * SUB, h, w).mean(2)


def build(images: torch.Tensor, seed: int) -> SDVAE:
    """A `TRAINED_VAE_CONFIG` VAE with seeded initial weights, constructed (`construct_`) with gains fitted on 20 of
    `images` spread over them (plenty: the gains depend on the patterns' statistics, not on the scenes)."""
    from .family import TRAINED_VAE_CONFIG

    torch.manual_seed(seed)  # the residual branches' first convolutions keep PyTorch's (seeded) initialisation
    vae = SDVAE(TRAINED_VAE_CONFIG).eval().requires_grad_(False)
    return construct_(vae, images[:: -(-len(images) // 20)], seed)


@torch.no_grad()
def construct_(vae: SDVAE, images: torch.Tensor, seed: int) -> SDVAE:
    """Set `vae` to the exact sub-block encoder and its block-mean decoder (see the module docstring): the encoder's
    posterior mean is `mixing_matrix(seed)` times the sub-block means, scaled so that process_in gives latents of std
    about LATENT_STD on `images`, the log-variance LOGVAR_TARGET; the decoder repeats each block's mean colour over the
    block and carries the unmixed sub-block values in spare channels for its residual branches; every residual
    branch is zero. Gains are fitted on `images` (the patterns' statistics are those of a 64x64 image: other sizes
    shift the colours slightly)."""
    cfg, (enc, dec) = vae.config, (vae.encoder, vae.decoder)
    C, n = cfg.ch, 3 * SUB * SUB
    if any(c != C for c in cfg.channels) or C != 2 * cfg.norm_groups or len(cfg.ch_mult) != 4:
        raise ValueError(f"the tiny VAE construction needs 4 levels of equal width, two channels per norm group: {cfg}")
    if 2 * n + 1 + n > C or cfg.latent_channels < n:
        raise ValueError(f"the tiny VAE construction needs {3 * n + 1} channels and {n} latent channels: {cfg}")
    ref = C - 1  # the constant channel
    colour, subs = _pairs(3), _pairs(n)  # encoder pairs before / after the sub-block split
    detail = range(2 * 3 + 1, 2 * 3 + 1 + n)  # decoder channels carrying the unmixed sub-block values

    def clear(conv):
        conv.weight.zero_()
        conv.bias.zero_()

    for m in vae.modules():
        if isinstance(m, ResnetBlock):
            clear(m.conv2)
        elif isinstance(m, AttnBlock):
            clear(m.proj_out)

    # encoder: rgb -> (+c, -c) pairs and the constant channel; 2x2 means twice (64 -> 16 px); then each 2x2 group
    # of 4x4-pixel means goes to its own pair (a stride-2 conv's taps (sy, sx)), with the pattern from the constant
    # channel's tap that reads the bottom/right padding.
    clear(enc.conv_in)
    for i, (a, b) in enumerate(colour):
        enc.conv_in.weight[a, i, 1, 1], enc.conv_in.weight[b, i, 1, 1] = 1.0, -1.0
    enc.conv_in.bias[ref] = 1.0
    for level in enc.down[:2]:
        clear(level.downsample.conv)
        level.downsample.conv.weight[range(C), range(C), :2, :2] = 0.25
    split = enc.down[2].downsample.conv
    clear(split)
    for i, (a, b) in enumerate(colour):
        for sy in range(SUB):
            for sx in range(SUB):
                sa, sb = subs[(i * SUB + sy) * SUB + sx]
                split.weight[sa, a, sy, sx], split.weight[sb, b, sy, sx] = 1.0, 1.0
    for channel in (c for pair in subs for c in pair):
        split.weight[channel, ref, 2, 2] = REFERENCE
    split.weight[ref, ref, 0, 0] = 1.0
    mix = mixing_matrix(cfg.latent_channels, seed)
    half = cfg.latent_channels
    for side in (enc, dec):
        side.norm_out.weight.fill_(1.0)
        side.norm_out.bias.fill_(SILU_AT)
        clear(side.conv_out)
    enc.conv_out.bias[half:] = LOGVAR_TARGET
    for k, (a, b) in enumerate(subs):
        enc.conv_out.weight[:half, a, 1, 1], enc.conv_out.weight[:half, b, 1, 1] = mix[:, k], -mix[:, k]
    # one gain per value: least squares against the true sub-block means, then one scale for the latent's std
    want = sub_block_means(images)
    got = torch.einsum("lk,blhw->bkhw", mix, enc(images)[:, :half])
    gains = (got * want).sum((0, 2, 3)) / (got * got).sum((0, 2, 3))
    scale = LATENT_STD / (process_in(torch.einsum("lk,bkhw->blhw", mix, want)).std().item())
    for k, (a, b) in enumerate(subs):
        enc.conv_out.weight[:half, a] *= gains[k] * scale
        enc.conv_out.weight[:half, b] *= gains[k] * scale

    # decoder: latent -> block-mean pairs, the constant channel and the sub-block values; nearest x2 and the identity
    # at every upsample, with the pattern from the top/left padding of the first one.
    unmix = mix.T / scale  # (n, latent): the sub-block values from a raw latent
    clear(dec.conv_in)
    mean_of = unmix.view(3, SUB * SUB, -1).mean(1)  # (3, latent): block-mean colours
    for i, (a, b) in enumerate(colour):
        dec.conv_in.weight[a, :, 1, 1], dec.conv_in.weight[b, :, 1, 1] = mean_of[i], -mean_of[i]
    for k, channel in enumerate(detail):
        dec.conv_in.weight[channel, :, 1, 1] = unmix[k]
    dec.conv_in.bias[ref] = 1.0
    for level in dec.up:
        if level.upsample is not None:
            clear(level.upsample.conv)
            level.upsample.conv.weight[range(C), range(C), 1, 1] = 1.0
    first = dec.up[-1].upsample.conv
    for channel in (c for pair in colour for c in pair):
        first.weight[channel, ref, 0, 0] = REFERENCE
    for i, (a, b) in enumerate(colour):
        dec.conv_out.weight[i, a, 1, 1], dec.conv_out.weight[i, b, 1, 1] = 1.0, -1.0
    got = dec(enc(images)[:, :half])
    want = F.interpolate(block_means(sub_block_means(images)), scale_factor=8, mode="nearest")
    gains = (got * want).sum((0, 2, 3)) / (got * got).sum((0, 2, 3))
    dec.conv_out.weight *= gains[:, None, None, None]
    return vae


@torch.no_grad()
def encode_all(vae: SDVAE, images: torch.Tensor, batch: int = 128, process: bool = True) -> torch.Tensor:
    """Posterior means, after process_in (the transformer's x0) unless `process` is False (raw, as decoded)."""
    means = torch.cat([vae.encoder(images[i : i + batch]).chunk(2, dim=1)[0] for i in range(0, len(images), batch)])
    return process_in(means) if process else means


def train_decoder(vae: SDVAE, images: torch.Tensor, steps: int, seed: int, *, batch: int = 8, lr: float = 5e-4,
                  latent_noise: float = 0.2, log=print) -> SDVAE:
    """The decoder's residual branches (ResnetBlocks, the mid attention) learn to draw `images` from their latents
    with `latent_noise` (std, after process_in) added, as the transformer's latents will not be exact: sharp edges
    instead of 8x8 blocks, and the scenes' straight edges from latents a little off (measured with the shipped
    transformer over 8 captions x 12 seeds, by `judge`: the shape right in 65 of 96 images with 0.05, 71 with 0.2, and
    no better with 0.3). The encoder and the value path (conv_in/out, resampling, norm_out) stay as constructed:
    trained, they drift from the colours before the edges improve. AdamW with a linear warm-up and cosine decay."""
    torch.manual_seed(seed)
    latents = encode_all(vae, images, process=False)
    branches = [p for m in vae.decoder.modules() if isinstance(m, (ResnetBlock, AttnBlock)) for p in m.parameters()]
    vae.requires_grad_(False)
    for p in branches:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(branches, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps)
        pick = torch.randint(len(images), (batch,), generator=g)
        noise = torch.randn(latents[pick].shape, generator=g) * (latent_noise / LATENT_SCALE)
        loss = F.mse_loss(vae.decoder(latents[pick] + noise), images[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps}: recon {running:.5f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


def schedule(step: int, steps: int, warmup: int = 50) -> float:
    """The learning-rate factor at `step` of `steps`: linear warm-up over `warmup` steps, then a cosine to 10%."""
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
