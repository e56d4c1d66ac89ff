"""Flash-attention forward over the joint [context, x] sequence, writing each half straight into its proj input.

Contract: kernels/reference.py `joint_attention`. q, k, v: (B, H, L, Dh); non-causal, no mask, scale 1/sqrt(Dh).
Output row r < n_ctx goes to out_ctx[b, r, h*Dh:(h+1)*Dh], row r >= n_ctx to out_x[b, r - n_ctx, ...]; a query tile
that straddles n_ctx writes both with masked stores. n_ctx = 0 is MMDiT-X's x-only second attention.

One program owns a BLOCK_M tile of queries of one (batch, head) and streams the keys in BLOCK_N tiles with an online
softmax in fp32 (exp2, with scale * log2(e) folded into the scores). The full key tiles run unmasked; only the last,
partial one masks its keys (score -inf, value 0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import INTERPRET, check_head_dim, check_shape, check_tensor, check_writable_rows, unit_last_stride

LOG2E = 1.4426950408889634


def _configs() -> list[triton.Config]:
    if INTERPRET:
        # Triton's interpreter cannot autotune over several configs. Its cost is per op, not per element, so 32x32
        # tiles run faster than smaller ones while still giving test sizes several query/key tiles and tails.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 32, 4, 4),
            (128, 64, 4, 4),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (64, 32, 4, 2),
        )
    ]


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, L, qk_scale,
    stride_kl, stride_vl,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i) of a query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        key_mask = (offs_n < L)[:, None]
        k = tl.load(k_ptrs + start_n * stride_kl, mask=key_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vl, mask=key_mask, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kl)
        v = tl.load(v_ptrs + start_n * stride_vl)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain scores, fp32
    if MASK_KEYS:
        s = tl.where((offs_n < L)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 on the first tile)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # As flash attention does, P is rounded to the input dtype so that P @ V runs on the native dot.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=_configs(), key=["L", "HEAD_DIM"])
@triton.jit
def _joint_attention_kernel(
    Q, K, V, OUT_CTX, OUT_X,
    L, H, n_ctx, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_cb, stride_cl,
    stride_xb, stride_xl,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, L, qk_scale, stride_kl, stride_vl,
                                     BLOCK_N, False, DOT_PRECISION)  # fmt: skip
    if n_full < L:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, L, qk_scale, stride_kl, stride_vl,
                                     BLOCK_N, True, DOT_PRECISION)  # fmt: skip
    o = (acc / l_i[:, None]).to(OUT_X.dtype.element_ty)

    # Rows < n_ctx belong to the context stream, the rest to x; column h*Dh of the (.., H*Dh) proj input.
    cols = h * HEAD_DIM + offs_d[None, :]
    is_ctx = offs_m < n_ctx
    tl.store(OUT_CTX + b * stride_cb + offs_m[:, None] * stride_cl + cols, o, mask=is_ctx[:, None])
    tl.store(OUT_X + b * stride_xb + (offs_m - n_ctx)[:, None] * stride_xl + cols, o,
             mask=(row_ok & (offs_m >= n_ctx))[:, None])  # fmt: skip


def joint_attention(q, k, v, out_ctx, out_x, n_ctx: int) -> None:
    """softmax(q k^T / sqrt(Dh)) v over all L rows of (B, H, L, Dh) q/k/v; rows < n_ctx are written to out_ctx
    (B, n_ctx, H*Dh), the others to out_x (B, L - n_ctx, H*Dh). out_ctx may be None when n_ctx == 0."""
    op = "joint_attention"
    check_tensor(op, "q", q, 4)
    B, H, L, Dh = q.shape
    check_head_dim(op, Dh)
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, 4, q.dtype, q.device)
        check_shape(op, name, t, q.shape)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= L:
        raise ValueError(f"{op}: n_ctx must be an int in [0, L={L}], got {n_ctx!r}")
    check_tensor(op, "out_x", out_x, 3, q.dtype, q.device)
    check_shape(op, "out_x", out_x, (B, L - n_ctx, H * Dh))
    check_writable_rows(op, "out_x", out_x)
    if out_ctx is None:
        if n_ctx:
            raise ValueError(f"{op}: out_ctx is None but n_ctx = {n_ctx} rows need somewhere to go")
        out_ctx = out_x  # never written: no row is < n_ctx = 0
    else:
        check_tensor(op, "out_ctx", out_ctx, 3, q.dtype, q.device)
        check_shape(op, "out_ctx", out_ctx, (B, n_ctx, H * Dh))
        check_writable_rows(op, "out_ctx", out_ctx)
    if L == 0 or B == 0 or H == 0:
        return
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]), B * H)

    _joint_attention_kernel[grid](
        q, k, v, out_ctx, out_x,
        L, H, n_ctx, LOG2E / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out_ctx.stride(0), out_ctx.stride(1),
        out_x.stride(0), out_x.stride(1),
        HEAD_DIM=Dh,
        # fp32 must be exact fp32 (the GPU default would be TF32); 16-bit operands use the native MMA either way.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
