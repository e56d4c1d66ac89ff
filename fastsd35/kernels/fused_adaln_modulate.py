"""LayerNorm + adaLN modulation, and the gated residual that precedes it, as one pass over each row.

Contracts: kernels/reference.py (`ln_modulate`, `ln_modulate2`, `gated_residual_ln_modulate`, `gated_residual`).
x, y: (B, L, D) with a contiguous last dimension (other strides are free); shift/scale/gate: (B, D), typically the
strided views `mods[:, j]` of the batched modulation tensor (row stride = all blocks' modulation width). One program
normalises one row (b, l) held whole in registers: BLOCK_D = next_power_of_2(D) with the tail masked, fp32 math,
results stored in the input dtype.

FP8 out (`FP8_OUT`, the `*_fp8` launchers): the modulated rows that feed FP8 GEMMs are also written as float8_e4m3fn
with one fp32 scale per row, from the values as stored in the output dtype, in the same pass: exactly
`fastsd35.models.fp8.quantize_rows` of the output (scale = absmax / 448, round to nearest even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_shape, check_tensor, unit_last_stride
from .launch import launch
from .variants import IMAGE_TOKENS, meta_tensor, modulation_rows, report_case, sd35_launch_sizes

EPS = 1e-6
MAX_D = 16384  # a whole row lives in registers; beyond this it would spill


@triton.jit
def _layer_norm_row(x, mask, D, eps):
    """LayerNorm (no affine) of one fp32 row; masked lanes must hold 0 and come out as 0."""
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    return xc * tl.rsqrt(var + eps)


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest float8_e4m3fn value (ties to even), still in fp32: the cast to fp8
    that follows is then exact. Rounding here rather than in the cast keeps one behaviour everywhere (Triton's CPU
    interpreter drops the carry of a cast that rounds up into the next power of two)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag = bits & 0x7FFFFFFF
    # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits, rounding to nearest even on the bit pattern.
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576
    # Subnormal range: multiples of 2^-9, which is fp32's spacing at 2^14: adding and removing 2^14 rounds there.
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a + 16384.0) - 16384.0).to(tl.int32, bitcast=True)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _store_fp8_row(y, mask, cols, Q_ROW, S_ROW):
    """One row y (fp32, masked lanes 0) as float8_e4m3fn at Q_ROW[cols] and its scale absmax / 448 at S_ROW."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
    fp8_max = tl.full((), 448.0, tl.float32)
    # IEEE divisions (div_rn), as torch's tensor / tensor: `/` may compile to an approximate division.
    q = _round_to_e4m3(tl.clamp(y * tl.math.div_rn(fp8_max, amax), -448.0, 448.0))
    tl.store(Q_ROW + cols, q.to(Q_ROW.dtype.element_ty), mask=mask)
    tl.store(S_ROW, tl.math.div_rn(amax, fp8_max))


