"""FP8 (e4m3) Linear layers for the transformer and the ControlNet: `--dtype fp8`.

The joint blocks' Linear layers (qkv, proj, fc1, fc2 of the context and x streams, the MMDiT-X second attention, and
the adaLN modulation GEMM) hold float8_e4m3fn weights with one fp32 scale per output channel. Their GEMMs run through
`torch._scaled_mm` with row-wise scales: each activation row (token) is quantized on the fly with its own absmax scale,
and the output is written in the activation dtype (bf16 on CUDA). Everything else (embedders, norms, attention, the
final layer) stays in that dtype.

    real weight     W[n, :] = weight[n, :].float() * weight_scale[n]
    activation row  x[m, :] ~ q[m, :].float() * s[m],   s[m] = max|x[m, :]| / 448
    output          y = (q @ weight^T) * s[m] * weight_scale[n] + bias        (fp32 accumulation)

Where the GPU has no FP8 tensor cores (compute capability < 8.9, e.g. A100) the weights stay in FP8 (half the memory)
and the GEMM runs in the activation dtype on the dequantized weight; that is said once on stderr. A checkpoint can ask
for the same ("full precision matmul", see fastsd35.weights.fp8): `fp8_matmul=False`.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = "fp8"  # the name `--dtype fp8` / `dtype="fp8"` asks for
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_FLOOR = 1e-12  # an all-zero row gets this absmax, not a division by zero
FP8_GEMM_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores

# The layers that run in FP8: the joint blocks' (and the ControlNet's blocks') attention, MLP and adaLN Linears, and
# the final layer's adaLN Linear (it shares one fused matrix with the blocks' adaLN weights).
FP8_LAYERS = re.compile(
    r"(joint_blocks\.\d+\.(context|x)_block|transformer_blocks\.\d+)\.(attn2?\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)"
    r"|final_layer\.adaLN_modulation\.1"
)


def is_fp8(dtype) -> bool:
    """Whether a requested dtype means FP8 (`"fp8"` or torch.float8_e4m3fn)."""
    return dtype == FP8 or dtype == FP8_DTYPE


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax FP8 quantization of x (..., K): (q float8_e4m3fn (..., K), scale fp32 (..., 1)) with
    x ~ q.float() * scale. Rounding is to nearest even; the row maximum maps to 448. The Triton row kernels
    (kernels/fused_adaln_modulate.py, `fp8_out`) compute exactly this."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR)
    fp8_max = torch.full_like(amax, FP8_MAX)  # tensor / tensor: one IEEE division (a scalar's is not, on every device)
    q = (xf * (fp8_max / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, amax / fp8_max


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q.float() * scale (scale broadcast over q's last dimension, or a 0-d tensor), in `dtype`."""
    return (q.float() * scale.float()).to(dtype)


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_gemm_available(device) -> bool:
    """Whether FP8 GEMMs (torch._scaled_mm, row-wise scales) run on `device`: the CPU (torch >= 2.13) and CUDA GPUs
    of compute capability >= 8.9."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= FP8_GEMM_CAPABILITY
    return False


_told: set[str] = set()


def announce(device) -> None:
    """Say once per device on stderr when `--dtype fp8` cannot use FP8 GEMMs there."""
    device = torch.device(device)
    if fp8_gemm_available(device) or device.type == "meta" or str(device) in _told:
        return
    _told.add(str(device))
    what = f"{torch.cuda.get_device_name(device)} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})" \
        if device.type == "cuda" else str(device)
    print(f"fastsd35: {what} has no FP8 tensor cores (they need compute capability 8.9+): --dtype fp8 keeps the "
          "weights in FP8 (half the memory) and runs the GEMMs in bf16", file=sys.stderr)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, fp8_matmul: bool = True) -> torch.Tensor:
    """y = x @ (weight * weight_scale[:, None])^T + bias in x's dtype. weight (N, K) float8_e4m3fn, weight_scale (N,)
    fp32. With `fp8_matmul` on a device that has FP8 GEMMs, x is quantized per row and the GEMM runs in FP8; otherwise
    it runs in x's dtype on the dequantized weight."""
    N, K = weight.shape
    lead = x.shape[:-1]
    if fp8_matmul and _scaled_mm_takes(x):
        rows = getattr(x, "fp8_rows", None)  # written by the row kernel that made x (fp8_row_ops)
        q, s = (rows[0].reshape(-1, K), rows[1].reshape(-1, 1)) if rows is not None else quantize_rows(x.reshape(-1, K))
        y = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=weight_scale[None], bias=bias, out_dtype=x.dtype)
    else:
        w = weight.to(x.dtype) * weight_scale[:, None].to(x.dtype)
        y = F.linear(x.reshape(-1, K), w, bias)
    return y.view(*lead, N)


_row_ops: dict[int, SimpleNamespace] = {}


