"""The block-level ops of MMDiT-X in plain PyTorch: the numerics every Triton kernel is tested against.

Contracts (DESIGN.md "Kernels"): inputs may be fp32, fp16 or bf16; norms and modulation are computed in fp32 and
written in the input dtype. Attention runs through SDPA in the input dtype, as the reference implementation does.
Shapes: x (B, L, D); shift/scale/gate (B, D), possibly strided views into the batched modulation tensor;
q/k/v buffers (B, H, L_total, Dh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=EPS)


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1.0 + scale.float()[:, None]) + shift.float()[:, None]


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x; no affine, eps 1e-6) * (1 + scale) + shift."""
    return _modulate(_layer_norm(x), shift, scale).to(x.dtype)


def ln_modulate2(x, shift1, scale1, shift2, scale2) -> tuple[torch.Tensor, torch.Tensor]:
    """One LayerNorm, two modulations (MMDiT-X x-blocks feed attn and attn2 from the same norm1)."""
    h = _layer_norm(x)
    return _modulate(h, shift1, scale1).to(x.dtype), _modulate(h, shift2, scale2).to(x.dtype)


def _gated_sum(x, y, gate, y2=None, gate2=None) -> torch.Tensor:
    out = x.float() + gate.float()[:, None] * y.float()
    if y2 is not None:
        out = out + gate2.float()[:, None] * y2.float()
    return out


def gated_residual_ln_modulate(x, y, gate, shift, scale, y2=None, gate2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate*y (+ gate2*y2); h = LN(x_new) * (1 + scale) + shift. Returns (x_new, h)."""
    if (y2 is None) != (gate2 is None):
        raise ValueError("gated_residual_ln_modulate: y2 and gate2 must be given together")
    x_new = _gated_sum(x, y, gate, y2, gate2).to(x.dtype)
    # The norm reads the residual as stored (rounded to x.dtype), exactly as the next block would.
    return x_new, ln_modulate(x_new, shift, scale)


def gated_residual(x, y, gate) -> torch.Tensor:
    """x + gate * y."""
    return _gated_sum(x, y, gate).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim (eps 1e-6, learned weight), fp32 math."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()


def split_qkv_rmsnorm(qkv, q_weight, k_weight, q_out, k_out, v_out, seq_offset: int) -> None:
    """Split a qkv Linear output (B, L, 3*H*Dh; [q|k|v], head-major), RMS-normalise q and k per head when weights
    are given, and write q, k, v into (B, H, L_total, Dh) buffers at rows [seq_offset, seq_offset + L)."""
    B, L, _ = qkv.shape
    H, Dh = q_out.shape[1], q_out.shape[3]
    q, k, v = qkv.view(B, L, 3, H, Dh).unbind(2)
    if q_weight is not None:
        q = rms_norm(q, q_weight)
    if k_weight is not None:
        k = rms_norm(k, k_weight)
    rows = slice(seq_offset, seq_offset + L)
    q_out[:, :, rows] = q.transpose(1, 2)
    k_out[:, :, rows] = k.transpose(1, 2)
    v_out[:, :, rows] = v.transpose(1, 2)


def joint_attention(q, k, v, out_ctx, out_x, n_ctx: int) -> None:
    """Non-causal attention over the joint sequence (scale 1/sqrt(Dh)). Rows < n_ctx go to out_ctx (B, n_ctx, H*Dh),
    the rest to out_x (B, L - n_ctx, H*Dh). With n_ctx = 0 this is the x-only second attention (out_ctx unused)."""
    B, H, L, Dh = q.shape
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * Dh)
    if n_ctx:
        out_ctx.copy_(o[:, :n_ctx])
    out_x.copy_(o[:, n_ctx:])
