"""joint_attention kernel against kernels/reference.py (CPU: Triton interpreter; GPU: compiled and autotuned)."""

import pytest
import torch

from fastsd35.kernels import joint_attention as kern
from fastsd35.kernels import reference as ref

from helpers.kernels import DEVICE, assert_within_tolerance, randn

DTYPES = [torch.float32, torch.float16]
# (B, H, L, Dh, n_ctx). Under the interpreter the tiles are 32 x 32 (kern._configs()).
CASES = [
    (2, 2, 64 + 77, 64, 77),  # joint: the tile of rows 64..95 straddles n_ctx = 77; 13 keys in the last tile
    (1, 2, 64 + 77, 64, 0),  # x-only second attention: out_ctx is None
    (2, 1, 96, 128, 32),  # L a multiple of the tile (no key tail), n_ctx on a tile boundary, Dh 128
    (1, 1, 45, 128, 45),  # context only: out_x has no rows
    (1, 1, 7, 64, 3),  # shorter than one tile
]


def padded_output(B, rows, width, dtype):
    """A NaN-filled (B, rows, width) view into a larger NaN buffer: every row must be written, nothing around it."""
    buf = torch.full((B, rows + 2, width + 8), float("nan"), dtype=dtype, device=DEVICE)
    return buf, buf[:, 1 : 1 + rows, :width]


def check_untouched_padding(buf, rows, width):
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[:, 1 : 1 + rows, :width] = True
    assert buf[~inside].isnan().all(), "wrote outside the output view"


def run(q, k, v, n_ctx, padded=True):
    """(ctx, x) outputs of the kernel, written into padded NaN views, or (padded=False) into plain (B, rows, H*Dh)
    tensors as the model's workspace holds them: row stride H*Dh, the layout production compiles for."""
    B, H, L, Dh = q.shape
    if not padded:
        out_ctx, out_x = (torch.empty(B, r, H * Dh, dtype=q.dtype, device=q.device) for r in (n_ctx, L - n_ctx))
        kern.joint_attention(q, k, v, out_ctx if n_ctx else None, out_x, n_ctx)
        return out_ctx, out_x
    ctx_buf, out_ctx = padded_output(B, n_ctx, H * Dh, q.dtype)
    x_buf, out_x = padded_output(B, L - n_ctx, H * Dh, q.dtype)
    kern.joint_attention(q, k, v, out_ctx if n_ctx else None, out_x, n_ctx)
    check_untouched_padding(ctx_buf, n_ctx, H * Dh)
    check_untouched_padding(x_buf, L - n_ctx, H * Dh)
    return out_ctx, out_x


def qkv(B, H, L, Dh, dtype):
    return [randn((B, H, L, Dh), dtype, seed) for seed in range(3)]


def reference(q, k, v, n_ctx):
    """(ctx, x) outputs of the reference op, in q's dtype."""
    B, H, L, Dh = q.shape
    out_ctx = torch.empty(B, n_ctx, H * Dh, dtype=q.dtype, device=q.device)
    out_x = torch.empty(B, L - n_ctx, H * Dh, dtype=q.dtype, device=q.device)
    ref.joint_attention(q, k, v, out_ctx if n_ctx else None, out_x, n_ctx)
    return out_ctx, out_x


def check(q, k, v, n_ctx, padded=True):
    """The tolerance rule for both outputs; returns the kernel's errors. The truth is the reference in fp32, or in
    fp64 for fp32 inputs: an fp32 truth would be the baseline itself, and on GPU fp32 SDPA may not be exact fp32."""
    out_ctx, out_x = run(q, k, v, n_ctx, padded)
    truth_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    truth = reference(q.to(truth_dtype), k.to(truth_dtype), v.to(truth_dtype), n_ctx)
    plain = reference(q, k, v, n_ctx)  # the reference's attention is SDPA in the input dtype: the baseline
    errors = []
    for name, out, base, t in zip(("ctx", "x"), (out_ctx, out_x), plain, truth):
        if out.numel():
            errors.append(assert_within_tolerance(out, base, t, name))
    return errors