def fp8_row_ops(ops: SimpleNamespace) -> SimpleNamespace:
    """The Triton op set `ops` with row ops that also quantize their outputs for the FP8 GEMMs that read them, in the
    same pass (kernels/fused_adaln_modulate.py, FP8 out). The FP8 rows ride on the output tensor as `fp8_rows` =
    (q (B, L, D), scale (B, L, 1)); fp8_linear takes them instead of quantizing again; anything else ignores them."""
    if id(ops) not in _row_ops:
        from ..kernels import fused_adaln_modulate as k

        def ln_modulate(x, shift, scale):
            y, y.fp8_rows = k.ln_modulate_fp8(x, shift, scale)
            return y

        def ln_modulate2(x, shift1, scale1, shift2, scale2):
            y1, y2, y1.fp8_rows, y2.fp8_rows = k.ln_modulate2_fp8(x, shift1, scale1, shift2, scale2)
            return y1, y2

        def gated_residual_ln_modulate(x, y, gate, shift, scale, y2=None, gate2=None):
            x_new, h, h.fp8_rows = k.gated_residual_ln_modulate_fp8(x, y, gate, shift, scale, y2, gate2)
            return x_new, h

        _row_ops[id(ops)] = SimpleNamespace(**{**vars(ops), "ln_modulate": ln_modulate, "ln_modulate2": ln_modulate2,
                                               "gated_residual_ln_modulate": gated_residual_ln_modulate})
    return _row_ops[id(ops)]


def _scaled_mm_takes(x: torch.Tensor) -> bool:
    # CUDA's row-wise _scaled_mm writes bf16 only; the CPU's any float dtype.
    return fp8_gemm_available(x.device) and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


class FP8Linear(nn.Module):
    """A Linear layer with a float8_e4m3fn weight (N, K) and per-output-channel scales `weight_scale` (N,) fp32; the
    bias stays in the compute dtype. State dict: `weight`, `bias`, `weight_scale`. `.to(dtype)` / `.half()` change the
    bias (the compute dtype) and never the FP8 weight or its scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None, device=None,
                 fp8_matmul: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.fp8_matmul = in_features, out_features, fp8_matmul
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fp8_matmul: bool = True) -> "FP8Linear":
        """The FP8 version of `linear`: its weight quantized per output channel, its bias kept."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=w.dtype, device=w.device, fp8_matmul=fp8_matmul)
        with torch.no_grad():
            q, s = quantize_rows(w)
            layer.weight.copy_(q)
            layer.weight_scale.copy_(s[:, 0])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @classmethod
    def like(cls, linear: nn.Linear, *, fp8_matmul: bool = True) -> "FP8Linear":
        """An uninitialised FP8Linear with `linear`'s shape, compute dtype and device (for loading into)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype,
                   device=linear.weight.device, fp8_matmul=fp8_matmul)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale[:, None], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, fp8_matmul=self.fp8_matmul)

    def _apply(self, fn, recurse=True):
        keep = (self.weight, self.weight_scale)
        return super()._apply(lambda t: keeping_dtype(fn, t) if any(t is k for k in keep) else fn(t), recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8_matmul={self.fp8_matmul}")


def keeping_dtype(fn, t: torch.Tensor) -> torch.Tensor:
    """fn(t) (a module `_apply` function: a move, a cast, to_empty), but a cast only moves `t` without changing its
    dtype: FP8 weights and their fp32 scales are never converted by `.to(dtype)`, `.half()` and the like."""
    out = fn(t)
    return out if out.dtype == t.dtype else t.to(out.device)


def _fp8_targets(module: nn.Module) -> list[str]:
    """The qualified names of `module`'s nn.Linear layers that FP8 replaces (FP8_LAYERS)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and FP8_LAYERS.fullmatch(name)]


def fp8_layer_names(module: nn.Module) -> list[str]:
    """The qualified names of `module`'s FP8Linear layers."""
    return [name for name, m in module.named_modules() if isinstance(m, FP8Linear)]


def _replace(module: nn.Module, make) -> nn.Module:
    for name in _fp8_targets(module):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    if hasattr(module, "_fuse_adaln"):  # MMDiTX: one matrix for every block's adaLN weights, rebuilt in FP8
        module._fuse_adaln()
    return module


@torch.no_grad()
def quantize_(module: nn.Module, *, fp8_matmul: bool = True) -> nn.Module:
    """Convert `module` (an MMDiTX or ControlNet) in place: its FP8_LAYERS become FP8Linear, quantized one layer at
    a time from their current weights. Returns `module`."""
    announce(next(module.parameters()).device)
    return _replace(module, lambda lin: FP8Linear.from_linear(lin, fp8_matmul=fp8_matmul))


def empty_fp8(cls, config, *, dtype, device, fp8_matmul: bool = True) -> nn.Module:
    """`cls(config)` with its FP8_LAYERS as FP8Linear and everything else in `dtype`, allocated uninitialised on
    `device` (no full-precision copy of those layers is ever made): for loading a checkpoint into."""
    with torch.device("meta"):
        module = _replace(cls(config, dtype=dtype), lambda lin: FP8Linear.like(lin, fp8_matmul=fp8_matmul))
    announce(device)
    return module.to_empty(device=device)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` has FP8 layers."""
    return any(isinstance(m, FP8Linear) for m in module.modules())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (works on the meta device). MMDiTX's per-block adaLN weights are
    disjoint slices of one matrix, so each byte is counted once."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


__all__ = [
    "FP8",
    "FP8Linear",
    "FP8_DTYPE",
    "FP8_LAYERS",
    "dequantize",
    "empty_fp8",
    "fp8_gemm_available",
    "fp8_layer_names",
    "fp8_linear",
    "is_fp8",
    "is_quantized",
    "quantize_",
    "quantize_rows",
    "weight_bytes",
]
