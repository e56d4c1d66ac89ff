"""split_qkv_rmsnorm kernel against kernels/reference.py (CPU: Triton interpreter; GPU: compiled)."""

import pytest
import torch

from fastsd35.kernels import reference as ref
from fastsd35.kernels import rmsnorm_qk as kern

from helpers.kernels import DEVICE, assert_within_tolerance, randn, upcast

EPS = 1e-6
DTYPES = [torch.float32, torch.float16]
# (B, H, L, L_total, seq_offset): rows in the middle of the buffer with a tail (37 rows, blocks of 32); the context
# at offset 0; x after a 77-row context filling the buffer to the end.
LAYOUTS = [(2, 3, 37, 50, 5), (1, 2, 77, 141, 0), (2, 1, 64, 141, 77)]


def make_qkv(B, L, H, Dh, dtype, strided=False):
    """A qkv Linear output (B, L, 3*H*Dh); `strided`: a view with a padded row stride."""
    width = 3 * H * Dh
    if strided:
        return randn((B, L, width + 16), dtype, 0, scale=2.0, mean=0.3)[..., :width]
    return randn((B, L, width), dtype, 0, scale=2.0, mean=0.3)


def make_weight(Dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(Dh, generator=g)).to(device=DEVICE, dtype=dtype)


def torch_rms_norm(x, w):
    """RMSNorm written plainly in x's dtype (the baseline of the tolerance rule)."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w


@pytest.mark.parametrize("normed", [True, False], ids=["rms", "no-norm"])
@pytest.mark.parametrize("Dh", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_split_qkv_rmsnorm(layout, dtype, Dh, normed):
    B, H, L, L_total, offset = layout
    qkv = make_qkv(B, L, H, Dh, dtype, strided=offset == 5)
    qw, kw = (make_weight(Dh, dtype, 1), make_weight(Dh, dtype, 2)) if normed else (None, None)
    # NaN everywhere: rows outside [offset, offset + L) must stay untouched, rows inside must all be written.
    bufs = [torch.full((B, H, L_total, Dh), float("nan"), dtype=dtype, device=DEVICE) for _ in range(3)]
    kern.split_qkv_rmsnorm(qkv, qw, kw, *bufs, offset)

    rows = slice(offset, offset + L)
    for buf in bufs:
        outside = torch.cat([buf[:, :, :offset], buf[:, :, offset + L :]], dim=2)
        assert outside.isnan().all(), "wrote outside [seq_offset, seq_offset + L)"
    q, k, v = (t.transpose(1, 2) for t in qkv.reshape(B, L, 3, H, Dh).unbind(2))  # (B, H, L, Dh)
    assert torch.equal(bufs[2][:, :, rows], v), "v is a plain copy"
    for name, buf, x, w in (("q", bufs[0], q, qw), ("k", bufs[1], k, kw)):
        out = buf[:, :, rows]
        if w is None:
            assert torch.equal(out, x), f"{name} without a weight is a plain copy"
        else:
            truth = ref.rms_norm(*upcast(x, w))
            assert_within_tolerance(out, torch_rms_norm(x, w), truth, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_joint_assembly_matches_reference(dtype):
    """As model.py uses it: context at offset 0, x at offset n_ctx, together filling the joint buffers."""
    B, H, Dh, n_ctx, n_x = 2, 2, 64, 13, 36
    ctx_qkv, x_qkv = make_qkv(B, n_ctx, H, Dh, dtype), make_qkv(B, n_x, H, Dh, dtype, strided=True)
    qw, kw = make_weight(Dh, dtype, 1), make_weight(Dh, dtype, 2)
    ours = [torch.full((B, H, n_ctx + n_x, Dh), float("nan"), dtype=dtype, device=DEVICE) for _ in range(3)]
    theirs = [torch.full_like(t, float("nan")) for t in ours]
    for qkv, offset in ((ctx_qkv, 0), (x_qkv, n_ctx)):
        kern.split_qkv_rmsnorm(qkv, qw, kw, *ours, offset)
        ref.split_qkv_rmsnorm(qkv, qw, kw, *theirs, offset)
    atol = 1e-5 if dtype == torch.float32 else 2e-3  # both round fp32 math to dtype once: at most ~1 ulp apart
    for a, b in zip(ours, theirs):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


# -- launcher errors ----------------------------------------------------------------------------------------------


def _args(B=2, H=2, L=5, L_total=9, Dh=64, dtype=torch.float32):
    qkv = make_qkv(B, L, H, Dh, dtype)
    bufs = [torch.zeros(B, H, L_total, Dh, dtype=dtype, device=DEVICE) for _ in range(3)]
    return qkv, make_weight(Dh, dtype, 1), make_weight(Dh, dtype, 2), *bufs


def test_error_no_room():
    args = _args(L=5, L_total=9)
    with pytest.raises(ValueError, match="no room for 5 rows at seq_offset 5 in buffers of 9 rows"):
        kern.split_qkv_rmsnorm(*args, 5)
    with pytest.raises(ValueError, match="seq_offset must be a non-negative int"):
        kern.split_qkv_rmsnorm(*args, -1)


def test_error_qkv_width():
    qkv, qw, kw, q, k, v = _args(H=2, Dh=64)
    with pytest.raises(ValueError, match=r"qkv must have shape \(2, L, 384\) for 2 heads of 64, got \(2, 5, 383\)"):
        kern.split_qkv_rmsnorm(qkv[..., :383], qw, kw, q, k, v, 0)


def test_error_mismatched_dtype():
    qkv, qw, kw, q, k, v = _args()
    with pytest.raises(ValueError, match="qkv has dtype torch.float16, expected torch.float32"):
        kern.split_qkv_rmsnorm(qkv.half(), qw, kw, q, k, v, 0)
    with pytest.raises(ValueError, match="v_out has dtype torch.float16"):
        kern.split_qkv_rmsnorm(qkv, qw, kw, q, k, v.half(), 0)


def test_error_buffer_shapes():
    qkv, qw, kw, q, k, v = _args()
    with pytest.raises(ValueError, match=r"k_out must have shape \(2, 2, 9, 64\), got \(2, 2, 8, 64\)"):
        kern.split_qkv_rmsnorm(qkv, qw, kw, q, k[:, :, :8], v, 0)
    with pytest.raises(ValueError, match=r"q_weight must have shape \(64,\), got \(63,\)"):
        kern.split_qkv_rmsnorm(qkv, qw[:63], kw, q, k, v, 0)
    with pytest.raises(ValueError, match="q_out must have a contiguous last dimension"):
        kern.split_qkv_rmsnorm(qkv, qw, kw, q.transpose(2, 3).contiguous().transpose(2, 3), k, v, 0)


def test_error_weights_of_the_wrong_kind():
    """The norm weights are checked like every other tensor: one dimension, on the outputs' device (a meta or
    other-device weight would be read by the kernel from the wrong memory)."""
    qkv, qw, kw, q, k, v = _args()
    with pytest.raises(ValueError, match=r"k_weight .*device"):
        kern.split_qkv_rmsnorm(qkv, qw, kw.to("meta"), q, k, v, 0)
    with pytest.raises(ValueError, match=r"q_weight"):
        kern.split_qkv_rmsnorm(qkv, qw[None], kw, q, k, v, 0)


def test_error_head_dim():
    qkv, qw, kw, q, k, v = _args(Dh=32)
    with pytest.raises(ValueError, match="head dim 32 is not supported"):
        kern.split_qkv_rmsnorm(qkv, qw, kw, q, k, v, 0)


# -- GPU: bf16 and the released sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_real_size_gpu(dtype):
    """SD3.5 Large x stream: B = 2, H = 38, Dh = 64, 4096 rows after a 154-row context."""
    B, H, Dh, n_ctx, L = 2, 38, 64, 154, 4096
    qkv = make_qkv(B, L, H, Dh, dtype)
    qw, kw = make_weight(Dh, dtype, 1), make_weight(Dh, dtype, 2)
    bufs = [torch.full((B, H, n_ctx + L, Dh), float("nan"), dtype=dtype, device=DEVICE) for _ in range(3)]
    kern.split_qkv_rmsnorm(qkv, qw, kw, *bufs, n_ctx)
    assert bufs[0][:, :, :n_ctx].isnan().all()
    q, k, v = (t.transpose(1, 2) for t in qkv.reshape(B, L, 3, H, Dh).unbind(2))
    assert torch.equal(bufs[2][:, :, n_ctx:], v)
    for name, buf, x, w in (("q", bufs[0], q, qw), ("k", bufs[1], k, kw)):
        assert_within_tolerance(buf[:, :, n_ctx:], torch_rms_norm(x, w), ref.rms_norm(*upcast(x, w)), name)