@triton.jit
def _ln_modulate_kernel(
    X, SHIFT1, SCALE1, SHIFT2, SCALE2, OUT1, OUT2,
    L, D,
    stride_xb, stride_xl, stride_shift1, stride_scale1, stride_shift2, stride_scale2, stride_ob, stride_ol,
    eps,
    TWO: tl.constexpr,  # also write LN(x) * (1 + scale2) + shift2 to OUT2
    BLOCK_D: tl.constexpr,
    Q1=None, S1=None, Q2=None, S2=None,  # FP8 out: (B*L, D) float8_e4m3fn rows and (B*L,) fp32 scales
    FP8_OUT: tl.constexpr = False,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    h = _layer_norm_row(x, mask, D, eps)
    out = b * stride_ob + l * stride_ol + cols

    shift = tl.load(SHIFT1 + b * stride_shift1 + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE1 + b * stride_scale1 + cols, mask=mask, other=0.0).to(tl.float32)
    y1 = (h * (1.0 + scale) + shift).to(OUT1.dtype.element_ty)
    tl.store(OUT1 + out, y1, mask=mask)
    if FP8_OUT:
        _store_fp8_row(y1.to(tl.float32), mask, cols, Q1 + row.to(tl.int64) * D, S1 + row)
    if TWO:
        shift2 = tl.load(SHIFT2 + b * stride_shift2 + cols, mask=mask, other=0.0).to(tl.float32)
        scale2 = tl.load(SCALE2 + b * stride_scale2 + cols, mask=mask, other=0.0).to(tl.float32)
        y2 = (h * (1.0 + scale2) + shift2).to(OUT2.dtype.element_ty)
        tl.store(OUT2 + out, y2, mask=mask)
        if FP8_OUT:
            _store_fp8_row(y2.to(tl.float32), mask, cols, Q2 + row.to(tl.int64) * D, S2 + row)


@triton.jit
def _gated_residual_ln_modulate_kernel(
    X, Y, GATE, Y2, GATE2, SHIFT, SCALE, X_NEW, H,
    L, D,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_y2b, stride_y2l,
    stride_gate, stride_gate2, stride_shift, stride_scale, stride_ob, stride_ol,
    eps,
    HAS_Y2: tl.constexpr,
    NORM: tl.constexpr,  # False: only x_new = x + gate * y (gated_residual)
    BLOCK_D: tl.constexpr,
    Q=None, S=None,  # FP8 out (with NORM): h as (B*L, D) float8_e4m3fn rows and (B*L,) fp32 scales
    FP8_OUT: tl.constexpr = False,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + l * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    x_new = x + gate * y
    if HAS_Y2:
        y2 = tl.load(Y2 + b * stride_y2b + l * stride_y2l + cols, mask=mask, other=0.0).to(tl.float32)
        gate2 = tl.load(GATE2 + b * stride_gate2 + cols, mask=mask, other=0.0).to(tl.float32)
        x_new = x_new + gate2 * y2
    # The residual is stored in the input dtype, and the norm reads it as stored (as the next block would).
    x_new = x_new.to(X_NEW.dtype.element_ty)
    out = b * stride_ob + l * stride_ol + cols
    tl.store(X_NEW + out, x_new, mask=mask)
    if NORM:
        h = _layer_norm_row(x_new.to(tl.float32), mask, D, eps)
        shift = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h * (1.0 + scale) + shift).to(H.dtype.element_ty)
        tl.store(H + out, h, mask=mask)
        if FP8_OUT:
            _store_fp8_row(h.to(tl.float32), mask, cols, Q + row.to(tl.int64) * D, S + row)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: validate, allocate the outputs, launch one program per row.


def _row_launch(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of width D."""
    block_d = triton.next_power_of_2(D)
    return block_d, min(max(block_d // 256, 1), 8)


def _check_rows(op: str, x) -> tuple[int, int, int]:
    check_tensor(op, "x", x, 3)
    if x.shape[-1] > MAX_D:
        raise ValueError(f"{op}: hidden size {x.shape[-1]} is larger than the {MAX_D} this kernel keeps in registers")
    return tuple(x.shape)


def _check_mods(op: str, x: torch.Tensor, **mods) -> dict[str, torch.Tensor]:
    """(B, D) modulation vectors with the dtype and device of x, last dimension made contiguous if it is not."""
    B, _, D = x.shape
    checked = {}
    for name, t in mods.items():
        check_tensor(op, name, t, 2, x.dtype, x.device)
        check_shape(op, name, t, (B, D))
        checked[name] = unit_last_stride(t)
    return checked


def _check_like_x(op: str, name: str, x: torch.Tensor, t) -> torch.Tensor:
    check_tensor(op, name, t, 3, x.dtype, x.device)
    check_shape(op, name, t, x.shape)
    return unit_last_stride(t)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x; no affine, eps 1e-6) * (1 + scale) + shift, in x's dtype."""
    return _ln_modulate("ln_modulate", x, shift, scale, fp8=False)[0]


def ln_modulate2(x, shift1, scale1, shift2, scale2) -> tuple[torch.Tensor, torch.Tensor]:
    """One LayerNorm of x, two modulations: (LN(x)*(1+scale1)+shift1, LN(x)*(1+scale2)+shift2)."""
    return _ln_modulate2("ln_modulate2", x, shift1, scale1, shift2, scale2, fp8=False)[:2]


def gated_residual_ln_modulate(x, y, gate, shift, scale, y2=None, gate2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate*y (+ gate2*y2), rounded to x's dtype; h = LN(x_new)*(1+scale)+shift. Returns (x_new, h)."""
    return _gated_residual_ln_modulate("gated_residual_ln_modulate", x, y, gate, shift, scale, y2, gate2, fp8=False)[:2]


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, in x's dtype (a new tensor)."""
    op = "gated_residual"
    B, L, D = _check_rows(op, x)
    y = _check_like_x(op, "y", x, y)
    gate = _check_mods(op, x, gate=gate)["gate"]
    x = unit_last_stride(x)
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    _launch_gated_residual(x, y, gate, None, None, None, out, None)
    return out


# FP8 out: the same passes, also writing the rows that feed FP8 GEMMs quantized (fastsd35.models.fp8.quantize_rows).


def ln_modulate_fp8(x, shift, scale):
    """`ln_modulate`, and its output quantized per row in the same pass: (y, (q, s)) with y ~ q.float() * s."""
    return _ln_modulate("ln_modulate_fp8", x, shift, scale, fp8=True)


def ln_modulate2_fp8(x, shift1, scale1, shift2, scale2):
    """`ln_modulate2`, and both outputs quantized per row in the same pass: (y1, y2, (q1, s1), (q2, s2))."""
    return _ln_modulate2("ln_modulate2_fp8", x, shift1, scale1, shift2, scale2, fp8=True)


def gated_residual_ln_modulate_fp8(x, y, gate, shift, scale, y2=None, gate2=None):
    """`gated_residual_ln_modulate`, and h quantized per row in the same pass: (x_new, h, (q, s))."""
    return _gated_residual_ln_modulate("gated_residual_ln_modulate_fp8", x, y, gate, shift, scale, y2, gate2, fp8=True)


def _fp8_rows(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn rows like `out`, fp32 scales (B, L, 1)) to be written beside `out`."""
    B, L, _ = out.shape
    return torch.empty(out.shape, dtype=torch.float8_e4m3fn, device=out.device), \
        torch.empty((B, L, 1), dtype=torch.float32, device=out.device)


# ----------------------------------------------------------------------------------------------------------------
# One checked path per kernel for both output kinds; `fp8` adds the quantized rows (None otherwise).


def _ln_modulate(op, x, shift, scale, fp8: bool):
    B, L, D = _check_rows(op, x)
    m = _check_mods(op, x, shift=shift, scale=scale)
    x = unit_last_stride(x)
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    rows = _fp8_rows(out) if fp8 else None
    _launch_ln_modulate(x, (m["shift"], m["scale"]), None, out, None, rows, None)
    return out, rows


def _ln_modulate2(op, x, shift1, scale1, shift2, scale2, fp8: bool):
    B, L, D = _check_rows(op, x)
    m = _check_mods(op, x, shift1=shift1, scale1=scale1, shift2=shift2, scale2=scale2)
    x = unit_last_stride(x)
    out1 = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    out2 = torch.empty_like(out1)
    rows1, rows2 = (_fp8_rows(out1), _fp8_rows(out2)) if fp8 else (None, None)
    _launch_ln_modulate(x, (m["shift1"], m["scale1"]), (m["shift2"], m["scale2"]), out1, out2, rows1, rows2)
    return out1, out2, rows1, rows2


def _gated_residual_ln_modulate(op, x, y, gate, shift, scale, y2, gate2, fp8: bool):
    if (y2 is None) != (gate2 is None):
        raise ValueError(f"{op}: y2 and gate2 must be given together")
    B, L, D = _check_rows(op, x)
    y = _check_like_x(op, "y", x, y)
    mods = dict(gate=gate, shift=shift, scale=scale)
    if y2 is not None:
        y2 = _check_like_x(op, "y2", x, y2)
        mods["gate2"] = gate2
    m = _check_mods(op, x, **mods)
    x = unit_last_stride(x)
    x_new = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x_new)
    rows = _fp8_rows(h) if fp8 else None
    _launch_gated_residual(x, y, m["gate"], y2, m.get("gate2"), (m["shift"], m["scale"]), x_new, h, rows)
    return x_new, h, rows


def _launch_ln_modulate(x, mod1, mod2, out1, out2, fp8_1=None, fp8_2=None):
    B, L, D = x.shape
    if out1.numel() == 0:
        return
    block_d, num_warps = _row_launch(D)
    two = mod2 is not None
    shift2, scale2 = mod2 if two else mod1  # unused placeholders when TWO is off
    out2, fp8_2 = (out2, fp8_2) if two else (out1, fp8_1)
    args = (
        x, mod1[0], mod1[1], shift2, scale2, out1, out2,
        L, D,
        x.stride(0), x.stride(1), mod1[0].stride(0), mod1[1].stride(0), shift2.stride(0), scale2.stride(0),
        out1.stride(0), out1.stride(1),
        EPS,
    )  # fmt: skip
    meta = dict(TWO=two, BLOCK_D=block_d, num_warps=num_warps)
    if fp8_1 is not None:
        meta.update(Q1=fp8_1[0], S1=fp8_1[1], Q2=fp8_2[0], S2=fp8_2[1], FP8_OUT=True)
    launch(_ln_modulate_kernel, (B * L,), args, meta, x.device)


def _launch_gated_residual(x, y, gate, y2, gate2, mod, x_new, h, fp8=None):
    B, L, D = x.shape
    if x_new.numel() == 0:
        return
    block_d, num_warps = _row_launch(D)
    has_y2, norm = y2 is not None, mod is not None
    # Placeholders for the pointers a constexpr flag switches off; the kernel never reads them.
    y2, gate2 = (y2, gate2) if has_y2 else (y, gate)
    shift, scale = mod if norm else (gate, gate)
    h = h if norm else x_new
    args = (
        x, y, gate, y2, gate2, shift, scale, x_new, h,
        L, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), y2.stride(0), y2.stride(1),
        gate.stride(0), gate2.stride(0), shift.stride(0), scale.stride(0), x_new.stride(0), x_new.stride(1),
        EPS,
    )  # fmt: skip
    meta = dict(HAS_Y2=has_y2, NORM=norm, BLOCK_D=block_d, num_warps=num_warps)
    if fp8 is not None:
        meta.update(Q=fp8[0], S=fp8[1], FP8_OUT=True)
    launch(_gated_residual_ln_modulate_kernel, (B * L,), args, meta, x.device)


@report_case
def _report_rows(dtype: torch.dtype) -> None:
    """Every row op at the released sizes, with the modulation vectors as strided views, as the model passes them."""
    for shape, batch, n_ctx in sd35_launch_sizes():
        mods = modulation_rows(batch, shape.hidden, 9, dtype)
        for rows in (n_ctx, IMAGE_TOKENS):
            x, y, y2 = (meta_tensor(batch, rows, shape.hidden, dtype=dtype) for _ in range(3))
            ln_modulate(x, mods[0], mods[1])
            ln_modulate2(x, mods[0], mods[1], mods[6], mods[7])
            gated_residual_ln_modulate(x, y, mods[2], mods[3], mods[4])
            gated_residual_ln_modulate(x, y, mods[2], mods[3], mods[4], y2, mods[8])
            gated_residual(x, y, mods[5])
            # the FP8 path's launches (FP8_OUT; compiled for sm_89+ only, the GPUs with FP8 tensor cores)
            if dtype is not torch.float32:
                ln_modulate_fp8(x, mods[0], mods[1])
                ln_modulate2_fp8(x, mods[0], mods[1], mods[6], mods[7])
                gated_residual_ln_modulate_fp8(x, y, mods[2], mods[3], mods[4])
                gated_residual_ln_modulate_fp8(x, y, mods[2], mods[3], mods[4], y2, mods[8])
