"""Degenerate inputs for every op, Triton kernels (interpreter on the CPU) and reference ops alike, checked against
values worked out by hand: constant and zero rows (where a norm's epsilon is all that stands between the result and
0/0), rows whose variance is of the order of epsilon (which pins epsilon's value), attention scores large enough to
overflow without the running maximum, all-equal scores, and a last key tile holding a single key."""

import math

import pytest
import torch

from fastsd35 import kernels
from fastsd35.kernels import reference

EPS = 1e-6
OPS = {"torch": reference, "triton": None}  # the Triton ops are loaded lazily (interpreter on the CPU)


@pytest.fixture(params=sorted(OPS))
def ops(request):
    return reference if request.param == "torch" else kernels.TRITON_OPS


def mods(B, D, value):
    return torch.full((B, D), value)


# A constant row c normalises to (c - mean) / sqrt(var + eps) with mean = sum/D rounded in fp32: a residue of up to
# ~ulp(c) = 2.4e-7 * c, divided by sqrt(eps) = 1e-3 and times (1 + scale). For c = 3.7: measured 3.6e-4 (Triton),
# 0 (torch, whose mean is exact here). Without eps the same residue is divided by ~sqrt(residue^2): O(1) errors.
CONSTANT_ROW_ATOL = 2e-3


def test_constant_and_zero_rows_normalise_to_zero(ops):
    """LN of a constant row is 0 (var 0: only eps keeps it from 0/0), so the modulated output is the shift."""
    B, L, D = 2, 3, 72
    x = torch.full((B, L, D), 3.7)
    x[1] = 0.0
    shift, scale = torch.linspace(-1, 1, D).expand(B, D).contiguous(), mods(B, D, 0.5)
    expected = shift[:, None].expand(B, L, D)
    out = ops.ln_modulate(x, shift, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], expected[0], atol=CONSTANT_ROW_ATOL, rtol=0)
    torch.testing.assert_close(out[1], expected[1], atol=0, rtol=0)  # zero row: exactly the shift
    y1, y2 = ops.ln_modulate2(x, shift, scale, -shift, scale)
    torch.testing.assert_close(y1, expected, atol=CONSTANT_ROW_ATOL, rtol=0)
    torch.testing.assert_close(y2, -expected, atol=CONSTANT_ROW_ATOL, rtol=0)
    # the gated residual with a zero gate is x itself, and its norm again the shift
    x_new, h = ops.gated_residual_ln_modulate(x, torch.randn(B, L, D), mods(B, D, 0.0), shift, scale)
    torch.testing.assert_close(x_new, x, atol=0, rtol=0)
    torch.testing.assert_close(h, expected, atol=CONSTANT_ROW_ATOL, rtol=0)


def test_layer_norm_epsilon_is_one_in_a_million(ops):
    """A row of +a, -a with a^2 = eps: LN gives +-a / sqrt(a^2 + eps) = +-1/sqrt(2) (1 without eps, 0.30 at 1e-5)."""
    B, L, D = 1, 2, 64
    a = math.sqrt(EPS)
    x = torch.tensor([a, -a]).repeat(D // 2).expand(B, L, D).contiguous()
    out = ops.ln_modulate(x, mods(B, D, 0.0), mods(B, D, 0.0))
    torch.testing.assert_close(out, x / a / math.sqrt(2), atol=1e-5, rtol=0)


def qkv_buffers(B, H, L, Dh):
    return [torch.zeros(B, H, L, Dh) for _ in range(3)]


def test_rms_norm_of_zero_and_tiny_rows(ops):
    """RMSNorm of a zero row is 0 (eps again), and of a constant row of sqrt(eps) it is w / sqrt(2): pins eps."""
    B, H, L, Dh = 1, 2, 3, 64
    qkv = torch.zeros(B, L, 3 * H * Dh)
    qkv[:, 1, : H * Dh] = math.sqrt(EPS)  # row 1 of q: every head's row is sqrt(eps)
    qkv[:, 2, H * Dh : 2 * H * Dh] = 2.0  # row 2 of k: constant 2 -> normalised to 1
    w = torch.linspace(0.5, 1.5, Dh)
    q, k, v = qkv_buffers(B, H, L, Dh)
    ops.split_qkv_rmsnorm(qkv, w, w, q, k, v, 0)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    assert q[:, :, 0].abs().max() == 0 and k[:, :, 0].abs().max() == 0
    torch.testing.assert_close(q[0, :, 1], (w / math.sqrt(2)).expand(H, Dh), atol=1e-5, rtol=0)
    torch.testing.assert_close(k[0, :, 2], w.expand(H, Dh), atol=1e-5, rtol=0)


def attention(ops, q, k, v, n_ctx):
    B, H, L, Dh = q.shape
    out_ctx = torch.zeros(B, n_ctx, H * Dh) if n_ctx else None
    out_x = torch.zeros(B, L - n_ctx, H * Dh)
    ops.joint_attention(q, k, v, out_ctx, out_x, n_ctx)
    return out_x if not n_ctx else torch.cat([out_ctx, out_x], 1)


def test_attention_with_all_equal_scores_averages_the_values(ops):
    """q = 0: every score is 0, softmax is uniform over all L keys (the partial last tile's 3 keys included)."""
    B, H, L, Dh = 1, 2, 67, 64
    q = torch.zeros(B, H, L, Dh)
    k, v = torch.randn(B, H, L, Dh), torch.randn(B, H, L, Dh)
    out = attention(ops, q, k, v, n_ctx=5)
    expected = v.mean(2, keepdim=True).expand(B, H, L, Dh).transpose(1, 2).reshape(B, L, H * Dh)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_attention_scores_far_beyond_exp_range(ops):
    """Scores of ~1e4 (exp overflows at 88) must go through the running maximum: the result picks the best key's
    value. Key 64 is the best one and sits alone in the last tile (L = 65)."""
    B, H, L, Dh = 1, 1, 65, 64
    q = torch.full((B, H, L, Dh), 30.0)
    k = torch.randn(B, H, L, Dh).clamp(-1, 1) * 10
    k[:, :, -1] = 20.0  # q.k = 30 * 20 * 64 / 8 = 4800 (scaled), above every other key's by at least 1200
    v = torch.randn(B, H, L, Dh)
    out = attention(ops, q, k, v, n_ctx=0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v[:, :, -1:].expand(B, H, L, Dh).transpose(1, 2).reshape(B, L, Dh), atol=1e-5, rtol=0)
