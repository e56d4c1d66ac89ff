"""fused_adaln_modulate kernels against kernels/reference.py (CPU: Triton interpreter; GPU: compiled)."""

import pytest
import torch
import torch.nn.functional as F

from fastsd35.kernels import fused_adaln_modulate as kern
from fastsd35.kernels import reference as ref

from helpers.kernels import DEVICE, assert_within_tolerance, modulation_views, randn, rows, upcast

EPS = 1e-6
# (B, L, D): a single row, D not a power of two (72, 200), the released hidden sizes 1536 and 2432. One program per
# row, so L only sets the number of programs (the interpreter runs them one by one: keep it small).
SHAPES = [(1, 1, 64), (2, 7, 72), (2, 3, 200), (2, 3, 1536), (1, 2, 2432)]
DTYPES = [torch.float32, torch.float16]


# Plain torch in the input dtype (no upcast): the baseline of the tolerance rule.
def torch_ln_modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def torch_gated(x, y, gate, y2=None, gate2=None):
    out = x + gate[:, None] * y
    return out if y2 is None else out + gate2[:, None] * y2


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate(shape, dtype, strided):
    B, L, D = shape
    x = rows(B, L, D, dtype, 0, strided, scale=2.0, mean=0.5)
    shift, scale = modulation_views(B, 2, D, dtype)
    out = kern.ln_modulate(x, shift, scale)
    assert out.dtype == dtype and out.shape == (B, L, D)
    truth = ref.ln_modulate(*upcast(x, shift, scale))
    assert_within_tolerance(out, torch_ln_modulate(x, shift, scale), truth, "ln_modulate")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate2(shape, dtype):
    B, L, D = shape
    x = rows(B, L, D, dtype, 0, scale=2.0, mean=0.5)
    mods = modulation_views(B, 9, D, dtype)  # shift_msa, scale_msa at 0, 1; shift_msa2, scale_msa2 at 6, 7
    out1, out2 = kern.ln_modulate2(x, mods[0], mods[1], mods[6], mods[7])
    truth1, truth2 = ref.ln_modulate2(*upcast(x, mods[0], mods[1], mods[6], mods[7]))
    assert_within_tolerance(out1, torch_ln_modulate(x, mods[0], mods[1]), truth1, "ln_modulate2[0]")
    assert_within_tolerance(out2, torch_ln_modulate(x, mods[6], mods[7]), truth2, "ln_modulate2[1]")


