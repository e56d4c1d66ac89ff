"""FP8 out of the adaLN row kernels (kernels/fused_adaln_modulate.py, FP8_OUT) under Triton's interpreter: the FP8
bytes and per-row scales are exactly fastsd35.models.fp8.quantize_rows of the output the same pass stores, the
outputs are those of the plain kernels, and the FP8 FastMMDiTX feeds them to its FP8 GEMMs."""

import copy

import pytest
import torch
import triton
import triton.language as tl

from fastsd35.kernels import fused_adaln_modulate as kern
from fastsd35.models import fp8 as Q
from fastsd35.models.mmditx import FastMMDiTX

from helpers.kernels import modulation_views, rows
from helpers.models import TINY_CONFIGS, inputs, make_model

SHAPES = [(1, 1, 64), (2, 7, 72), (2, 3, 200), (1, 2, 1536)]
DTYPES = [torch.float32, torch.float16]


def assert_quantized(out, fp8):
    q, s = fp8
    want_q, want_s = Q.quantize_rows(out)
    assert q.dtype == torch.float8_e4m3fn and q.shape == out.shape and s.shape == (*out.shape[:2], 1)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s, want_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate_fp8(shape, dtype):
    B, L, D = shape
    x = rows(B, L, D, dtype, 0, strided=True, scale=2.0, mean=0.5)
    shift, scale = modulation_views(B, 2, D, dtype)
    out, fp8 = kern.ln_modulate_fp8(x, shift, scale)
    assert torch.equal(out, kern.ln_modulate(x, shift, scale))
    assert_quantized(out, fp8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate2_fp8(shape, dtype):
    B, L, D = shape
    x = rows(B, L, D, dtype, 1, scale=3.0)
    mods = modulation_views(B, 4, D, dtype)
    out1, out2, fp8_1, fp8_2 = kern.ln_modulate2_fp8(x, *mods)
    plain1, plain2 = kern.ln_modulate2(x, *mods)
    assert torch.equal(out1, plain1) and torch.equal(out2, plain2)
    assert_quantized(out1, fp8_1)
    assert_quantized(out2, fp8_2)


@pytest.mark.parametrize("second", [False, True], ids=["y", "y+y2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_ln_modulate_fp8(shape, dtype, second):
    B, L, D = shape
    x, y = rows(B, L, D, dtype, 2, strided=True), rows(B, L, D, dtype, 3)
    gate, shift, scale, gate2 = modulation_views(B, 4, D, dtype)
    y2 = rows(B, L, D, dtype, 4) if second else None
    gate2 = gate2 if second else None
    x_new, h, fp8 = kern.gated_residual_ln_modulate_fp8(x, y, gate, shift, scale, y2, gate2)
    plain_x, plain_h = kern.gated_residual_ln_modulate(x, y, gate, shift, scale, y2, gate2)
    assert torch.equal(x_new, plain_x) and torch.equal(h, plain_h)
    assert_quantized(h, fp8)


@triton.jit
def _round_kernel(X, OUT, N: tl.constexpr):
    cols = tl.arange(0, N)
    tl.store(OUT + cols, kern._round_to_e4m3(tl.load(X + cols)).to(OUT.dtype.element_ty))


def test_rounding_to_e4m3_matches_torch_cast():
    # Every kind of value: ties (to even), values that round up into the next power of two (the interpreter's own
    # cast gets those wrong), subnormals and their ties, signed zeros, the largest finite value.
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()]
    mids = (grid[:-1].sort().values + grid.sort().values[1:]) / 2
    g = torch.Generator().manual_seed(0)
    values = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids * (1 + 1e-7),
                        torch.randn(500, generator=g) * 30, torch.tensor([-0.0, 0.0, 2.0**-10, -(2.0**-10), 448.0])])
    values = values[values.abs() <= 448]
    n = triton.next_power_of_2(values.numel())
    x = torch.zeros(n)
    x[: values.numel()] = values
    out = torch.empty(n, dtype=torch.float8_e4m3fn)
    _round_kernel[(1,)](x, out, N=n)
    assert torch.equal(out.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_fp8_fast_model_takes_the_fused_rows():
    config = TINY_CONFIGS["sd35_medium"]
    model8 = Q.quantize_(make_model(config))
    fast8 = FastMMDiTX.from_mmditx(copy.deepcopy(model8))
    fused = set()
    for name in Q.fp8_layer_names(fast8):
        fast8.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: fused.add(name) if hasattr(args[0], "fp8_rows") else None)
    x, t, y, ctx = inputs(config, h=8, w=8, n_ctx=5)
    with torch.no_grad():
        out, expected = fast8(x, t, y, ctx), model8(x, t, y, ctx)
    # qkv (both attentions) and fc1 read the row kernels' FP8 output; proj and fc2 quantize their inputs themselves.
    assert fused and all(name.endswith(("qkv", "fc1")) for name in fused)
    assert len(fused) == sum(name.endswith(("qkv", "fc1")) for name in Q.fp8_layer_names(fast8))
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4  # measured 2e-7