@pytest.fixture
def launches(monkeypatch):
    """Every launch the joint attention makes, recorded as (named arguments and meta-parameters) before it runs."""
    from fastsd35.kernels.report import jit_function

    seen = []
    real = kern.launch

    def spy(kernel, grid, args, kwargs, device):
        seen.append({**dict(zip(jit_function(kernel).arg_names, args)), **kwargs, "autotuned": kernel is not
                     jit_function(kernel)})  # fmt: skip
        real(kernel, grid, args, kwargs, device)

    monkeypatch.setattr(kern, "launch", spy)
    return seen


def tuning_key(named: dict) -> tuple:
    """The autotuner's key for a launch's named arguments (Triton appends the dtypes)."""
    return tuple(named[k] for k in kern._joint_attention_kernel.keys)


@pytest.fixture(params=["pointer", "tma"])
def load_style(request, monkeypatch):
    """The interpreter runs one config (kern.INTERPRETER_CONFIG): the pointer-load form, or the TMA form whose q/k/v
    tiles come through tensor descriptors (zero-filled past L). The kernel body is the same; only the loads differ.
    What the interpreter cannot show for the TMA form (the sm_90 code: wgmma, cp.async.bulk.tensor, mbarriers) the
    compile report checks (tests/test_kernels_report.py), and the GPU tests time and check it on Hopper."""
    if request.param == "tma":
        monkeypatch.setattr(kern, "INTERPRETER_CONFIG", kern._config(32, 32, 4, 1, tma=True))
    kern._joint_attention_kernel.cache.clear()  # the autotuner remembers its choice per key
    yield request.param
    kern._joint_attention_kernel.cache.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_joint_attention(case, dtype, load_style, launches):
    B, H, L, Dh, n_ctx = case
    if dtype == torch.float32 and Dh > kern.FP32_MAX_HEAD_DIM and not kern.INTERPRET:
        with pytest.raises(ValueError, match="fp32 supports head dims up to 64 on a GPU"):
            check(*qkv(B, H, L, Dh, dtype), n_ctx)
        return
    check(*qkv(B, H, L, Dh, dtype), n_ctx)
    if kern.INTERPRET:  # the interpreter's one config, launched without the autotuner (no timing without a GPU)
        assert [(d["autotuned"], d["USE_TMA"]) for d in launches] == [(False, load_style == "tma")]
    else:
        assert kern._joint_attention_kernel.best_config.kwargs["USE_TMA"] == (load_style == "tma")


def test_interpreter_runs_without_the_autotuner(monkeypatch):
    """Under the interpreter the autotuner is never asked (Triton before 3.9 would time its configs, which needs a GPU
    driver: "0 active drivers"), and the launch still gets the whole key (tests/kernels: Triton 3.6 in CI)."""
    if not kern.INTERPRET:
        pytest.skip("the interpreter's launch path")

    def no_tuning(*args, **kwargs):
        raise AssertionError("the autotuner ran under the interpreter")

    monkeypatch.setattr(kern._joint_attention_kernel, "run", no_tuning)
    check(*qkv(1, 2, 40, 64, torch.float32), 7)


def test_autotune_key_buckets_lengths(launches):
    """The tuning key is (B*H, L rounded up to 1024, TMA-ready, Dh, dtypes): every prompt length of a 1024x1024 image
    shares one tuning; a different batch x heads tunes again."""
    assert kern._tuning_length(4096 + 154) == kern._tuning_length(4096 + 333) == 5120
    assert kern._tuning_length(1024) == 1024 and kern._tuning_length(1025) == 2048
    assert kern._joint_attention_kernel.keys == ["tune_bh", "tune_len", "tune_tma", "HEAD_DIM"]
    for B, H, L in ((1, 2, 40), (1, 2, 60), (2, 1, 50), (2, 2, 40)):
        run(*qkv(B, H, L, 64, torch.float16), 5)
    assert sorted({tuning_key(d) for d in launches}) == [(2, 1024, 1, 64), (4, 1024, 1, 64)]


def _named_args(q, Dh):
    s = {f"stride_{t}{d}": q.stride(i) for t in "qkv" for i, d in enumerate("bhl")}
    return {"Q": q, "K": q, "V": q, "HEAD_DIM": Dh, "tune_tma": int(kern._tma_ready(q)), **s}


