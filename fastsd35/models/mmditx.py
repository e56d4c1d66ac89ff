"""MMDiT-X, the SD3 / SD3.5 transformer, in the official checkpoint key layout (without `model.diffusion_model.`).

The model is written once against the block-level ops of `fastsd35.kernels` (LayerNorm + adaLN modulation, qkv split
with RMS q/k norm into joint buffers, joint attention, gated residuals). `MMDiTX` runs them with the plain-PyTorch
reference ops; `FastMMDiTX` is the same module with the Triton ops. SPEC.md §3 is the behaviour reproduced here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import CheckpointError
from ..kernels.reference import rms_norm
from .fp8 import fp8_gemm_available, fp8_linear, fp8_row_ops, keeping_dtype
from .strict import StrictLoading

HEAD_DIM = 64  # the reference's "magic": hidden = 64 * depth, heads = depth
FREQ_DIM = 256  # sinusoidal timestep embedding width


@dataclass(frozen=True)
class MMDiTXConfig:
    depth: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    adm_in_channels: int | None = 2048  # pooled text width; None = no y_embedder
    context_dim: int | None = 4096  # T5 width; None = context is used as given (reference: nn.Identity)
    qk_norm: str | None = None  # "rms" or None
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X blocks with the second, x-only attention
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def __post_init__(self):
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported (released models use 'rms' or None)")
        object.__setattr__(self, "x_block_self_attn_layers", tuple(sorted(self.x_block_self_attn_layers)))
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} outside blocks 0..{self.depth - 2}")

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth

    @property
    def variant(self) -> str:
        """The released model this config describes ("sd3_medium", "sd3.5_medium", "sd3.5_large"), else "custom"."""
        return next((name for name, cfg in CONFIGS.items() if cfg == self), "custom")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "state dict") -> "MMDiTXConfig":
        """Infer the config from tensor shapes and key names (SPEC.md §3.1). Raises CheckpointError."""
        for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight"):
            if key not in shapes:
                raise CheckpointError(f"{source}: not an SD3 transformer: key '{key}' is missing")
        hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
        if hidden % HEAD_DIM:
            raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of {HEAD_DIM}")
        num_patches = shapes["pos_embed"][1]
        max_size = round(math.sqrt(num_patches))
        if max_size * max_size != num_patches:
            raise CheckpointError(f"{source}: pos_embed has {num_patches} rows, not a square grid")
        fc1 = shapes.get("joint_blocks.0.x_block.mlp.fc1.weight")
        attn2 = sorted(
            int(m.group(1)) for k in shapes if (m := re.fullmatch(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight", k))
        )
        adm = shapes.get("y_embedder.mlp.0.weight")
        ctx = shapes.get("context_embedder.weight")
        return cls(
            depth=hidden // HEAD_DIM,
            patch_size=patch,
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
            pos_embed_max_size=max_size,
            adm_in_channels=adm[1] if adm else None,
            context_dim=ctx[1] if ctx else None,
            qk_norm="rms" if "joint_blocks.0.context_block.attn.ln_k.weight" in shapes else None,
            x_block_self_attn_layers=tuple(attn2),
            mlp_ratio=fc1[0] / fc1[1] if fc1 else 4.0,
            qkv_bias="joint_blocks.0.x_block.attn.qkv.bias" in shapes,
        )

    @classmethod
    def from_reference_kwargs(
        cls,
        input_size=32,
        patch_size=2,
        in_channels=4,
        depth=28,
        mlp_ratio=4.0,
        learn_sigma=False,
        adm_in_channels=None,
        context_embedder_config=None,
        register_length=0,
        rmsnorm=False,
        scale_mod_only=False,
        swiglu=False,
        out_channels=None,
        pos_embed_scaling_factor=None,
        pos_embed_offset=None,
        pos_embed_max_size=None,
        num_patches=None,
        qk_norm=None,
        x_block_self_attn_layers=(),
        qkv_bias=True,
        verbose=False,
    ) -> "MMDiTXConfig":
        """The config for the reference `mmditx.MMDiTX(**kwargs)` (same names and defaults). `input_size` and the
        sin-cos pos-embed options are unused at inference, as in the reference. Options no released checkpoint uses
        raise ValueError naming the option."""
        unsupported = {
            "register_length": register_length != 0,
            "rmsnorm": bool(rmsnorm),
            "scale_mod_only": bool(scale_mod_only),
            "swiglu": bool(swiglu),
            "pos_embed_max_size=None": pos_embed_max_size is None,
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"MMDiTX option {name} is not supported: no released SD3/SD3.5 checkpoint uses it")
        if num_patches is not None and num_patches != pos_embed_max_size**2:
            raise ValueError(f"num_patches={num_patches} must equal pos_embed_max_size**2 = {pos_embed_max_size**2}")
        context_dim = None
        if context_embedder_config is not None:
            if context_embedder_config.get("target") != "torch.nn.Linear":
                raise ValueError(f"context_embedder_config target {context_embedder_config.get('target')!r} is not supported")
            params = context_embedder_config["params"]
            if params["out_features"] != HEAD_DIM * depth:
                raise ValueError(f"context embedder out_features {params['out_features']} != hidden size {HEAD_DIM * depth}")
            context_dim = params["in_features"]
        config = cls(
            depth=depth,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels or (2 * in_channels if learn_sigma else in_channels),
            pos_embed_max_size=pos_embed_max_size,
            adm_in_channels=adm_in_channels,
            context_dim=context_dim,
            qk_norm=qk_norm,
            x_block_self_attn_layers=tuple(x_block_self_attn_layers or ()),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
        )
        if verbose:
            print(f"MMDiTX config: {config}")
        return config


# The released transformers. SD3.5 Large Turbo shares SD3.5 Large's architecture.
CONFIGS: dict[str, MMDiTXConfig] = {
    "sd3_medium": MMDiTXConfig(depth=24),
    "sd3.5_medium": MMDiTXConfig(depth=24, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))),
    "sd3.5_large": MMDiTXConfig(depth=38, qk_norm="rms"),
}


# ----------------------------------------------------------------------------------------------------------------
# Modules. Attribute names follow the official key layout.


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, hidden, patch, **factory):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, **factory)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, **factory):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden, **factory), nn.SiLU(), nn.Linear(hidden, hidden, **factory))
        self._freqs: dict[torch.device, torch.Tensor] = {}

    def frequencies(self, device) -> torch.Tensor:
        # Computed on the CPU in fp32 as the reference does, and cached per device so that a CUDA graph capture
        # never has to copy it.
        if device not in self._freqs:
            half = FREQ_DIM // 2
            freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
            self._freqs[device] = freqs.to(device)
        return self._freqs[device]

    def sinusoid(self, t) -> torch.Tensor:
        """The (B, 256) cos/sin embedding of t (B,), before the MLP; the ControlNet's timestep MLP reads it too."""
        args = t[:, None].float() * self.frequencies(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first
        if t.is_floating_point():  # the reference rounds through t's dtype (fp16 sigmas) before the model dtype
            emb = emb.to(t.dtype)
        return emb

    def forward(self, t, dtype):
        return self.mlp(self.sinusoid(t).to(dtype))


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim, hidden, **factory):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden, **factory), nn.SiLU(), nn.Linear(hidden, hidden, **factory))

    def forward(self, y):
        return self.mlp(y)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x):
        return rms_norm(x, self.weight).to(x.dtype)


