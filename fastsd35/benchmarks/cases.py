"""What the benchmarks measure (`fastsd35.benchmarks.suite` times it): the cases, their contenders and their work.

A `Case` is one shape of one workload (a kernel, a transformer step, a whole generation); its contenders are the
implementations compared on it, baselines first (but torch.compile last: it is the slowest to build). Nothing is
allocated when cases are listed: a case's shared inputs are built by `case.inputs()` once for all its contenders, and
each contender builds its model or pipeline on entry and frees it on exit, so one 8B model at a time is on the device
(two for a moment while diffusers' contenders copy in MMDiTX's random weights).

On CUDA the shapes are the released ones at 1024x1024 (bf16): latent 128x128 (4096 x tokens), context 77 CLIP + 77
T5 tokens (154) or 77 + 256 (333, the default --t5-tokens), D = 2432 / 1536 and H = 38 / 24 heads of 64 for SD3.5
Large / Medium, CFG batch 2 and batch 1, full-size models with random weights (their timings are those of the real
weights). On the CPU the same structure is reduced (depth 3, latent 32x32, fp32) and only the reference ops are
timed: a contender that cannot run here raises `Skip` with the reason the results record.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn

from .. import kernels
from ..models.mmditx import CONFIGS, FREQ_DIM, HEAD_DIM, FastMMDiTX, MMDiTX, MMDiTXConfig

PARTS = ("kernels", "transformer", "e2e", "multigpu", "cache", "serve")  # "serve": registered by fastsd35.app.serve.bench
# What runs without --only: the step cache (40-step generations) and the HTTP server (the serve extra) are asked for
# by name.
DEFAULT_PARTS = PARTS[:-2]
MODELS = {"large": "sd3.5_large", "medium": "sd3.5_medium"}
REDUCED = {  # the CPU's stand-ins: the released structure (qk-norm; MMDiT-X blocks for medium) at depth 3
    "large": MMDiTXConfig(depth=3, pos_embed_max_size=32, qk_norm="rms"),
    "medium": MMDiTXConfig(depth=3, pos_embed_max_size=32, qk_norm="rms", x_block_self_attn_layers=(0, 1)),
}
# Kernel inputs rotate through at least this many bytes, 4x the L2 of H100 and H200 (50 MB), so that no call finds its
# inputs in L2 left there by the previous one (the SD3.5 Medium working sets, 25-50 MB, would otherwise stay in L2).
ROTATE_BYTES = 4 * 50 * 2**20
MAX_INPUT_SETS = 64
CONTEXT_LENGTHS = (154, 333)  # 77 CLIP + 77 T5 tokens (a short prompt); 77 + 256 (--t5-tokens default)
BATCHES = (2, 1)  # CFG [cond, uncond]; cond only (cfg <= 1, Turbo)
PROMPT = "a photo of an astronaut riding a horse on mars"
NOT_INTERPRETED = "Triton's interpreter is not timed"


class Skip(Exception):
    """A contender that cannot run here; the message is the reason recorded in the results."""


class Failed(Exception):
    """A contender that broke while running (e.g. a worker process raised or died): its result's error."""


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a value: a tensor, or (nested) tuples and lists holding some."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)] if isinstance(value, (tuple, list)) else []


@dataclass
class Prepared:
    """A built contender: `fn()` is one timed sample of `calls` calls of the workload (a CUDA graph replays several
    kernel calls on rotated inputs); `outputs(result of fn())` are the tensors its first call produced, checked to be
    finite and to agree with the other contenders'; `eager()` (kernels on CUDA) makes the same `calls` calls from
    Python, timed apart to show what launching costs; `extra` goes into its result; `stages` collects the per-stage
    seconds of each call (end to end); `tolerance`: the largest relative error against the case's reference outputs
    that its precision allows (None: the dtypes' tolerance, `suite.TOLERANCE`)."""

    fn: Callable[[], object]
    extra: dict = field(default_factory=dict)
    stages: list[dict] | None = None
    outputs: Callable[[object], list[torch.Tensor]] = _tensors
    calls: int = 1
    eager: Callable[[], object] | None = None
    peak_bytes: Callable[[], int | None] | None = None  # work done in other processes: their peak GPU memory
    tolerance: float | None = None


@dataclass
class Contender:
    name: str
    build: Callable[[object], ContextManager[Prepared]]  # build(case inputs) -> context manager giving Prepared
    baseline: bool = False


