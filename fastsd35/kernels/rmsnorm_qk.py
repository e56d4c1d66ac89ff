"""Split a qkv Linear output into per-head q, k, v, RMS-normalise q and k, and write them straight into the joint
attention buffers (context at row 0, x at row n_ctx), so the joint sequence is assembled without a torch.cat.

Contract: kernels/reference.py `split_qkv_rmsnorm`. qkv (B, L, 3*H*Dh) is [q | k | v], each head-major (head h owns
columns h*Dh .. h*Dh+Dh-1). One program moves a (BLOCK_L, Dh) tile of one (batch, head) for q, k and v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_shape, check_tensor, check_writable_rows, unit_last_stride
from .launch import launch
from .variants import DH128, IMAGE_TOKENS, meta_tensor, report_case, sd35_launch_sizes

EPS = 1e-6
BLOCK_L = 32  # rows per program: a 32 x 128 fp32 tile per tensor keeps 4 warps busy without spilling


@triton.jit
def _copy_head(src, dst, rows_mask, W, eps, NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Load a (BLOCK_L, HEAD_DIM) tile, RMS-normalise each row with weight W when NORM, store it."""
    x = tl.load(src, mask=rows_mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(W + tl.arange(0, HEAD_DIM)).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = x * rstd[:, None] * w[None, :]
    tl.store(dst, x.to(dst.dtype.element_ty), mask=rows_mask)


@triton.jit
def _split_qkv_rmsnorm_kernel(
    QKV, QW, KW, Q_OUT, K_OUT, V_OUT,
    L, H, seq_offset,
    stride_qkv_b, stride_qkv_l,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    eps,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, HEAD_DIM)
    mask = (rows < L)[:, None]

    src = QKV + b * stride_qkv_b + rows[:, None] * stride_qkv_l + h * HEAD_DIM + cols[None, :]
    width = H * HEAD_DIM  # distance from a head's q columns to its k columns, and from k to v
    dst_rows = (seq_offset + rows)[:, None]
    _copy_head(src, Q_OUT + b * stride_qb + h * stride_qh + dst_rows * stride_ql + cols[None, :],
               mask, QW, eps, NORM_Q, HEAD_DIM)  # fmt: skip
    _copy_head(src + width, K_OUT + b * stride_kb + h * stride_kh + dst_rows * stride_kl + cols[None, :],
               mask, KW, eps, NORM_K, HEAD_DIM)  # fmt: skip
    _copy_head(src + 2 * width, V_OUT + b * stride_vb + h * stride_vh + dst_rows * stride_vl + cols[None, :],
               mask, QW, eps, False, HEAD_DIM)  # fmt: skip


def split_qkv_rmsnorm(qkv, q_weight, k_weight, q_out, k_out, v_out, seq_offset: int) -> None:
    """Write q, k, v of `qkv` (B, L, 3*H*Dh) into (B, H, L_total, Dh) buffers at rows [seq_offset, seq_offset + L),
    RMS-normalising q and k (eps 1e-6, fp32 math) with their (Dh,) weights when those are not None."""
    op = "split_qkv_rmsnorm"
    check_tensor(op, "q_out", q_out, 4)
    B, H, L_total, Dh = q_out.shape
    check_head_dim(op, Dh)
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        check_tensor(op, name, t, 4, q_out.dtype, q_out.device)
        check_shape(op, name, t, q_out.shape)
    for name, t in (("q_out", q_out), ("k_out", k_out), ("v_out", v_out)):
        check_writable_rows(op, name, t)
    check_tensor(op, "qkv", qkv, 3, q_out.dtype, q_out.device)
    if qkv.shape[0] != B or qkv.shape[2] != 3 * H * Dh:
        raise ValueError(
            f"{op}: qkv must have shape ({B}, L, {3 * H * Dh}) for {H} heads of {Dh}, got {tuple(qkv.shape)}"
        )
    L = qkv.shape[1]
    if isinstance(seq_offset, bool) or not isinstance(seq_offset, int) or seq_offset < 0:
        raise ValueError(f"{op}: seq_offset must be a non-negative int, got {seq_offset!r}")
    if seq_offset + L > L_total:
        raise ValueError(
            f"{op}: no room for {L} rows at seq_offset {seq_offset} in buffers of {L_total} rows "
            f"(needs at least {seq_offset + L})"
        )
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            check_tensor(op, name, w, 1, device=q_out.device)
            check_shape(op, name, w, (Dh,))
    if L == 0 or B == 0 or H == 0:
        return
    qkv = unit_last_stride(qkv)
    q_weight = None if q_weight is None else q_weight.contiguous()
    k_weight = None if k_weight is None else k_weight.contiguous()
    placeholder = qkv  # stands in for an absent weight; the kernel never reads it
    grid = (triton.cdiv(L, BLOCK_L), B * H)
    args = (
        qkv, q_weight if q_weight is not None else placeholder, k_weight if k_weight is not None else placeholder,
        q_out, k_out, v_out,
        L, H, seq_offset,
        qkv.stride(0), qkv.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        v_out.stride(0), v_out.stride(1), v_out.stride(2),
        EPS,
    )  # fmt: skip
    meta = dict(NORM_Q=q_weight is not None, NORM_K=k_weight is not None, HEAD_DIM=Dh, BLOCK_L=BLOCK_L, num_warps=4)
    launch(_split_qkv_rmsnorm_kernel, grid, args, meta, q_out.device)


@report_case
def _report_split(dtype: torch.dtype) -> None:
    """Context rows at offset 0 and image rows at offset n_ctx of the joint buffers, with and without qk RMSNorm
    (SD3 Medium has none), at the released sizes and at Dh 128."""
    sizes = sd35_launch_sizes() + [(DH128, 2, 154)]
    for shape, batch, n_ctx in sizes:
        H, Dh = shape.heads, shape.head_dim
        buffers = [meta_tensor(batch, H, n_ctx + IMAGE_TOKENS, Dh, dtype=dtype) for _ in range(3)]
        for weight in (meta_tensor(Dh, dtype=dtype), None):
            for rows, offset in ((n_ctx, 0), (IMAGE_TOKENS, n_ctx)):
                split_qkv_rmsnorm(meta_tensor(batch, rows, 3 * H * Dh, dtype=dtype), weight, weight, *buffers, offset)
