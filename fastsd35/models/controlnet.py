"""SD3.5 ControlNets (SPEC.md §8): the reference's `ControlNetEmbedder` in the official key layout of the released
files. Loading is fastsd35.weights.controlnet; the control image -> latent path and preprocessing for photos are
fastsd35.pipeline.control.

Two kinds exist in the reference. The released "8B" ControlNets (for SD3.5 Large) take the raw pooled text and the
main transformer's patch embedding + position table, and chain their blocks. The "2B" code path (nothing released)
patch-embeds the latent itself, takes the pooled text through the transformer's y_embedder, and feeds the same
input to every block. The blocks are the transformer's single-stream adaLN-Zero blocks, run through the
transformer's op set: with a FastMMDiTX the ControlNet runs on the Triton kernels too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, FastSD35Error
from .mmditx import FREQ_DIM, HEAD_DIM, DismantledBlock, MMDiTX, PatchEmbed
from .strict import StrictLoading

# The SD3.5 Large ControlNets' kinds, by the id their `control_type` tensor holds (never read from a file name).
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}
CANNY = 1  # the control type whose 8B pixels are scaled a*255*0.5+0.5 instead of 2a-1


_REQUIRED = (  # keys every SD3.5 ControlNet has
    "pos_embed_input.proj.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.qkv.weight",
)


@dataclass(frozen=True)
class ControlNetConfig:
    num_layers: int
    hidden_size: int  # = the transformer's (64 * its depth)
    pooled_dim: int  # 2048 (the raw pooled text) for 8B; hidden_size (via the transformer's y_embedder) for 2B
    patch_size: int = 2
    in_channels: int = 16

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def is_8b(self) -> bool:
        """The reference tests `pooled width == 2048`; a 2B ControlNet's pooled input is the hidden size, so this is the
        same test for every real size and also holds for tiny models."""
        return self.pooled_dim != self.hidden_size

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "state dict") -> "ControlNetConfig":
        """Infer the config from official-layout tensor shapes. Raises CheckpointError."""
        for key in _REQUIRED:
            if key not in shapes:
                raise CheckpointError(f"{source}: not an SD3.5 ControlNet: key '{key}' is missing")
        if "context_embedder.weight" in shapes:
            raise CheckpointError(
                f"{source}: a ControlNet with its own text context (the InstantX SD3 kind); fastsd35 runs the SD3.5 "
                "ControlNets (blur, canny, depth)"
            )
        hidden, in_channels, patch, _ = shapes["pos_embed_input.proj.weight"]
        if hidden % HEAD_DIM:
            raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of {HEAD_DIM}")
        blocks = [int(m[1]) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
        return cls(
            num_layers=max(blocks) + 1,
            hidden_size=hidden,
            pooled_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            patch_size=patch,
            in_channels=in_channels,
        )


# The released ControlNets (blur, canny, depth), all for SD3.5 Large.
SD35_LARGE_CONTROLNET = ControlNetConfig(num_layers=19, hidden_size=2432, pooled_dim=2048)


class _Mlp(nn.Module):
    """Linear -> SiLU -> Linear under the names the ControlNet files use (linear_1, linear_2)."""

    def __init__(self, in_dim, hidden, **factory):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden, **factory)
        self.linear_2 = nn.Linear(hidden, hidden, **factory)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, hidden, pooled_dim, **factory):
        super().__init__()
        self.timestep_embedder = _Mlp(FREQ_DIM, hidden, **factory)
        self.text_embedder = _Mlp(pooled_dim, hidden, **factory)


class ControlNet(StrictLoading, nn.Module):
    """An SD3.5 ControlNet. State dict keys are those of the released files: `transformer_blocks.{i}.*`,
    `controlnet_blocks.{i}`, `pos_embed_input.proj`, `time_text_embed.{timestep,text}_embedder.linear_{1,2}`,
    `control_type` (int32: 0 blur, 1 canny, 2 depth) and, for the 2B kind only, `pos_embed.proj`."""

    def __init__(self, config: ControlNetConfig, *, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.source = "ControlNet"  # named in errors; load_controlnet sets the file
        f = dict(dtype=dtype, device=device)
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        self.transformer_blocks = nn.ModuleList(
            DismantledBlock(D, config.num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=None, **f)
            for _ in range(config.num_layers)
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D, **f) for _ in range(config.num_layers))
        self.pos_embed_input = PatchEmbed(C, D, p, **f)
        self.time_text_embed = _TimeTextEmbed(D, config.pooled_dim, **f)
        self.pos_embed = None if config.is_8b else PatchEmbed(C, D, p, **f)
        self.register_buffer("control_type", torch.zeros(1, dtype=torch.int32, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    @property
    def control_name(self) -> str:
        return CONTROL_TYPES[int(self.control_type[0])]

    def forward(self, transformer: MMDiTX, x, sigma, y, cond, scale: float = 1.0) -> list[torch.Tensor]:
        """The per-block residuals for `transformer(x, t, y, context, controlnet_hidden_states=...)`.

        transformer: the MMDiTX being controlled. Its op set runs the blocks; the 8B kind reads its patch embedding and
            position table, the 2B kind its y_embedder (as the reference's apply_model does), and both its sinusoid.
        x: (B, 16, h, w) latent, as the transformer gets it.
        sigma: (B,) or scalar sigma as the sampler feeds the model, i.e. fp16-rounded (`sampling.model_sigma`). As in
            the reference, the ControlNet's timestep is sigma.float() * 1000 computed in float32 (the reference's
            transformer instead gets that product computed in fp16, SPEC.md §5.4: the two can differ).
        y: (B, pooled) pooled text (B, 2048 for SD3.5), as the transformer gets it.
        cond: (1 or B, 16, h, w) control latent from `control_latent`; one latent serves the whole (CFG) batch.
        scale: the control strength, multiplying every residual (the reference always uses 1).
        Returns num_layers tensors (B, h*w/4, D) in the transformer's dtype.
        """
        check_compatible(self, transformer)
        B, hw = x.shape[0], x.shape[-2:]
        sigma = torch.as_tensor(sigma, device=x.device)
        t = (sigma.expand(B) if sigma.ndim == 0 else sigma).float() * 1000
        if cond.ndim != 4 or cond.shape[0] not in (1, B) or cond.shape[1:] != x.shape[1:]:
            shape = ", ".join(map(str, x.shape[1:]))
            raise ValueError(f"control latent must be (1 or {B}, {shape}) like x, got {tuple(cond.shape)}")
        if t.shape != (B,) or y is None or y.shape != (B, transformer.config.adm_in_channels):
            got, adm = None if y is None else tuple(y.shape), transformer.config.adm_in_channels
            raise ValueError(f"sigma must be ({B},) and y ({B}, {adm}), got {tuple(t.shape)} and {got}")
        ops, dtype = transformer.ops(x.device), self.dtype
        if self.config.is_8b:
            h = transformer.x_embedder(x.to(transformer.dtype)) + transformer.cropped_pos_embed(hw)
        else:
            h = self.pos_embed(x.to(dtype))
            y = transformer.y_embedder(y.to(transformer.dtype))
        h = h.to(dtype) + self.pos_embed_input(cond.to(x.device, dtype))  # a batch-1 cond broadcasts over B
        emb = self.time_text_embed
        c = emb.timestep_embedder(transformer.t_embedder.sinusoid(t).to(dtype)) + emb.text_embedder(y.to(dtype))
        silu_c = F.silu(c)

        ws = self._workspace(B, h.shape[1], x.device)
        out, residuals = h, []
        for block, linear in zip(self.transformer_blocks, self.controlnet_blocks):
            mods = block.adaLN_modulation[1](silu_c).view(B, 6, -1)  # (SiLU, Linear)(c), the SiLU shared
            out = block.single_stream(out if self.config.is_8b else h, mods, ops, ws)  # 8B chains, 2B runs in parallel
            residuals.append((linear(out) * scale).to(transformer.dtype))
        return residuals

    def _workspace(self, batch: int, n_x: int, device) -> SimpleNamespace:
        H, D = self.config.num_heads, self.config.hidden_size
        f = dict(dtype=self.dtype, device=device)
        q, k, v = (torch.empty(batch, H, n_x, D // H, **f) for _ in range(3))
        return SimpleNamespace(q=q, k=k, v=v, out_x=torch.empty(batch, n_x, D, **f))


def check_compatible(controlnet: ControlNet, transformer: MMDiTX):
    """Raise CheckpointError naming both models unless `controlnet` was built for a transformer like this one."""
    c, m = controlnet.config, transformer.config
    problem = None
    if (c.hidden_size, c.patch_size, c.in_channels) != (m.hidden_size, m.patch_size, m.in_channels):
        problem = f"it was made for a transformer of hidden size {c.hidden_size} ({c.num_heads} heads)"
    elif m.depth % c.num_layers:
        problem = f"its {c.num_layers} blocks cannot be spread evenly over {m.depth} (block i gets residual i // (N//n))"
    elif c.is_8b and c.pooled_dim != m.adm_in_channels:
        problem = f"it takes pooled text of width {c.pooled_dim}, the transformer {m.adm_in_channels}"
    elif not c.is_8b and m.adm_in_channels is None:
        problem = "this 2B-kind ControlNet needs the transformer's y_embedder, which this transformer lacks"
    if problem:
        raise CheckpointError(
            f"{controlnet.source} (a {c.num_layers}-block ControlNet, hidden size {c.hidden_size}) does not fit the "
            f"{m.variant} transformer (depth {m.depth}, hidden size {m.hidden_size}): {problem}"
        )


def control_type_id(control_type: int | str) -> int:
    """0, 1, 2 or "blur", "canny", "depth" -> 0, 1 or 2; FastSD35Error otherwise."""
    ids = {name: i for i, name in CONTROL_TYPES.items()}
    if control_type in CONTROL_TYPES and not isinstance(control_type, bool):
        return int(control_type)
    if control_type in ids:
        return ids[control_type]
    raise FastSD35Error(f"unknown control type {control_type!r}; choose one of: {', '.join(ids)}")