@dataclass
class Case:
    part: str  # one of PARTS
    name: str  # the op, "step", or the preset
    model: str  # "large", "medium", "tiny"
    shape: dict
    contenders: list[Contender]
    inputs: Callable[[], ContextManager]  # shared by the contenders, built once per case
    flops: int | None = None  # the rate is TFLOP/s when given ...
    bytes: int | None = None  # ... else GB/s when given
    rate_stage: str | None = None  # the rate's time: this stage's median (end to end: "sample") instead of the call's
    tag: str = ""  # tells apart the cases of one model and name ("ctx333", "B1")
    images: int | None = None  # images per call: the rate is images/s (many GPUs)

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.model, self.name, self.tag)))


# -- work -------------------------------------------------------------------------------------------------------


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """softmax(Q K^T) V: two matmuls of 2 * Lq * Lk * Dh FLOPs per (batch, head)."""
    return 4 * batch * heads * q_len * k_len * head_dim


def mmditx_flops(config: MMDiTXConfig, batch: int, n_ctx: int, n_x: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one MMDiTX forward over `n_ctx` context and `n_x` latent tokens: the
    embedders, every Linear of every block (the last block's context stream stops after its qkv), all adaLN vectors,
    the joint attention over n_ctx + n_x tokens, the x-only attention of MMDiT-X blocks, and the final layer.
    Elementwise work (norms, modulation, GELU) is not counted."""
    D, H, N, p, B = config.hidden_size, config.num_heads, config.depth, config.patch_size, batch
    hidden = int(D * config.mlp_ratio)

    def linear(rows, n_in, n_out):
        return 2 * rows * n_in * n_out

    def stream(rows, attn_only=False):  # qkv, then proj and MLP unless the stream ends after its qkv
        return linear(rows, D, 3 * D) + (0 if attn_only else linear(rows, D, D) + 2 * linear(rows, D, hidden))

    flops = linear(B * n_x, config.in_channels * p * p, D)  # patch embedding (a p x p stride-p conv)
    flops += linear(B, FREQ_DIM, D) + linear(B, D, D)  # timestep MLP
    if config.adm_in_channels:
        flops += linear(B, config.adm_in_channels, D) + linear(B, D, D)
    if config.context_dim:
        flops += linear(B * n_ctx, config.context_dim, D)
    n_mods = 2  # the final layer's shift and scale
    for i in range(N):
        last, attn2 = i == N - 1, i in config.x_block_self_attn_layers
        n_mods += (2 if last else 6) + (9 if attn2 else 6)
        flops += stream(B * n_ctx, attn_only=last) + stream(B * n_x)
        flops += attention_flops(B, H, n_ctx + n_x, n_ctx + n_x, HEAD_DIM)
        if attn2:
            flops += linear(B * n_x, D, 3 * D) + linear(B * n_x, D, D) + attention_flops(B, H, n_x, n_x, HEAD_DIM)
    flops += linear(B, D, n_mods * D)  # every block's adaLN vectors from one GEMM
    return flops + linear(B * n_x, D, p * p * config.out_channels)


# -- random weights ---------------------------------------------------------------------------------------------

_MATRICES = (nn.Linear, nn.Conv2d, nn.Embedding)


@torch.no_grad()
def random_weights_(module: nn.Module, seed: int = 0) -> nn.Module:
    """`fastsd35.tiny.family.randomize_`'s rule (matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1), biases N(0, 0.1), other
    tensors N(0, 0.5)) drawn in place on each tensor's own device: seconds for 8B weights on a GPU, where a CPU
    generator takes minutes. Returns the module in eval mode without gradients."""
    generators = {}
    for mod in module.modules():
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if not t.is_floating_point():
                continue
            if t.device not in generators:
                generators[t.device] = torch.Generator(t.device).manual_seed(seed)
            g = generators[t.device]
            if name == "weight" and isinstance(mod, _MATRICES):
                t.normal_(0.0, t[0].numel() ** -0.5, generator=g)
            elif name == "weight":
                t.normal_(1.0, 0.1, generator=g)
            else:
                t.normal_(0.0, 0.1 if name == "bias" else 0.5, generator=g)
    return module.eval().requires_grad_(False)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randn(device, dtype, g, *shape):
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def _need_triton(device: torch.device):
    if device.type != "cuda":
        raise Skip(NOT_INTERPRETED)
    if (b := kernels.backend(device)) != "triton":
        raise Skip(f"the Triton kernels do not run here (backend: {b})")


# -- kernels ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What one model sees at one image size."""

    model: str  # "large" / "medium"
    config: MMDiTXConfig
    latent: int  # latent side: 128 at 1024x1024
    device: torch.device
    dtype: torch.dtype
    batch: int = 2

    @property
    def n_x(self) -> int:
        return (self.latent // self.config.patch_size) ** 2

    @property
    def elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8


def geometry(model: str, device, dtype=None, full: bool | None = None) -> Geometry:
    """Full size (the default on CUDA) or the CPU's reduced stand-in."""
    device = torch.device(device)
    if device.type == "cuda" if full is None else full:
        return Geometry(model, CONFIGS[MODELS[model]], 128, device, dtype or torch.bfloat16)
    return Geometry(model, REDUCED[model], 32, device, dtype or torch.float32)


def input_sets(set_bytes: int, device) -> int:
    """How many copies of a kernel's inputs the timing rotates through: enough to cover ROTATE_BYTES on CUDA, one on
    the CPU (where nothing is timed from a graph)."""
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(MAX_INPUT_SETS, -(-ROTATE_BYTES // max(set_bytes, 1))))


@contextmanager
def _kernel_inputs(make, geo: Geometry):
    """The argument tuples of one op, one per rotated input set (set 0 is the one whose outputs are checked)."""
    first = make(geo, torch.Generator(geo.device).manual_seed(0))
    n = input_sets(sum(t.numel() * t.element_size() for t in _tensors(first)), geo.device)
    yield [first] + [make(geo, torch.Generator(geo.device).manual_seed(i)) for i in range(1, n)]


def _rows(geo: Geometry, g, n: int):
    """n (B, L, D) activations and the (B, 9, D) modulation tensor whose strided rows the ops read."""
    B, L, D = geo.batch, geo.n_x, geo.config.hidden_size
    return [_randn(geo.device, geo.dtype, g, B, L, D) for _ in range(n)], _randn(geo.device, geo.dtype, g, B, 9, D)


def _ln_modulate(geo, g):
    (x,), m = _rows(geo, g, 1)
    return x, m[:, 0], m[:, 1]


def _ln_modulate2(geo, g):
    (x,), m = _rows(geo, g, 1)
    return x, m[:, 0], m[:, 1], m[:, 6], m[:, 7]


def _gated_residual_ln_modulate(geo, g):
    if geo.config.x_block_self_attn_layers:  # MMDiT-X blocks add the second attention's output too
        (x, y, y2), m = _rows(geo, g, 3)
        return x, y, m[:, 2], m[:, 3], m[:, 4], y2, m[:, 8]
    (x, y), m = _rows(geo, g, 2)
    return x, y, m[:, 2], m[:, 3], m[:, 4]


def _gated_residual(geo, g):
    (x, y), m = _rows(geo, g, 2)
    return x, y, m[:, 5]


def _split_qkv_rmsnorm(n_ctx, geo, g):
    B, L, D, H = geo.batch, geo.n_x, geo.config.hidden_size, geo.config.num_heads
    qkv = _randn(geo.device, geo.dtype, g, B, L, 3 * D)
    weights = [_randn(geo.device, geo.dtype, g, HEAD_DIM) for _ in range(2)]
    # zeros: the op writes only the x-stream rows, and the outputs checked are the whole buffers
    buffers = [torch.zeros(B, H, n_ctx + L, HEAD_DIM, device=geo.device, dtype=geo.dtype) for _ in range(3)]
    return qkv, *weights, *buffers, n_ctx  # the x stream, written after the context rows


def _joint_attention(n_ctx, geo, g):
    B, L, D, H = geo.batch, n_ctx + geo.n_x, geo.config.hidden_size, geo.config.num_heads
    q, k, v = (_randn(geo.device, geo.dtype, g, B, H, L, HEAD_DIM) for _ in range(3))
    out_ctx = torch.empty(B, n_ctx, D, device=geo.device, dtype=geo.dtype) if n_ctx else None
    return q, k, v, out_ctx, torch.empty(B, geo.n_x, D, device=geo.device, dtype=geo.dtype), n_ctx


WRITTEN_ARGS = {"split_qkv_rmsnorm": (3, 4, 5), "joint_attention": (3, 4)}  # outputs the ops write into


@contextmanager
def _kernel_op(ops_name: str, op: str, geo: Geometry, sets):
    """One op on the rotated input sets. On CUDA a timed call replays a CUDA graph of the op on every set in turn (the
    GPU's time, inputs not left in L2 by the previous call), and `eager` makes the same calls from Python (the GPU's
    time plus what the launcher costs when it cannot hide behind the GPU); on the CPU, one call on set 0."""
    from ..pipeline.graphs import CUDACapturer

    if ops_name == "triton":
        _need_triton(geo.device)
        fn = getattr(kernels.TRITON_OPS, op)
    else:
        fn = getattr(kernels.REFERENCE_OPS, op)
    flash = op == "joint_attention"  # the torch counterpart is SDPA restricted to its flash backend
    extra = {"sdpa": "flash"} if flash and ops_name == "torch" else {}
    written = [t for i in WRITTEN_ARGS.get(op, ()) if (t := sets[0][i]) is not None]

    def rotation():
        return [fn(*args) for args in sets]

    with _flash_only() if flash and ops_name == "torch" else nullcontext():
        if geo.device.type != "cuda":
            yield Prepared(lambda: fn(*sets[0]), extra, outputs=lambda result: _tensors(result) + written)
            return
        replay, results = CUDACapturer(geo.device).capture(rotation)  # warms up (autotunes) first, eagerly
        extra |= {"timed": "CUDA graph", "input_sets": len(sets)}
        yield Prepared(replay, extra, outputs=lambda _: _tensors(results[0]) + written, calls=len(sets), eager=rotation)


def _flash_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def kernel_cases(geo: Geometry, contexts=CONTEXT_LENGTHS) -> list[Case]:
    """Each Triton op against its torch counterpart (kernels/reference.py) at this model's shapes: the norm ops on
    the x stream (B, 4096, D), the qkv split, the joint attention for both context lengths and, for MMDiT-X models,
    the x-only attention and the two-modulation norm."""
    B, L, D, H, e = geo.batch, geo.n_x, geo.config.hidden_size, geo.config.num_heads, geo.elem
    mmditx = bool(geo.config.x_block_self_attn_layers)
    rows = dict(B=B, L=L, D=D)
    BLD, BD = B * L * D, B * D
    specs = [  # op, name, make inputs, shape, flops, bytes (each tensor read or written once)
        ("ln_modulate", "ln_modulate", _ln_modulate, rows, None, e * (2 * BLD + 2 * BD)),
        ("gated_residual_ln_modulate", "gated_residual_ln_modulate", _gated_residual_ln_modulate, rows, None,
         e * ((5 if mmditx else 4) * BLD + (4 if mmditx else 3) * BD)),
        ("gated_residual", "gated_residual", _gated_residual, rows, None, e * (3 * BLD + BD)),
        ("split_qkv_rmsnorm", "split_qkv_rmsnorm", partial(_split_qkv_rmsnorm, contexts[0]),
         dict(B=B, L=L, H=H, Dh=HEAD_DIM), None, e * (6 * BLD + 2 * HEAD_DIM)),
    ]  # fmt: skip
    if mmditx:
        specs.insert(1, ("ln_modulate2", "ln_modulate2", _ln_modulate2, rows, None, e * (3 * BLD + 4 * BD)))
    for n_ctx in contexts:
        total = n_ctx + L
        shape, flops = dict(B=B, ctx=n_ctx, L=total, H=H, Dh=HEAD_DIM), attention_flops(B, H, total, total, HEAD_DIM)
        specs.append(("joint_attention", "joint_attention", partial(_joint_attention, n_ctx), shape, flops, None))
    if mmditx:
        specs.append(("joint_attention", "x_attention", partial(_joint_attention, 0), dict(B=B, L=L, H=H, Dh=HEAD_DIM),
                      attention_flops(B, H, L, L, HEAD_DIM), None))  # fmt: skip
    return [
        Case("kernels", name, geo.model, shape, flops=flops, bytes=None if flops else nbytes,
             inputs=partial(_kernel_inputs, make, geo),
             contenders=[Contender("torch", partial(_kernel_op, "torch", op, geo), baseline=True),
                         Contender("triton", partial(_kernel_op, "triton", op, geo))],
             tag=f"ctx{shape['ctx']}" if "ctx" in shape else "")
        for op, name, make, shape, flops, nbytes in specs
    ]  # fmt: skip


# -- transformer step -------------------------------------------------------------------------------------------


def diffusers_config(config: MMDiTXConfig) -> dict:
    """`SD3Transformer2DModel` arguments for the same architecture."""
    return dict(
        sample_size=config.pos_embed_max_size, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=config.depth, attention_head_dim=HEAD_DIM, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.adm_in_channels, out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.x_block_self_attn_layers,
        qk_norm="rms_norm" if config.qk_norm else None,
    )  # fmt: skip


STEP_SIGMA = 0.75  # a mid-schedule sigma, exact in fp16: timestep 750


@contextmanager
def _step_inputs(geo: Geometry, batch: int, n_ctx: int):
    """One step's inputs: fastsd35's passes take the sampler's sigma (0.75), diffusers the timestep the pass derives
    from it (model_timestep: 750), so that every contender computes the same thing."""
    from ..pipeline.sampling import model_timestep

    cfg, g = geo.config, torch.Generator(geo.device).manual_seed(0)
    sigma = torch.full((batch,), STEP_SIGMA)  # on the CPU, as the sampler hands it over
    yield SimpleNamespace(
        x=_randn(geo.device, geo.dtype, g, batch, cfg.in_channels, geo.latent, geo.latent),
        sigma=sigma,
        t=model_timestep(sigma).to(geo.device),
        y=_randn(geo.device, geo.dtype, g, batch, cfg.adm_in_channels),
        context=_randn(geo.device, geo.dtype, g, batch, n_ctx, cfg.context_dim),
    )


@contextmanager
def _fastsd35_step(cls, graphs: bool, geo: Geometry, inp):
    if cls is FastMMDiTX:
        _need_triton(geo.device)
    model = random_weights_(cls.empty(geo.config, dtype=geo.dtype, device=geo.device))
    with _stepping(model, graphs, geo, inp, {"params": _params(model)}) as prepared:
        yield prepared


@contextmanager
def _stepping(model, graphs: bool, geo: Geometry, inp, extra: dict, tolerance: float | None = None):
    """One denoiser step of `model` as the sampler calls it (TransformerPass, as the pipeline does), optionally
    replayed from CUDA graphs, whose captures are freed on exit."""
    from ..pipeline.graphs import CUDAGraphPasses
    from ..pipeline.runner import TransformerPass

    step = TransformerPass(model)
    if graphs:
        step = CUDAGraphPasses(step, geo.device)

    def fn():
        with torch.inference_mode():
            return step(inp.x, inp.sigma, inp.y, inp.context)

    try:
        yield Prepared(fn, extra, tolerance=tolerance)
    finally:
        if graphs:
            step.clear()


@contextmanager
def _diffusers_step(compiled: bool, geo: Geometry, inp):
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        raise Skip("diffusers not installed") from None
    if compiled and geo.device.type != "cuda":
        raise Skip("torch.compile is timed on CUDA only (compiling on the CPU takes minutes)")
    with torch.device("meta"):
        model = SD3Transformer2DModel(**diffusers_config(geo.config))
    model = _cast(model, geo.dtype).to_empty(device=geo.device).eval().requires_grad_(False)
    model.load_state_dict(diffusers_weights(geo), strict=True)  # the weights the fastsd35 contenders get
    run = torch.compile(model) if compiled else model

    def fn():
        with torch.inference_mode():
            return run(hidden_states=inp.x, encoder_hidden_states=inp.context, pooled_projections=inp.y,
                       timestep=inp.t, return_dict=False)[0]  # fmt: skip

    extra = {"params": _params(model)}
    try:
        if compiled:
            start = time.perf_counter()
            try:
                fn()
                torch.cuda.synchronize(geo.device)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001  any compiler failure: a skipped contender, not a failed suite
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise Skip(f"torch.compile failed: {type(e).__name__}: {first}") from None
            extra["compile_s"] = round(time.perf_counter() - start, 1)
        yield Prepared(fn, extra)
    finally:
        if compiled:
            torch._dynamo.reset()


def diffusers_weights(geo: Geometry) -> dict:
    """The random weights `random_weights_` gives MMDiTX (and FastMMDiTX) for this geometry, in diffusers' layout
    (converted by diffusers' own converter): diffusers is timed on the same model, so its output can be compared."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    reference = random_weights_(MMDiTX.empty(geo.config, dtype=geo.dtype, device=geo.device))
    return convert_sd3_transformer_checkpoint_to_diffusers(dict(reference.state_dict()))


@contextmanager
def _fastsd35_fp8_step(graphs: bool, geo: Geometry, inp):
    """FastMMDiTX as `--dtype fp8` runs it: the block Linears (random weights, quantized per channel) in FP8, FP8 GEMMs
    where the device has them (else bf16 GEMMs on the FP8 weights), the rest in the case's dtype. Its outputs are
    checked against the FP8 error model of its depth (`precision.fp8_tolerance`), not the dtype's tolerance."""
    from ..models.fp8 import fp8_gemm_available, quantize_, weight_bytes
    from .precision import fp8_tolerance

    _need_triton(geo.device)
    model = quantize_(random_weights_(FastMMDiTX.empty(geo.config, dtype=geo.dtype, device=geo.device)))
    if geo.device.type == "cuda":
        torch.cuda.empty_cache()  # the full-precision weights quantize_ replaced
    tolerance = fp8_tolerance(geo.config.depth)
    extra = {"params": _params(model), "weight_bytes": weight_bytes(model), "fp8_gemm": fp8_gemm_available(geo.device),
             "tolerance": tolerance}  # fmt: skip
    with _stepping(model, graphs, geo, inp, extra, tolerance) as prepared:
        yield prepared


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Not `.to(dtype)`: diffusers' override of it warns about fp32 modules this model does not have.
    return {torch.float32: model.float, torch.float16: model.half, torch.bfloat16: model.bfloat16}[dtype]()


def transformer_cases(geo: Geometry, n_ctx: int = CONTEXT_LENGTHS[0]) -> list[Case]:
    """One denoiser step of the model, CFG batch 2 and batch 1: fastsd35 (Triton kernels, eager and replayed from a
    CUDA graph) against MMDiTX on the reference ops (eager, SDPA), diffusers eager and diffusers compiled."""
    cases = []
    for batch in BATCHES:
        shape = dict(B=batch, latent=f"{geo.latent}x{geo.latent}", ctx=n_ctx, x=geo.n_x, D=geo.config.hidden_size)
        contenders = [
            Contender("torch", partial(_fastsd35_step, MMDiTX, False, geo), baseline=True),
            Contender("diffusers", partial(_diffusers_step, False, geo), baseline=True),
            Contender("fastsd35", partial(_fastsd35_step, FastMMDiTX, False, geo)),
            Contender("fastsd35+graphs", partial(_fastsd35_step, FastMMDiTX, True, geo)),
            Contender("fastsd35+graphs+fp8", partial(_fastsd35_fp8_step, True, geo)),
            # the slowest to build (a minute or more of compiling) comes last: a time limit that stops it loses only it
            Contender("diffusers+compile", partial(_diffusers_step, True, geo), baseline=True),
        ]
        cases.append(Case("transformer", "step", geo.model, shape, contenders, partial(_step_inputs, geo, batch, n_ctx),
                          flops=mmditx_flops(geo.config, batch, n_ctx, geo.n_x), tag=f"B{batch}"))  # fmt: skip
    return cases


# -- end to end -------------------------------------------------------------------------------------------------


def full_size_text_encoders(device, dtype, t5: bool = True):
    """CLIP-L, CLIP-G and T5-XXL encoders of the released sizes with random weights, allocated on `device`, and the
    tiny tokenizers (their ids fit the real vocabularies; a short prompt gives the same 77 + 77 tokens)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ..models.text_encoders import TextEncoders, allocate, clip_config, t5_config
    from ..models.tokenization import CLIP_LENGTH, tiny_clip_tokenizer, tiny_t5_tokenizer

    def build(cls, config):
        return random_weights_(allocate(cls, config, device, dtype))

    clip_l = build(CLIPTextModelWithProjection, clip_config(49408, 768, 3072, 12, CLIP_LENGTH, 768, "clip_l"))
    clip_g = build(CLIPTextModelWithProjection, clip_config(49408, 1280, 5120, 32, CLIP_LENGTH, 1280, "clip_g"))
    t5_model = build(T5EncoderModel, t5_config(32128, 4096, 10240, heads=64, d_kv=64, layers=24)) if t5 else None
    return TextEncoders(clip_l, clip_g, t5_model, tiny_clip_tokenizer("eos"), tiny_clip_tokenizer("!"),
                        tiny_t5_tokenizer() if t5 else None, t5_width=None if t5 else 4096)  # fmt: skip


@contextmanager
def _e2e_components(device: torch.device, dtype: torch.dtype, full: bool, variant: str = "sd3.5_large"):
    from ..models.vae import SDVAE, VAEConfig
    from ..pipeline.runner import SAMPLING_HEADROOM_BYTES, TEXT_ENCODER_BYTES
    from ..tiny.family import TINY_MMDITX_CONFIG, TINY_VAE_CONFIG, tiny_text_encoders

    if full:
        transformer = random_weights_(FastMMDiTX.empty(CONFIGS[variant], dtype=dtype, device=device))
        vae = random_weights_(SDVAE.empty(VAEConfig(), dtype=dtype, device=device))
        room = TEXT_ENCODER_BYTES[True] + SAMPLING_HEADROOM_BYTES  # T5-XXL in bf16 and sampling at 1024x1024
        t5 = device.type != "cuda" or torch.cuda.mem_get_info(device)[0] > room
        text = full_size_text_encoders(device, dtype, t5=t5)
        note = f"CLIP-L, CLIP-G{', T5-XXL' if t5 else ' (no room for T5-XXL: zeros in its place)'}, random, on {device}"
    else:  # the tiny preset's components, on the reference ops
        transformer = random_weights_(MMDiTX(TINY_MMDITX_CONFIG, dtype=dtype, device=device))
        vae = random_weights_(SDVAE(TINY_VAE_CONFIG, dtype=dtype, device=device))
        text, note = tiny_text_encoders(0).to(device), "tiny CLIP-L, CLIP-G, T5"
    yield SimpleNamespace(transformer=transformer, vae=vae, text=text, note=note)


@contextmanager
def _generate(preset: str, graphs: bool, components):
    from ..pipeline.runner import Pipeline

    if graphs and components.transformer.device.type != "cuda":
        raise Skip("CUDA graphs need CUDA")
    if isinstance(components.transformer, FastMMDiTX):
        _need_triton(components.transformer.device)
    pipe = Pipeline(components.transformer, components.vae, components.text, preset, graphs=graphs)
    stages = []

    def fn():  # -> the images (checked: the contenders make the same ones)
        generation = pipe.generate(PROMPT, seed=23, progress=False)
        stages.append(generation.timings)
        return torch.from_numpy(np.stack([np.asarray(image) for image in generation.images]))

    try:
        extra = {"transformer": type(components.transformer).__name__, "text_encoders": components.note}
        yield Prepared(fn, extra, stages)
    finally:
        if graphs:
            pipe.model_pass.clear()


def e2e_cases(device, dtype=None, full: bool | None = None) -> list[Case]:
    """A whole generation, prompt to image: on CUDA the large_turbo preset at 1024x1024 (4 steps, cfg 1, batch 1)
    with full-size random-weight components, the transformer eager and replayed from CUDA graphs; on the CPU the tiny
    preset on the reference ops. Per-stage times (encode, sample, decode) come with each result."""
    from ..pipeline.presets import get_preset
    from ..tiny.family import TINY_MMDITX_CONFIG

    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    preset = get_preset("large_turbo" if full else "tiny_random")
    s = preset.resolve()
    config = CONFIGS[preset.variant] if full else TINY_MMDITX_CONFIG
    passes, n_ctx, n_x = (2 if s.cfg > 1 else 1), 154, (s.height // 16) * (s.width // 16)
    shape = dict(images=1, size=f"{s.width}x{s.height}", steps=s.steps, cfg=s.cfg, sampler=s.sampler)
    dtype = dtype or (torch.bfloat16 if full else torch.float32)
    return [Case(
        "e2e", preset.name, "large" if full else "tiny", shape,
        [Contender("eager", partial(_generate, preset.name, False), baseline=True),
         Contender("graphs", partial(_generate, preset.name, True))],
        partial(_e2e_components, device, dtype, full),
        flops=s.steps * mmditx_flops(config, passes, n_ctx, n_x), rate_stage="sample",
    )]  # fmt: skip


# Step caching (fastsd35.pipeline.caching): the same generation without the cache (the baseline), with it at threshold
# 0 (every step computed in stages: the same images bit for bit, and the staging's and the decisions' cost), at the
# default settings (with random weights the first blocks change too much for any step to be reused: the decisions'
# cost), and allowing every skip (the most the warm-up and max-skip settings save). The last is checked against the
# baseline's images within CACHE_TOLERANCE (relative L2): on the tiny random model every skip measured 0.09, another
# prompt 0.25, broken output (zeros, noise) 0.65 and more.
CACHE_TOLERANCE = 0.2
CACHE_CONTENDERS = {"threshold 0": (0.0, 0.0), "default": (None, CACHE_TOLERANCE), "every skip": (1e9, CACHE_TOLERANCE)}


@contextmanager
def _cached_generate(preset: str, graphs: bool, threshold, tolerance, steps: int, size: int, components):
    from ..pipeline.caching import CacheConfig
    from ..pipeline.runner import Pipeline

    if graphs and components.transformer.device.type != "cuda":
        raise Skip("CUDA graphs need CUDA")
    if isinstance(components.transformer, FastMMDiTX):
        _need_triton(components.transformer.device)
    pipe = Pipeline(components.transformer, components.vae, components.text, preset, graphs=graphs)
    cache = None if threshold is False else CacheConfig() if threshold is None else CacheConfig(threshold=threshold)
    stages, extra = [], {"transformer": type(components.transformer).__name__, "text_encoders": components.note}

    def fn():
        generation = pipe.generate(PROMPT, seed=23, steps=steps, width=size, height=size, cache=cache, progress=False)
        stages.append(generation.timings)
        if generation.cache:
            extra.update(passes=generation.cache["passes"], computed=generation.cache["computed"],
                         schedule=generation.cache["schedule"], decide_ms=generation.cache["decide_s"] * 1e3)
        return torch.from_numpy(np.stack([np.asarray(image) for image in generation.images]).astype(np.float32))

    try:
        yield Prepared(fn, extra, stages, tolerance=tolerance)
    finally:
        if graphs:
            pipe.model_pass.clear()


def cache_cases(device, dtype=None, full: bool | None = None, models=("large", "medium")) -> list[Case]:
    """A whole generation with and without the step cache: on CUDA the large and medium presets (40 and 50 steps, CFG,
    1024x1024, full-size random weights, CUDA graphs); on the CPU the tiny random model (16 steps, 64x64, reference
    ops)."""
    from ..pipeline.presets import get_preset
    from ..tiny.family import TINY_MMDITX_CONFIG

    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    cases = []
    for model in (models if full else ("tiny",)):
        preset = get_preset({"large": "large", "medium": "medium", "tiny": "tiny_random"}[model])
        s = preset.resolve()
        steps, size = (s.steps, s.width) if full else (16, 64)
        config = CONFIGS[preset.variant] if full else TINY_MMDITX_CONFIG
        dtype_ = dtype or (torch.bfloat16 if full else torch.float32)
        graphs = device.type == "cuda"
        shape = dict(images=1, size=f"{size}x{size}", steps=steps, cfg=s.cfg, sampler=s.sampler)
        run = partial(_cached_generate, preset.name, graphs)
        contenders = [Contender("off", partial(run, False, None, steps, size), baseline=True)]
        contenders += [Contender(f"cache, {name}", partial(run, threshold, tol, steps, size))
                       for name, (threshold, tol) in CACHE_CONTENDERS.items()]  # fmt: skip
        cases.append(Case(
            "cache", preset.name, model, shape, contenders,
            partial(_e2e_components, device, dtype_, full, preset.variant if full else "sd3.5_large"),
            flops=steps * mmditx_flops(config, 2, 154, (size // 16) ** 2), rate_stage="sample",
        ))  # fmt: skip
    return cases


# Each part's cases: builder(device, models, dtype, full) -> list[Case]. The parts register themselves (`register`);
# multi_gpu.py registers "multigpu" when fastsd35.benchmarks is imported (its __init__ imports every part).
BUILDERS: dict[str, Callable[..., list[Case]]] = {}


def register(part: str):
    def add(builder):
        if part not in PARTS:
            raise ValueError(f"unknown benchmark part {part!r} (PARTS: {', '.join(PARTS)})")
        BUILDERS[part] = builder
        return builder

    return add


@register("kernels")
def _kernel_part(device, models, dtype, full) -> list[Case]:
    return [case for model in models for case in kernel_cases(geometry(model, device, dtype, full))]


@register("transformer")
def _transformer_part(device, models, dtype, full) -> list[Case]:
    return [case for model in models for case in transformer_cases(geometry(model, device, dtype, full))]


@register("cache")
def _cache_part(device, models, dtype, full) -> list[Case]:
    return cache_cases(device, dtype, full, tuple(m for m in models if m in ("large", "medium")) or ("large",))


@register("e2e")
def _e2e_part(device, models, dtype, full) -> list[Case]:
    return e2e_cases(device, dtype, full)


def build_cases(device, parts=PARTS, models=tuple(MODELS), dtype=None, full: bool | None = None) -> list[Case]:
    """Every case of the chosen parts, in run order. `models` picks the kernel and step shapes; end to end is always
    large_turbo (tiny on the CPU). `full`: the released sizes (default: on CUDA only)."""
    device = torch.device(device)
    return [case for part in PARTS if part in parts for case in BUILDERS[part](device, models, dtype, full)]