def test_configs_per_arch():
    """sm_80 gets pointer loads only, without the 32-rows-per-warp tiles (255 registers there); sm_90 gets them all
    plus the TMA forms; Dh 128 keeps to 16 rows per warp and key tiles of at most 64, with 8 warps on sm_80; fp32
    gets exactly its own spill-free list per arch (sm_86 and sm_89 that of sm_80), pointer loads only."""
    configs = kern._configs_for
    q16 = torch.empty(2, 4, 256, 64, dtype=torch.float16)
    sm80, sm90 = configs(80, _named_args(q16, 64)), configs(90, _named_args(q16, 64))
    assert sm80 and not any(c.kwargs["USE_TMA"] for c in sm80)
    assert all(c.kwargs["BLOCK_M"] // c.num_warps <= 16 and c.kwargs["BLOCK_N"] // c.num_warps <= 16 for c in sm80)
    wide80 = configs(80, _named_args(torch.empty(2, 4, 256, 128, dtype=torch.bfloat16), 128))
    assert wide80 and all(c.num_warps == 8 for c in wide80)
    assert set(kern.POINTER_CONFIGS) | set(kern.TMA_CONFIGS) == set(sm90)
    for c in configs(90, _named_args(torch.empty(2, 4, 256, 128, dtype=torch.float16), 128)):
        assert c.kwargs["BLOCK_M"] // c.num_warps <= 16 and c.kwargs["BLOCK_N"] <= 64
    q32 = torch.empty(2, 4, 256, 64)
    for arch, expected in ((80, 80), (86, 80), (89, 80), (90, 90), (100, 90)):
        assert configs(arch, _named_args(q32, 64)) == kern.FP32_CONFIGS[expected]
    assert kern.FP32_CONFIGS[80] != kern.FP32_CONFIGS[90]
    assert not any(c.kwargs["USE_TMA"] for c in kern.FP32_CONFIGS[80] + kern.FP32_CONFIGS[90])
    tuned = kern._joint_attention_kernel.configs
    assert all(c in tuned for c in kern.FP32_CONFIGS[80] + kern.FP32_CONFIGS[90]) and len(set(tuned)) == len(tuned)
    assert configs(None, _named_args(q16, 64)) == [kern.INTERPRETER_CONFIG]


def test_fp32_head_dim_limit_off_the_interpreter(monkeypatch):
    """Compiled (not interpreted), fp32 stops at Dh 64: every Dh-128 fp32 tile spills. One clear error, before any
    launch; 16-bit Dh 128 and fp32 Dh 64 pass the check (meta tensors: nothing runs)."""
    monkeypatch.setattr(kern, "INTERPRET", False)
    calls = []
    monkeypatch.setattr(kern, "launch", lambda *a, **k: calls.append(a))

    def attend(Dh, dtype):
        q = torch.empty(1, 2, 40, Dh, dtype=dtype, device="meta")
        out_x = torch.empty(1, 32, 2 * Dh, dtype=dtype, device="meta")
        out_ctx = torch.empty(1, 8, 2 * Dh, dtype=dtype, device="meta")
        kern.joint_attention(q, q, q, out_ctx, out_x, 8)

    with pytest.raises(ValueError, match=r"fp32 supports head dims up to 64 on a GPU .*use fp16 or bf16"):
        attend(128, torch.float32)
    assert not calls
    attend(128, torch.bfloat16)
    attend(64, torch.float32)
    assert len(calls) == 2


def test_every_candidate_tile_is_a_launchable_shape():
    """Each config a GPU may time: power-of-two tiles of 16..128 rows (what tl.dot and the layouts take), 4 or 8
    warps, 1..4 pipeline stages; the fp32 lists hold pointer-load tiles only."""
    fp32 = kern.FP32_CONFIGS[80] + kern.FP32_CONFIGS[90]
    for c in kern.POINTER_CONFIGS + kern.TMA_CONFIGS + fp32 + [kern.INTERPRETER_CONFIG]:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        assert all(16 <= b <= 128 and b & (b - 1) == 0 for b in (bm, bn)), c
        assert c.num_warps in (4, 8) and 1 <= c.num_stages <= 4, c
    assert all(c.kwargs["USE_TMA"] for c in kern.TMA_CONFIGS) and not any(c.kwargs["USE_TMA"] for c in fp32)


def misaligned_views(dtype=torch.float16):
    """(B, H, L, Dh) = (1, 2, 256, 64) views that TMA cannot load: a base 8 bytes in, and a head stride that puts the
    second head 8 bytes off (the first head aligned); and an aligned one."""
    n, off = 1 * 2 * 256 * 64, 8 // dtype.itemsize  # 8 bytes, in elements
    buf = torch.zeros(2 * n, dtype=dtype, device=DEVICE)
    base = buf[off : off + n].view(1, 2, 256, 64)
    head = buf.as_strided((1, 2, 256, 64), (2 * 256 * 64 + off, 256 * 64 + off, 64, 1))
    return {"base": base, "head stride": head}, buf[2 * off : 2 * off + n].view(1, 2, 256, 64)


def test_tma_needs_aligned_rows():
    """q/k/v whose heads do not start on 16 bytes cannot be described to TMA: only pointer-load configs remain."""
    bad, good = misaligned_views()
    for name, q in bad.items():
        assert not kern._tma_ready(q) and kern._tma_ready(good, q, good) is False, name
        assert not any(c.kwargs["USE_TMA"] for c in kern._configs_for(90, _named_args(q, 64))), name
    assert kern._tma_ready(good, good, good)
    assert any(c.kwargs["USE_TMA"] for c in kern._configs_for(90, _named_args(good, 64)))


def test_tma_alignment_is_part_of_the_tuning_key(launches):
    """A misaligned view of the same shape, dtype and length as an aligned one gets another key, so it never reuses
    a TMA config tuned for the aligned buffers (the TMA candidates are pruned by this flag, once per key)."""
    bad, good = misaligned_views(torch.float32)
    out_x = torch.empty(1, 256, 128, device=DEVICE)
    for q in (good, *bad.values()):
        kern.joint_attention(q, q, q, None, out_x, 0)
    keys = [tuning_key(d) for d in launches]
    assert keys == [(2, 1024, 1, 64), (2, 1024, 0, 64), (2, 1024, 0, 64)]


def test_peaked_scores():
    """Large scores (std 16: a peaked softmax) exercise the running-max rescaling: no overflow, still accurate."""
    B, H, L, Dh = 1, 2, 70, 64
    q, k, v = qkv(B, H, L, Dh, torch.float32)
    check(q * 4, k * 4, v, 30)


def test_strided_inputs():
    """q/k/v as views of a (B, L, 3, H, Dh) tensor (not contiguous per head) give the contiguous result."""
    B, H, L, Dh = 1, 2, 40, 64
    packed = randn((B, L, 3, H, Dh), torch.float32, 0)
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    assert not q.is_contiguous()
    strided = run(q, k, v, 9)
    contiguous = run(q.contiguous(), k.contiguous(), v.contiguous(), 9)
    for a, b in zip(strided, contiguous):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- launcher errors ----------------------------------------------------------------------------------------------


def _outputs(B=1, H=2, L=20, Dh=64, n_ctx=5, dtype=torch.float32):
    f = dict(dtype=dtype, device=DEVICE)
    return torch.empty(B, n_ctx, H * Dh, **f), torch.empty(B, L - n_ctx, H * Dh, **f)


def test_error_n_ctx():
    q, k, v = qkv(1, 2, 20, 64, torch.float32)
    out_ctx, out_x = _outputs()
    with pytest.raises(ValueError, match=r"n_ctx must be an int in \[0, L=20\], got 21"):
        kern.joint_attention(q, k, v, out_ctx, out_x, 21)
    with pytest.raises(ValueError, match="out_ctx is None but n_ctx = 5 rows need somewhere to go"):
        kern.joint_attention(q, k, v, None, out_x, 5)


def test_error_output_shapes():
    q, k, v = qkv(1, 2, 20, 64, torch.float32)
    out_ctx, out_x = _outputs()
    with pytest.raises(ValueError, match=r"out_x must have shape \(1, 15, 128\), got \(1, 14, 128\)"):
        kern.joint_attention(q, k, v, out_ctx, out_x[:, :14], 5)
    with pytest.raises(ValueError, match=r"out_ctx must have shape \(1, 5, 128\), got \(1, 4, 128\)"):
        kern.joint_attention(q, k, v, out_ctx[:, :4], out_x, 5)
    with pytest.raises(ValueError, match="out_x must have a contiguous last dimension"):
        kern.joint_attention(q, k, v, out_ctx, out_x.transpose(1, 2).contiguous().transpose(1, 2), 5)


def test_error_mismatched_inputs():
    q, k, v = qkv(1, 2, 20, 64, torch.float32)
    out_ctx, out_x = _outputs()
    with pytest.raises(ValueError, match=r"k must have shape \(1, 2, 20, 64\), got \(1, 2, 19, 64\)"):
        kern.joint_attention(q, k[:, :, :19], v, out_ctx, out_x, 5)
    with pytest.raises(ValueError, match="v has dtype torch.float16, expected torch.float32"):
        kern.joint_attention(q, k, v.half(), out_ctx, out_x, 5)
    with pytest.raises(ValueError, match="out_x has dtype torch.float16"):
        kern.joint_attention(q, k, v, out_ctx, out_x.half(), 5)
    # q itself: the tensor the others are checked against
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(2, 20, 64\)"):
        kern.joint_attention(q[0], k, v, out_ctx, out_x, 5)
    with pytest.raises(ValueError, match="q must be a torch.Tensor, got ndarray"):
        kern.joint_attention(q.numpy(), k, v, out_ctx, out_x, 5)
    with pytest.raises(ValueError, match=r"q has dtype torch.float64; supported: float32, float16, bfloat16"):
        kern.joint_attention(q.double(), k.double(), v.double(), out_ctx, out_x, 5)


def test_error_head_dim():
    q, k, v = qkv(1, 2, 20, 32, torch.float32)
    out_ctx, out_x = _outputs(Dh=32)
    with pytest.raises(ValueError, match="head dim 32 is not supported"):
        kern.joint_attention(q, k, v, out_ctx, out_x, 5)


# -- GPU: bf16, the autotuned configs, the released sizes ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        (2, 38, 4096 + 154, 64, 154),  # SD3.5 Large, 1024x1024, T5 154 tokens
        (2, 38, 4096 + 333, 64, 333),  # a longer prompt
        (2, 24, 4096, 64, 0),  # SD3.5 Medium's x-only second attention
        (2, 12, 1024 + 77, 128, 77),  # Dh 128
    ],
    ids=str,
)
def test_real_size_gpu(case, dtype):
    """At the released sizes, into outputs laid out as the model's workspace (row stride D, 16-byte aligned): the
    variant production compiles and runs, not the padded-output one."""
    B, H, L, Dh, n_ctx = case
    check(*qkv(B, H, L, Dh, dtype), n_ctx, padded=False)