def _weight(norm: RMSNorm | None):
    return None if norm is None else norm.weight


class SelfAttention(nn.Module):
    """qkv projection (+ per-head RMS q/k norm) and output projection; the attention itself is a joint op."""

    def __init__(self, dim, num_heads, qkv_bias, qk_norm, pre_only=False, **factory):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = None if pre_only else nn.Linear(dim, dim, **factory)
        self.ln_q = RMSNorm(self.head_dim, **factory) if qk_norm else None
        self.ln_k = RMSNorm(self.head_dim, **factory) if qk_norm else None

    def write_qkv(self, h, ops, ws_q, ws_k, ws_v, seq_offset):
        """qkv(h), split per head, q/k normalised, written into the joint buffers at `seq_offset`."""
        ops.split_qkv_rmsnorm(self.qkv(h), _weight(self.ln_q), _weight(self.ln_k), ws_q, ws_k, ws_v, seq_offset)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, **factory):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One adaLN-Zero stream of a joint block. Modulation order: shift_msa, scale_msa, gate_msa, shift_mlp,
    scale_mlp, gate_mlp (+ shift_msa2, scale_msa2, gate_msa2 with the second attention); 2 mods when pre_only."""

    def __init__(self, hidden, num_heads, mlp_ratio, qkv_bias, qk_norm, pre_only=False, x_block_self_attn=False, **factory):
        super().__init__()
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.n_mods = 2 if pre_only else 9 if x_block_self_attn else 6
        self.attn = SelfAttention(hidden, num_heads, qkv_bias, qk_norm, pre_only, **factory)
        self.attn2 = SelfAttention(hidden, num_heads, qkv_bias, qk_norm, **factory) if x_block_self_attn else None
        self.mlp = None if pre_only else Mlp(hidden, int(hidden * mlp_ratio), **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.n_mods * hidden, **factory))

    def post_attention(self, s, attn_out, mods, ops, attn2_out=None):
        """s += gate_msa*attn (+ gate_msa2*attn2); s += gate_mlp * MLP(LN(s)*(1+scale_mlp)+shift_mlp)."""
        gate2 = None if attn2_out is None else mods[:, 8]
        s, h = ops.gated_residual_ln_modulate(s, attn_out, mods[:, 2], mods[:, 3], mods[:, 4], attn2_out, gate2)
        return ops.gated_residual(s, self.mlp(h), mods[:, 5])

    def single_stream(self, x, mods, ops, ws):
        """This stream as a block of its own (the ControlNet's blocks): self-attention over x, then post_attention.
        mods (B, 6, D); ws holds q/k/v buffers (B, H, L, Dh) and out_x (B, L, D)."""
        self.attn.write_qkv(ops.ln_modulate(x, mods[:, 0], mods[:, 1]), ops, ws.q, ws.k, ws.v, 0)
        ops.joint_attention(ws.q, ws.k, ws.v, None, ws.out_x, 0)
        return self.post_attention(x, self.attn.proj(ws.out_x), mods, ops)


class JointBlock(nn.Module):
    """A context stream and an x stream that attend jointly over [context, x]."""

    def __init__(self, hidden, num_heads, mlp_ratio, qkv_bias, qk_norm, pre_only, x_block_self_attn, **factory):
        super().__init__()
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, **factory)
        self.context_block = DismantledBlock(hidden, num_heads, pre_only=pre_only, **common)
        self.x_block = DismantledBlock(hidden, num_heads, x_block_self_attn=x_block_self_attn, **common)

    def forward(self, context, x, c_mods, x_mods, ops, ws):
        """c_mods, x_mods: (B, n_mods, D) views of the batched modulation tensor. Returns (context or None, x)."""
        cb, xb = self.context_block, self.x_block
        n_ctx = context.shape[1]
        cb.attn.write_qkv(ops.ln_modulate(context, c_mods[:, 0], c_mods[:, 1]), ops, ws.q, ws.k, ws.v, 0)
        if xb.x_block_self_attn:
            h, h2 = ops.ln_modulate2(x, x_mods[:, 0], x_mods[:, 1], x_mods[:, 6], x_mods[:, 7])
        else:
            h = ops.ln_modulate(x, x_mods[:, 0], x_mods[:, 1])
        xb.attn.write_qkv(h, ops, ws.q, ws.k, ws.v, n_ctx)
        ops.joint_attention(ws.q, ws.k, ws.v, ws.out_ctx, ws.out_x, n_ctx)
        attn_x = xb.attn.proj(ws.out_x)
        attn2_x = None
        if xb.x_block_self_attn:
            xb.attn2.write_qkv(h2, ops, ws.q2, ws.k2, ws.v2, 0)
            ops.joint_attention(ws.q2, ws.k2, ws.v2, None, ws.out_x, 0)
            attn2_x = xb.attn2.proj(ws.out_x)
        x = xb.post_attention(x, attn_x, x_mods, ops, attn2_x)
        if cb.pre_only:
            return None, x
        return cb.post_attention(context, cb.attn.proj(ws.out_ctx), c_mods, ops), x


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels, **factory):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, **factory))

    def forward(self, x, mods, ops):
        return self.linear(ops.ln_modulate(x, mods[:, 0], mods[:, 1]))  # order: shift, scale


# ----------------------------------------------------------------------------------------------------------------


class MMDiTX(StrictLoading, nn.Module):
    """The SD3/SD3.5 MMDiT-X transformer.

    `MMDiTX(config)` with an `MMDiTXConfig` or a name from `CONFIGS`, or `MMDiTX(**reference_kwargs)` with the keyword
    arguments of the reference `mmditx.MMDiTX`. The state dict has the official keys; `forward` has the reference's
    signature. All blocks' adaLN weights live in one matrix (each block's Linear holds a slice of it), so every
    modulation vector of a forward comes from one GEMM.
    """

    def __init__(self, config: MMDiTXConfig | str | None = None, *, dtype=None, device=None, **reference_kwargs):
        super().__init__()
        if config is None:
            config = MMDiTXConfig.from_reference_kwargs(**reference_kwargs)
        elif reference_kwargs:
            raise TypeError(f"pass either a config or reference keyword arguments, not both: {sorted(reference_kwargs)}")
        elif isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown MMDiTX config {config!r}; known: {', '.join(CONFIGS)}")
            config = CONFIGS[config]
        elif not isinstance(config, MMDiTXConfig):
            raise TypeError(f"config must be an MMDiTXConfig or one of {list(CONFIGS)}, not {type(config).__name__}")
        self.config = config
        f = dict(dtype=dtype, device=device)
        D, N, p = config.hidden_size, config.depth, config.patch_size
        # Reference attribute names, for code written against mmditx.MMDiTX.
        self.depth, self.num_heads, self.patch_size = N, config.num_heads, p
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.pos_embed_max_size = config.pos_embed_max_size
        self.x_block_self_attn_layers = list(config.x_block_self_attn_layers)

        self.x_embedder = PatchEmbed(config.in_channels, D, p, **f)
        self.t_embedder = TimestepEmbedder(D, **f)
        self.y_embedder = VectorEmbedder(config.adm_in_channels, D, **f) if config.adm_in_channels else None
        self.context_embedder = nn.Linear(config.context_dim, D, **f) if config.context_dim else nn.Identity()
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size**2, D, **f))
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                D,
                config.num_heads,
                config.mlp_ratio,
                config.qkv_bias,
                config.qk_norm,
                pre_only=i == N - 1,
                x_block_self_attn=i in config.x_block_self_attn_layers,
                **f,
            )
            for i in range(N)
        )
        self.final_layer = FinalLayer(D, p, config.out_channels, **f)
        self._adaln_w = self._adaln_b = self._adaln_s = None
        self._fuse_adaln()

    # -- construction and loading ------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, dtype=None, device=None) -> "MMDiTX":
        """Build the model the state dict describes (config inferred from shapes and keys, SPEC.md §3.1) and load it
        strictly. Keys are the official ones, with or without `model.diffusion_model.`. dtype and device default to
        those of the tensors. Mismatches raise CheckpointError."""
        prefix = "model.diffusion_model."
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        config = MMDiTXConfig.from_shapes(shapes)
        ref = state_dict["x_embedder.proj.weight"]
        model = cls.empty(config, dtype=dtype or ref.dtype, device=device or ref.device)
        model.load_weights(shapes, state_dict.__getitem__)
        return model

    # -- the fused adaLN matrix --------------------------------------------------------------------------------

    def _adaln_linears(self) -> list[nn.Linear]:
        lins = []
        for block in self.joint_blocks:
            lins += [block.context_block.adaLN_modulation[1], block.x_block.adaLN_modulation[1]]
        return lins + [self.final_layer.adaLN_modulation[1]]

    def _point_adaln_at(self, w: torch.Tensor, b: torch.Tensor, s: torch.Tensor | None = None):
        """s: the per-row scales when the adaLN Linears are FP8 (fastsd35.models.fp8.FP8Linear)."""
        row = 0
        for lin in self._adaln_linears():
            n = lin.out_features
            lin.weight.data, lin.bias.data = w[row : row + n], b[row : row + n]
            if s is not None:
                lin.weight_scale = s[row : row + n]
            row += n
        self._adaln_w, self._adaln_b, self._adaln_s = w, b, s

    def _adaln_is_fused(self) -> bool:
        w, b, s = self._adaln_w, self._adaln_b, self._adaln_s
        lins = self._adaln_linears()
        if w is None or (s is None) != (getattr(lins[0], "weight_scale", None) is None):
            return False
        row = 0
        for lin in lins:
            parts = [(lin.weight, w, row * w.shape[1]), (lin.bias, b, row)]
            if s is not None:
                parts.append((lin.weight_scale, s, row))
            for p, full, offset in parts:
                if (
                    p.dtype != full.dtype
                    or p.device != full.device
                    or p.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
                    or p.storage_offset() != full.storage_offset() + offset
                ):
                    return False
            row += lin.out_features
        return True

    def _fuse_adaln(self):
        """(Re)build the fused matrix from the per-block Linears. Needed only after something replaced their
        tensors (e.g. load_state_dict(assign=True)); `.to()` and friends keep the fusion (see `_apply`)."""
        lins = self._adaln_linears()
        with torch.no_grad():
            w = torch.cat([lin.weight for lin in lins])
            b = torch.cat([lin.bias for lin in lins])
            fp8 = all(hasattr(lin, "weight_scale") for lin in lins)
            s = torch.cat([lin.weight_scale for lin in lins]) if fp8 else None
        self._point_adaln_at(w, b, s)

    def _apply(self, fn, recurse=True):
        # Convert the fused matrix as one tensor, then re-point the per-block slices at it: `.to(device/dtype)`,
        # `.half()`, `to_empty()` keep a single copy of the adaLN weights instead of splitting it per block.
        if not (recurse and self._adaln_is_fused()):
            return super()._apply(fn, recurse)
        w, b, s = self._adaln_w, self._adaln_b, self._adaln_s
        for lin in self._adaln_linears():
            lin.weight.data, lin.bias.data = w[:0], b[:0]
            if s is not None:
                lin.weight_scale = s[:0]
        super()._apply(fn, recurse)
        if s is None:
            self._point_adaln_at(fn(w), fn(b))
        else:  # FP8 weights and their scales keep their dtypes (fastsd35.models.fp8)
            self._point_adaln_at(keeping_dtype(fn, w), fn(b), keeping_dtype(fn, s))
        return self

    def modulations(self, c: torch.Tensor):
        """All adaLN modulation vectors from one GEMM: [(ctx_mods, x_mods) per block] and the final layer's mods,
        each a (B, n_mods, D) view of one (B, sum n_mods * D) tensor."""
        return self.split_modulations(self.modulation_tensor(c))

    def modulation_tensor(self, c: torch.Tensor) -> torch.Tensor:
        """Every block's and the final layer's adaLN modulation vectors as one (B, sum n_mods * D) tensor: one GEMM."""
        if not self._adaln_is_fused():
            self._fuse_adaln()
        if self._adaln_s is None:
            return F.linear(F.silu(c), self._adaln_w, self._adaln_b)
        fp8_matmul = self._adaln_linears()[0].fp8_matmul
        return fp8_linear(F.silu(c), self._adaln_w, self._adaln_s, self._adaln_b, fp8_matmul=fp8_matmul)

    def split_modulations(self, mods: torch.Tensor):
        """`modulation_tensor`'s result as [(ctx_mods, x_mods) per block] and the final layer's mods: views."""
        B, D = mods.shape[0], self.config.hidden_size
        views, col = [], 0
        for lin in self._adaln_linears():
            n = lin.out_features
            views.append(mods[:, col : col + n].view(B, n // D, D))
            col += n
        return list(zip(views[0:-1:2], views[1:-1:2])), views[-1]

    # -- forward -----------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    def ops(self, device) -> SimpleNamespace:
        """The block-level op set this model runs on tensors on `device`."""
        return kernels.REFERENCE_OPS

    def cropped_pos_embed(self, hw) -> torch.Tensor:
        """The stored (1, M*M, D) position table, centre-cropped to the patched latent size."""
        p, M = self.patch_size, self.pos_embed_max_size
        h, w = hw[0] // p, hw[1] // p
        if h > M or w > M:
            raise ValueError(
                f"latent {hw[0]}x{hw[1]} is larger than this model's position table allows "
                f"({M * p}x{M * p} latent, {M * p * 8}x{M * p * 8} pixels)"
            )
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.view(M, M, -1)[top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def unpatchify(self, x: torch.Tensor, hw) -> torch.Tensor:
        """(B, T, p*p*C) tokens -> (B, C, h, w); within a token the order is (row-in-patch, col-in-patch, channel)."""
        p, C = self.patch_size, self.out_channels
        h, w = hw[0] // p, hw[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def _check_inputs(self, x, t, y, context, controlnet_hidden_states):
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"latent size {x.shape[2]}x{x.shape[3]} must be a multiple of the patch size {p}")
        if context is None:
            raise ValueError("context is required: (B, L, context_dim) text embeddings")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        if controlnet_hidden_states is not None:
            n = len(controlnet_hidden_states)
            if not 0 < n <= self.depth or (self.depth - 1) // (self.depth // n) >= n:
                raise ValueError(f"{n} ControlNet states cannot be spread over {self.depth} blocks as i // (depth // n)")

    def forward(self, x, t, y=None, context=None, controlnet_hidden_states=None, skip_layers=()):
        """x (B, C, h, w) latent; t (B,) timestep = sigma * 1000; y (B, adm) pooled text; context (B, L, context_dim).
        `controlnet_hidden_states[i // (depth // n)]` is added to x after block i (the last block included);
        blocks in `skip_layers` are skipped together with their ControlNet residual. Returns (B, C_out, h, w).
        The same as `embed`, then `run_blocks` over every block, then `final`, which callers that run the blocks in
        parts (the step cache: fastsd35.pipeline.caching) use directly."""
        state = self.embed(x, t, y, context, controlnet_hidden_states)
        self.run_blocks(state, 0, self.depth, controlnet_hidden_states, skip_layers)
        return self.final(state)

    def embed(self, x, t, y=None, context=None, controlnet_hidden_states=None) -> SimpleNamespace:
        """The stream state before the blocks: x and context tokens, every block's modulations (one tensor), the
        latent size. Checks the inputs (those of `forward`)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self._check_inputs(x, t, y, context, controlnet_hidden_states)
        dtype, hw = self.dtype, x.shape[-2:]
        x = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(hw)
        c = self.t_embedder(t, dtype)
        if y is not None:
            c = c + self.y_embedder(y.to(dtype))
        context = self.context_embedder(context.to(dtype))
        return SimpleNamespace(x=x, context=context, mods=self.modulation_tensor(c), hw=tuple(hw))

    def run_blocks(self, state: SimpleNamespace, start: int, stop: int, controlnet_hidden_states=None, skip_layers=()):
        """Blocks start .. stop-1 on `state` (from `embed`), in place: state.x and state.context move on (context is
        None after the last block, whose context stream is pre-only). ControlNet residuals and skipped layers as in
        `forward`."""
        ops = self.ops(state.x.device)
        block_mods, _ = self.split_modulations(state.mods)
        ws = self.workspace(state.x.shape[0], state.context.shape[1], state.x.shape[1], state.x.device)
        hs = controlnet_hidden_states
        context, x = state.context, state.x
        for i in range(start, stop):
            if i in skip_layers:
                continue
            context, x = self.joint_blocks[i](context, x, *block_mods[i], ops, ws)
            if hs is not None:
                x = x + hs[i // (self.depth // len(hs))]
        state.context, state.x = context, x
        return state

    def final(self, state: SimpleNamespace) -> torch.Tensor:
        """The final layer on state.x: (B, C_out, h, w)."""
        _, final_mods = self.split_modulations(state.mods)
        return self.unpatchify(self.final_layer(state.x, final_mods, self.ops(state.x.device)), state.hw)

    def workspace(self, batch: int, n_ctx: int, n_x: int, device) -> SimpleNamespace:
        """Joint q/k/v buffers (B, H, n_ctx + n_x, Dh), the attention outputs, and x-only buffers for attn2;
        allocated once per forward and reused by every block."""
        H, D = self.num_heads, self.config.hidden_size
        f = dict(dtype=self.dtype, device=device)
        joint = (batch, H, n_ctx + n_x, D // H)
        ws = SimpleNamespace(
            q=torch.empty(joint, **f),
            k=torch.empty(joint, **f),
            v=torch.empty(joint, **f),
            out_ctx=torch.empty(batch, n_ctx, D, **f),
            out_x=torch.empty(batch, n_x, D, **f),
        )
        if self.config.x_block_self_attn_layers:
            x_only = (batch, H, n_x, D // H)
            ws.q2, ws.k2, ws.v2 = (torch.empty(x_only, **f) for _ in range(3))
        return ws


class FastMMDiTX(MMDiTX):
    """MMDiTX running the Triton ops: the same constructor, state dict, `from_state_dict` and forward; only the
    op set differs. `fastsd35.kernels.backend(device)` tells which backend runs them (Triton on CUDA, Triton's
    interpreter on CPU with TRITON_INTERPRET=1, otherwise the reference ops)."""

    def ops(self, device) -> SimpleNamespace:
        ops = kernels.ops_for(device)
        if ops is not kernels.REFERENCE_OPS and self._adaln_s is not None and fp8_gemm_available(device) \
                and self._adaln_linears()[0].fp8_matmul:
            return fp8_row_ops(ops)  # FP8 model: the row kernels also write the FP8 GEMMs' quantized inputs
        return ops

    @classmethod
    def from_mmditx(cls, model: MMDiTX) -> "FastMMDiTX":
        """Convert an MMDiTX in place: same modules and tensors, nothing copied."""
        if not isinstance(model, MMDiTX):
            raise TypeError(f"from_mmditx expects a fastsd35 MMDiTX, got {type(model).__name__}; "
                            "for other modules use FastMMDiTX.from_state_dict(module.state_dict())")
        model.__class__ = cls
        return model


__all__ = ["CONFIGS", "FastMMDiTX", "MMDiTX", "MMDiTXConfig"]