@pytest.mark.parametrize("with_y2", [False, True], ids=["y", "y+y2"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_ln_modulate(shape, dtype, strided, with_y2):
    B, L, D = shape
    x = rows(B, L, D, dtype, 0, strided, scale=2.0, mean=0.5)
    y = rows(B, L, D, dtype, 1, strided)
    mods = modulation_views(B, 9, D, dtype)
    gate, shift, scale = mods[2], mods[3], mods[4]
    y2, gate2 = (rows(B, L, D, dtype, 2), mods[8]) if with_y2 else (None, None)

    x_new, h = kern.gated_residual_ln_modulate(x, y, gate, shift, scale, y2, gate2)
    assert x_new.dtype == h.dtype == dtype
    truth_x, truth_h = ref.gated_residual_ln_modulate(*upcast(x, y, gate, shift, scale, y2, gate2))
    plain_x = torch_gated(x, y, gate, y2, gate2)
    assert_within_tolerance(x_new, plain_x, truth_x, "x_new")
    assert_within_tolerance(h, torch_ln_modulate(plain_x, shift, scale), truth_h, "h")
    # The norm reads the residual as stored: h is LN(x_new) of the returned x_new (rounded to dtype).
    truth_h_stored = ref.ln_modulate(*upcast(x_new, shift, scale))
    assert_within_tolerance(h, torch_ln_modulate(x_new, shift, scale), truth_h_stored, "h of x_new")


def test_norm_reads_the_rounded_residual():
    """h is the norm of x_new as stored in fp16, not of the fp32 sum. Rows near 1000 with std 0.5: fp16's spacing
    there (0.5) moves the normalised values by O(1), so the two readings are far apart and only one matches."""
    B, L, D = 2, 3, 200
    x = rows(B, L, D, torch.float16, 0, scale=0.5, mean=1000.0)
    y = rows(B, L, D, torch.float16, 1)
    gate, shift, scale = modulation_views(B, 3, D, torch.float16)
    x_new, h = kern.gated_residual_ln_modulate(x, y, gate, shift, scale)
    expected_x, expected_h = ref.gated_residual_ln_modulate(x, y, gate, shift, scale)
    unrounded_h = ref.gated_residual_ln_modulate(*upcast(x, y, gate, shift, scale))[1]
    assert (expected_h.float() - unrounded_h).abs().max() > 0.5  # the test can tell the two apart
    torch.testing.assert_close(x_new, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(h, expected_h, rtol=2e-3, atol=2e-3)  # about one fp16 ulp


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(shape, dtype, strided):
    B, L, D = shape
    x = rows(B, L, D, dtype, 0, strided, scale=2.0)
    y = rows(B, L, D, dtype, 1, strided)
    gate = modulation_views(B, 6, D, dtype)[5]
    out = kern.gated_residual(x, y, gate)
    assert out.dtype == dtype and out.shape == (B, L, D)
    assert_within_tolerance(out, torch_gated(x, y, gate), ref.gated_residual(*upcast(x, y, gate)), "gated_residual")


def test_each_vector_keeps_its_own_batch_stride():
    """Modulation vectors need not come from one tensor: each here has its own row stride (D + 8j), so a launcher
    that passes one vector's stride for another's reads the wrong rows of batch 1."""
    B, L, D, dtype = 2, 3, 72, torch.float32
    v = [randn((B, D + 8 * (j + 1)), dtype, 20 + j, scale=0.5)[:, :D] for j in range(6)]
    assert len({t.stride(0) for t in v}) == 6
    x, y, y2 = rows(B, L, D, dtype, 0, scale=2.0), rows(B, L, D, dtype, 1), rows(B, L, D, dtype, 2)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kern.ln_modulate(x, v[0], v[1]), ref.ln_modulate(x, v[0], v[1]), **close)
    for got, want in zip(kern.ln_modulate2(x, v[0], v[1], v[2], v[3]), ref.ln_modulate2(x, v[0], v[1], v[2], v[3])):
        torch.testing.assert_close(got, want, **close)
    for args in ((x, y, v[0], v[1], v[2]), (x, y, v[0], v[1], v[2], y2, v[3])):
        for got, want in zip(kern.gated_residual_ln_modulate(*args), ref.gated_residual_ln_modulate(*args)):
            torch.testing.assert_close(got, want, **close)
    torch.testing.assert_close(kern.gated_residual(x, y, v[4]), ref.gated_residual(x, y, v[4]), **close)


def test_non_unit_last_stride_is_copied():
    """x with a transposed last dimension (stride != 1) gives the same result as its contiguous copy."""
    B, L, D = 2, 3, 72
    x = randn((B, D, L), torch.float32, 0).transpose(1, 2)
    shift, scale = modulation_views(B, 2, D, torch.float32)
    assert x.stride(-1) != 1
    expected = kern.ln_modulate(x.contiguous(), shift, scale)
    torch.testing.assert_close(kern.ln_modulate(x, shift, scale), expected, rtol=0, atol=0)


def test_empty_sequence():
    x = torch.empty(2, 0, 72, device=DEVICE)
    shift, scale = modulation_views(2, 2, 72, torch.float32)
    assert kern.ln_modulate(x, shift, scale).shape == (2, 0, 72)


def test_tolerance_rule_can_fail():
    """The rule is not vacuous: an fp32 result off by 1e-4 is rejected."""
    B, L, D = 2, 5, 72
    x = rows(B, L, D, torch.float32, 0)
    shift, scale = modulation_views(B, 2, D, torch.float32)
    truth = ref.ln_modulate(x, shift, scale)
    with pytest.raises(AssertionError, match="kernel error"):
        assert_within_tolerance(kern.ln_modulate(x, shift, scale) + 1e-4, torch_ln_modulate(x, shift, scale), truth)


# -- launcher errors ----------------------------------------------------------------------------------------------


def _args(B=2, L=5, D=72, dtype=torch.float32):
    return rows(B, L, D, dtype, 0), *modulation_views(B, 2, D, dtype)


def test_error_x_not_3d():
    x, shift, scale = _args()
    with pytest.raises(ValueError, match="ln_modulate: x must have 3 dimensions"):
        kern.ln_modulate(x[0], shift, scale)


def test_error_mod_shape():
    x, shift, scale = _args()
    with pytest.raises(ValueError, match=r"ln_modulate: scale must have shape \(2, 72\), got \(2, 71\)"):
        kern.ln_modulate(x, shift, scale[:, :71])
    with pytest.raises(ValueError, match=r"shift2 must have shape \(2, 72\), got \(1, 72\)"):
        kern.ln_modulate2(x, shift, scale, shift[:1], scale)


def test_error_mismatched_dtype():
    x, shift, scale = _args()
    with pytest.raises(ValueError, match="scale has dtype torch.float16, expected torch.float32"):
        kern.ln_modulate(x, shift, scale.half())
    with pytest.raises(ValueError, match="gated_residual: y has dtype torch.float16"):
        kern.gated_residual(x, x.half(), shift)


def test_error_unsupported_dtype():
    x, shift, scale = _args()
    with pytest.raises(ValueError, match="x has dtype torch.float64; supported"):
        kern.ln_modulate(x.double(), shift.double(), scale.double())


def test_error_residual_shapes():
    x, gate, shift = _args()
    with pytest.raises(ValueError, match=r"gated_residual_ln_modulate: y must have shape \(2, 5, 72\)"):
        kern.gated_residual_ln_modulate(x, x[:, :4], gate, shift, shift)
    with pytest.raises(ValueError, match="y2 and gate2 must be given together"):
        kern.gated_residual_ln_modulate(x, x, gate, shift, shift, y2=x)


def test_error_hidden_size_too_large():
    x, shift, scale = _args(B=1, L=1, D=kern.MAX_D + 1)
    with pytest.raises(ValueError, match="hidden size 16385 is larger than"):
        kern.ln_modulate(x, shift, scale)


# -- GPU: bf16 and the released sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_real_size_gpu(dtype):
    """SD3.5 Large rows: D = 2432, B = 2, L = 4096 latent tokens + 154 context tokens."""
    B, L, D = 2, 4096 + 154, 2432
    x = rows(B, L, D, dtype, 0, scale=2.0, mean=0.5)
    y, y2 = rows(B, L, D, dtype, 1), rows(B, L, D, dtype, 2)
    mods = modulation_views(B, 9, D, dtype)
    out1, out2 = kern.ln_modulate2(x, mods[0], mods[1], mods[6], mods[7])
    truth1, truth2 = ref.ln_modulate2(*upcast(x, mods[0], mods[1], mods[6], mods[7]))
    assert_within_tolerance(out1, torch_ln_modulate(x, mods[0], mods[1]), truth1, "ln_modulate2[0]")
    assert_within_tolerance(out2, torch_ln_modulate(x, mods[6], mods[7]), truth2, "ln_modulate2[1]")
    x_new, h = kern.gated_residual_ln_modulate(x, y, mods[2], mods[3], mods[4], y2, mods[8])
    truth_x, truth_h = ref.gated_residual_ln_modulate(*upcast(x, y, mods[2], mods[3], mods[4], y2, mods[8]))
    plain_x = torch_gated(x, y, mods[2], y2, mods[8])
    assert_within_tolerance(x_new, plain_x, truth_x, "x_new")
    assert_within_tolerance(h, torch_ln_modulate(plain_x, mods[3], mods[4]), truth_h, "h")
    out = kern.gated_residual(x, y, mods[5])
    truth = ref.gated_residual(*upcast(x, y, mods[5]))
    assert_within_tolerance(out, torch_gated(x, y, mods[5]), truth, "gated_residual")
