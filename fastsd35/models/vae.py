"""The SD3 VAE: a KL autoencoder with 16 latent channels and no quant convs (SPEC.md §7), in the official key layout
(without `first_stage_model.`), plus the latent format (§5.5) and image <-> tensor conversion. Loading is
fastsd35.weights.vae.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError
from .strict import StrictLoading

LATENT_SCALE = 1.5305
LATENT_SHIFT = 0.0609


def process_in(z: torch.Tensor) -> torch.Tensor:
    """VAE latent -> the transformer's latent space (after encode)."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def process_out(z: torch.Tensor) -> torch.Tensor:
    """The transformer's latent space -> VAE latent (before decode)."""
    return z / LATENT_SCALE + LATENT_SHIFT


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # level l has ch * ch_mult[l] channels; every level but the last halves H, W
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more
    latent_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(f"a VAE needs at least one level and one block per level: {self}")
        bad = [c for c in (self.ch, *self.channels) if c % self.norm_groups]
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "state dict") -> "VAEConfig":
        """Infer the config from official-layout tensor shapes (groups cannot be seen in shapes: 32). Raises
        CheckpointError."""
        for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
            if key not in shapes:
                raise CheckpointError(f"{source}: not an SD3 VAE: key '{key}' is missing")
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        widths = {int(m[1]): shapes[k][0] for k in shapes if (m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight", k))}
        blocks = [k for k in shapes if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k)]
        try:
            return cls(
                ch=ch,
                ch_mult=tuple(widths[level] // ch for level in sorted(widths)),
                num_res_blocks=len(blocks),
                latent_channels=shapes["decoder.conv_in.weight"][1],
                in_channels=in_channels,
                out_channels=shapes["decoder.conv_out.weight"][0],
            )
        except ValueError as e:
            raise CheckpointError(f"{source}: not an SD3 VAE: {e}") from None



# ----------------------------------------------------------------------------------------------------------------
# Modules (names = the official keys)


def _norm(channels: int, groups: int, **f) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, **f)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, **f):
        super().__init__()
        self.norm1 = _norm(c_in, groups, **f)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, **f)
        self.norm2 = _norm(c_out, groups, **f)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, **f)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, **f) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions; q, k, v and the output projection are 1x1 convs."""

    def __init__(self, channels: int, groups: int, **f):
        super().__init__()
        self.norm = _norm(channels, groups, **f)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1, **f) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C ** -0.5
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int, **f):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, **f)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int, **f):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **f)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, **f):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, **f)
        self.attn_1 = AttnBlock(channels, groups, **f)
        self.block_2 = ResnetBlock(channels, channels, groups, **f)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResnetBlocks `block.{i}`, then an optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: str | None = None, **f):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups, **f) for i in range(n_blocks))
        self.downsample = Downsample(c_out, **f) if resample == "downsample" else None
        self.upsample = Upsample(c_out, **f) if resample == "upsample" else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig, **f):
        super().__init__()
        chans, g, last = config.channels, config.norm_groups, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1, **f)
        c_ins = (config.ch, *chans[:-1])
        self.down = nn.ModuleList(
            Level(c_ins[l], chans[l], config.num_res_blocks, g, "downsample" if l < last else None, **f)
            for l in range(last + 1)
        )
        self.mid = MidBlock(chans[-1], g, **f)
        self.norm_out = _norm(chans[-1], g, **f)
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1, **f)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig, **f):
        super().__init__()
        chans, g = config.channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.latent_channels, chans[-1], 3, padding=1, **f)
        self.mid = MidBlock(chans[-1], g, **f)
        # up.{l} works at the resolution of encoder level l; they run from the last level down to 0
        c_ins = (*chans[1:], chans[-1])
        self.up = nn.ModuleList(
            Level(c_ins[l], chans[l], config.num_res_blocks + 1, g, "upsample" if l > 0 else None, **f)
            for l in range(len(chans))
        )
        self.norm_out = _norm(chans[0], g, **f)
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, 3, padding=1, **f)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class SDVAE(StrictLoading, nn.Module):
    """The SD3 VAE. State dict keys are the official ones without `first_stage_model.`. Inputs are cast to the module's
    device and dtype; outputs are in the module's dtype."""

    def __init__(self, config: VAEConfig | None = None, *, dtype=None, device=None):
        super().__init__()
        self.config = config or VAEConfig()
        f = dict(dtype=dtype, device=device)
        self.encoder = Encoder(self.config, **f)
        self.decoder = Decoder(self.config, **f)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> raw latent (B, 16, H/8, W/8), before `process_in`.

        With a `generator` (a CPU torch.Generator) this samples the posterior as the reference does,
        mean + exp(0.5 * clamp(logvar, -30, 20)) * noise, with the noise drawn in float32 on the CPU, so a seed gives the
        same latent on any device. With `generator=None` it returns the posterior mean (deterministic; the reference
        always samples, from an unseeded RNG)."""
        moments = self.encoder(self._prepare(image, self.config.in_channels, "image"))
        mean, logvar = moments.float().chunk(2, dim=1)
        if generator is None:
            return mean.to(self.dtype)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * noise.to(mean.device)).to(self.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, 16, h, w), after `process_out` -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self._prepare(latent, self.config.latent_channels, "latent"))


# ----------------------------------------------------------------------------------------------------------------
# Images


def image_to_tensor(image: Image.Image, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) float32 in [-1, 1], resized with LANCZOS to width x height when given and different
    (the reference's img2img input path)."""
    image = image.convert("RGB")
    size = (width or image.width, height or image.height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (2.0 * x - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Decoded (B, 3, H, W) -> B RGB images. Like the reference, values are truncated to 8 bits, not rounded (diffusers
    rounds, so its PNGs can differ by 1)."""
    x = torch.clamp((x.detach().float().cpu() + 1.0) / 2.0, 0.0, 1.0)
    pixels = (255.0 * x).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]
