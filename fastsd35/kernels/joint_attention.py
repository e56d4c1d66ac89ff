"""Flash-attention forward over the joint [context, x] sequence, writing each half straight into its proj input.

Contract: kernels/reference.py `joint_attention`. q, k, v: (B, H, L, Dh); non-causal, no mask, scale 1/sqrt(Dh).
Output row r < n_ctx goes to out_ctx[b, r, h*Dh:(h+1)*Dh], row r >= n_ctx to out_x[b, r - n_ctx, ...]; a query tile
that straddles n_ctx writes both with masked stores. n_ctx = 0 is MMDiT-X's x-only second attention.

One program owns a BLOCK_M tile of queries of one (batch, head) and streams the keys in BLOCK_N tiles with an online
softmax in fp32 (exp2, with scale * log2(e) folded into the scores). The full key tiles run unmasked; only the last,
partial one masks its keys (score -inf, value 0).

Two load styles share the one kernel body (constexpr USE_TMA): pointer blocks (every GPU), or, on sm_90+, per-head
tensor descriptors whose TMA loads zero-fill past row L. Which wins is for the GPU benchmark to decide; both are
autotune candidates. The autotuner keys on B*H, a length bucket (not the exact length) and whether q/k/v can be
described to TMA (aligned heads and rows: a misaligned view never reuses a TMA choice made for aligned buffers), keeps
its choices on disk where Triton can, and only times the configs `_configs_for` keeps for the GPU at hand.

Triton's interpreter (the CPU tests) cannot time configs, and Triton before 3.9 tries to even when pruning leaves one
(it needs a GPU driver to): there the launcher runs the kernel itself with the one config `_configs_for` gives the
interpreter, without the autotuner.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from .checks import INTERPRET, check_head_dim, check_shape, check_tensor, check_writable_rows, unit_last_stride
from .launch import launch, register_autotuned
from .variants import DH128, IMAGE_TOKENS, meta_tensor, report_case, sd35_launch_sizes

LOG2E = 1.4426950408889634
TUNE_LENGTH_STEP = 1024  # lengths are tuned in buckets of this many rows (see _tuning_length)


def _config(bm: int, bn: int, warps: int, stages: int, tma: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=warps, num_stages=stages)


# The candidates the autotuner may time: (BLOCK_M, BLOCK_N, num_warps, num_stages). `_configs_for` keeps those that
# fit the GPU, the dtype and the head dim; `fastsd35 kernels` compiles exactly that set per architecture.
POINTER_CONFIGS = [
    _config(*c)
    for c in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3),
              (64, 128, 4, 3), (64, 32, 4, 2))
]  # fmt: skip
# Hopper and later: the same kernel loading q/k/v tiles through tensor descriptors (TMA). The GPU benchmark decides
# whether these win; until then they are candidates beside the pointer loads.
TMA_CONFIGS = [_config(*c, tma=True) for c in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3))]
# fp32 operands: each dot is three TF32 MMAs (FP32_DOT) on tiles of twice the bytes of 16-bit ones, which leaves room
# for few tiles (`fastsd35 kernels --dtype fp32`): at Dh 64 only key tiles of 16 rows, or 32 with 8 warps (sm_90:
# also (128, 32) and (64, 32) on wgmma), compile without spilling; every other tile spills 16-900 bytes. At Dh 128 every
# tile spills on both (600-11000 bytes): fp32 is limited to FP32_MAX_HEAD_DIM on a GPU (SD3.x uses 64). Pointer loads.
FP32_CONFIGS = {
    80: [_config(*c) for c in ((64, 16, 4, 2), (64, 16, 8, 2), (32, 16, 4, 2), (32, 32, 8, 2))],
    90: [_config(*c) for c in ((128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 8, 2), (64, 16, 4, 2), (32, 32, 8, 2))],
}
FP32_MAX_HEAD_DIM = 64
# fp32 dots: "tf32x3" splits each fp32 operand into a TF32 high part and a TF32 remainder and sums three MMAs (the
# remainder-times-remainder term dropped): fp32-level error (~1e-6 relative) at tensor-core speed. Exact "ieee" dots
# have no MMA form and spill at every tile on sm_80 and sm_90; the interpreter runs them exactly (numpy).
FP32_DOT = "ieee" if INTERPRET else "tf32x3"
# Triton's interpreter cannot time configs: the launcher runs this one without the autotuner. Its cost is per op, not
# per element, so 32x32 tiles run faster than smaller ones while still giving test sizes several query/key tiles and
# tails. Tests switch it to the TMA form to run that load path too.
INTERPRETER_CONFIG = _config(32, 32, 4, 1)


def _fp32_only() -> list[triton.Config]:
    """The fp32 configs that are not already 16-bit candidates (the autotuner's list holds each config once)."""
    seen = list(POINTER_CONFIGS)
    for c in FP32_CONFIGS[80] + FP32_CONFIGS[90]:
        if c not in seen:
            seen.append(c)
    return seen[len(POINTER_CONFIGS) :]


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether (B, H, L, Dh) q, k, v can be described to TMA: tensor descriptors need 16-byte aligned bases (here:
    each head's first row, so the batch and head strides count too) and row strides; the last stride is 1 (the
    launcher makes it so). Part of the autotuning key (`tune_tma`)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(stride * size % 16 for stride in t.stride()[:3]):
            return False
    return True


def _fits(config: triton.Config, arch: int, wide: bool) -> bool:
    """Whether `config` can be competitive, from what `fastsd35 kernels` shows the tiles compile to (README). A warp
    holds BLOCK_M / num_warps query rows of the fp32 accumulator (Dh wide) and of the scores (BLOCK_N wide):
    - 16-bit, Dh 64, sm_80 (mma.sync): 32 rows or 32 score columns per warp reach the 255-register limit (no room
      left, one block per SM), so only tiles with at most 16 of each are timed (162-240 registers). Hopper's wgmma
      keeps every candidate at 87-220 registers: all are timed there.
    - Dh 128 (`wide`) doubles that state and the K/V tiles in shared memory: key tiles of at most 64 rows and 16
      query rows per warp; on sm_80 even 4 warps x 16 rows spill (96-256 stack bytes), so only 8-warp tiles remain
      there. (fp32 operands have their own list, FP32_CONFIGS.)
    """
    bm, bn, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    if wide:
        return bn <= 64 and bm // warps <= 16 and (arch >= 90 or warps == 8)
    return arch >= 90 or (bm // warps <= 16 and bn // warps <= 16)


def _configs_for(arch: int | None, named_args: dict) -> list[triton.Config]:
    """The configs the autotuner times on a GPU of compute capability `arch` (None: the interpreter)."""
    if arch is None:
        return [INTERPRETER_CONFIG]
    if named_args["Q"].dtype == torch.float32:
        return list(FP32_CONFIGS[90 if arch >= 90 else 80])
    wide = named_args["HEAD_DIM"] > 64
    configs = [c for c in POINTER_CONFIGS if _fits(c, arch, wide)]
    if arch >= 90 and named_args["tune_tma"]:
        configs += [c for c in TMA_CONFIGS if _fits(c, arch, wide)]
    return configs


def _device_arch(t: torch.Tensor) -> int | None:
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _prune(configs, named_args, **kwargs):
    return _configs_for(_device_arch(named_args["Q"]), {**named_args, **kwargs})


def _tuning_length(L: int) -> int:
    """The length the autotuner keys on: L rounded up to a multiple of TUNE_LENGTH_STEP. The best tile changes with
    the number of query tiles per head, not with each prompt length: 1024x1024 images with 154 to 333 context tokens
    (L = 4250 .. 4429) all share the bucket 5120 and are tuned once."""
    return triton.cdiv(L, TUNE_LENGTH_STEP) * TUNE_LENGTH_STEP


# Tuned choices are kept on disk (Triton's cache) where this Triton can: a new process reuses them instead of timing
# every candidate again. Triton versions without `cache_results` tune once per process.
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_src, v_src, start_n, L, qk_scale,
    stride_kl, stride_vl,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i) of a query tile. k_src/v_src are the
    (BLOCK_N, Dh) pointer blocks of the first key tile, or the heads' tensor descriptors when USE_TMA."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:  # rows past L come back as zeros: the descriptor's shape ends at L
        k = k_src.load([start_n, 0])
        v = v_src.load([start_n, 0])
    elif MASK_KEYS:
        key_mask = (offs_n < L)[:, None]
        k = tl.load(k_src + start_n * stride_kl, mask=key_mask, other=0.0)
        v = tl.load(v_src + start_n * stride_vl, mask=key_mask, other=0.0)
    else:
        k = tl.load(k_src + start_n * stride_kl)
        v = tl.load(v_src + start_n * stride_vl)
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


@triton.autotune(
    configs=POINTER_CONFIGS + TMA_CONFIGS + _fp32_only(),
    # What moves the best tile: the number of (batch, head) programs, the length bucket, the head dim (and the dtype,
    # which Triton adds to every key); what decides the candidates: whether the TMA forms can load these tensors.
    key=["tune_bh", "tune_len", "tune_tma", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune},
    **_CACHE_RESULTS,
)
@triton.jit(do_not_specialize=["tune_bh", "tune_len", "tune_tma"])
def _joint_attention_kernel(
    Q, K, V, OUT_CTX, OUT_X,
    L, H, n_ctx, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_cb, stride_cl,
    stride_xb, stride_xl,
    tune_bh, tune_len, tune_tma,  # the autotuner's key (B*H, _tuning_length(L), _tma_ready); unused by the kernel
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # load q/k/v tiles through tensor descriptors (sm_90+) instead of pointer blocks
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q_head = Q + b * stride_qb + h * stride_qh
    k_head = K + b * stride_kb + h * stride_kh
    v_head = V + b * stride_vb + h * stride_vh
    if USE_TMA:  # one (L, HEAD_DIM) descriptor per head: loads past row L are zero-filled by the hardware
        q_desc = tl.make_tensor_descriptor(q_head, [L, HEAD_DIM], [stride_ql, 1], [BLOCK_M, HEAD_DIM])
        k_src = tl.make_tensor_descriptor(k_head, [L, HEAD_DIM], [stride_kl, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_head, [L, HEAD_DIM], [stride_vl, 1], [BLOCK_N, HEAD_DIM])
        q = q_desc.load([pid_m * BLOCK_M, 0])
    else:
        q = tl.load(q_head + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        k_src = k_head + offs_n[:, None] * stride_kl + offs_d[None, :]
        v_src = v_head + offs_n[:, None] * stride_vl + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, L, qk_scale, stride_kl, stride_vl,
                                     BLOCK_N, False, DOT_PRECISION, USE_TMA)  # fmt: skip
    if n_full < L:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src, n_full, L, qk_scale, stride_kl, stride_vl,
                                     BLOCK_N, True, DOT_PRECISION, USE_TMA)  # fmt: skip
    o = (acc / l_i[:, None]).to(OUT_X.dtype.element_ty)

    # Rows < n_ctx belong to the context stream, the rest to x; column h*Dh of the (.., H*Dh) proj input. Both load
    # styles store with masked pointers: a tile may straddle n_ctx, and the stores are once per tile.
    cols = h * HEAD_DIM + offs_d[None, :]
    is_ctx = offs_m < n_ctx
    tl.store(OUT_CTX + b * stride_cb + offs_m[:, None] * stride_cl + cols, o, mask=is_ctx[:, None])
    tl.store(OUT_X + b * stride_xb + (offs_m - n_ctx)[:, None] * stride_xl + cols, o,
             mask=(row_ok & (offs_m >= n_ctx))[:, None])  # fmt: skip


register_autotuned(_joint_attention_kernel, _configs_for)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory Triton asks for at launch (on Hopper, device-built tensor descriptors live there)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: launch() made it the tensors'


def _ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors of the TMA configs, unless the caller already set one."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if current is not None else None
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_scratch)


def joint_attention(q, k, v, out_ctx, out_x, n_ctx: int) -> None:
    """softmax(q k^T / sqrt(Dh)) v over all L rows of (B, H, L, Dh) q/k/v; rows < n_ctx are written to out_ctx
    (B, n_ctx, H*Dh), the others to out_x (B, L - n_ctx, H*Dh). out_ctx may be None when n_ctx == 0."""
    op = "joint_attention"
    check_tensor(op, "q", q, 4)
    B, H, L, Dh = q.shape
    check_head_dim(op, Dh)
    if q.dtype == torch.float32 and Dh > FP32_MAX_HEAD_DIM and not INTERPRET:
        raise ValueError(f"{op}: fp32 supports head dims up to {FP32_MAX_HEAD_DIM} on a GPU (no tile of Dh {Dh} fits "
                         f"in registers without spilling); use fp16 or bf16")
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
    if q.device.type == "cuda":
        _ensure_allocator()

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]), B * H)

    args = (
        q, k, v, out_ctx, out_x,
        L, H, n_ctx, LOG2E / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out_ctx.stride(0), out_ctx.stride(1),
        out_x.stride(0), out_x.stride(1),
        B * H, _tuning_length(L), int(_tma_ready(q, k, v)),
    )  # fmt: skip
    # fp32 must keep fp32 accuracy (plain TF32 would be ~1e-3 off); 16-bit operands use the native MMA either way.
    meta = dict(HEAD_DIM=Dh, DOT_PRECISION=FP32_DOT if q.dtype == torch.float32 else "tf32")
    if INTERPRET:  # no timing without a GPU: the interpreter's one config, launched directly (module docstring)
        (config,) = _configs_for(None, {})
        launch(_joint_attention_kernel.fn, grid, args, {**meta, **config.all_kwargs()}, q.device)
        return
    launch(_joint_attention_kernel, grid, args, meta, q.device)


@report_case
def _report_attention(dtype: torch.dtype) -> None:
    """The joint attention (context rows into out_ctx, image rows into out_x) and MMDiT-X's x-only second attention
    (n_ctx = 0), at the released sizes and at Dh 128, into the model's workspace buffers."""
    wide = [(DH128, 2, 154)] if dtype != torch.float32 else []  # fp32 stops at FP32_MAX_HEAD_DIM
    for shape, batch, n_ctx in sd35_launch_sizes() + wide:
        H, Dh, D = shape.heads, shape.head_dim, shape.hidden
        for ctx in (n_ctx, 0):
            q, k, v = (meta_tensor(batch, H, ctx + IMAGE_TOKENS, Dh, dtype=dtype) for _ in range(3))
            out_ctx = meta_tensor(batch, ctx, D, dtype=dtype) if ctx else None
            joint_attention(q, k, v, out_ctx, meta_tensor(batch, IMAGE_TOKENS, D, dtype=dtype), ctx)