@pytest.mark.gpu
def test_fp32_accuracy_gpu():
    """fp32 dots keep fp32 accuracy (input_precision="tf32x3"): plain TF32 would be ~1e-3 off, far above the 1e-5
    floor."""
    B, H, L, Dh, n_ctx = 1, 4, 1024 + 77, 64, 77
    assert max(check(*qkv(B, H, L, Dh, torch.float32), n_ctx)) <= 1e-5  # against fp64, whatever SDPA's error


@pytest.mark.gpu
def test_autotuned_gpu():
    """On GPU the kernel is autotuned over several configs and picks one of them for the (B*H, length bucket, Dh)
    key."""
    configs = kern._joint_attention_kernel.configs
    assert len(configs) > 1
    check(*qkv(1, 2, 1000, 64, torch.float16), 10)
    assert kern._joint_attention_kernel.best_config in configs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_candidate_gpu(monkeypatch, dtype):
    """Each config the autotuner may pick on this GPU (the TMA forms too, on Hopper) is correct by itself: the
    autotuner only compares speed. A joint case with a key tail and a tile straddling n_ctx, and the x-only case."""
    q, k, v = qkv(2, 3, 1024 + 77, 64, dtype)
    named = {"Q": q, "K": k, "V": v, "HEAD_DIM": 64, "tune_tma": int(kern._tma_ready(q, k, v)),
             **{f"stride_{t}{d}": q.stride(i) for t in "qkv" for i, d in enumerate("bhl")}}  # fmt: skip
    arch = kern._device_arch(q)
    for config in kern._configs_for(arch, named):
        monkeypatch.setattr(kern, "_configs_for", lambda arch, named_args, c=config: [c])
        kern._joint_attention_kernel.cache.clear()
        check(q, k, v, 77, padded=False)
        check(q[:, :, 77:], k[:, :, 77:], v[:, :, 77:], 0, padded=False)
        assert kern._joint_attention_kernel.best_config is config
    kern._joint_attention_kernel.cache.clear()
