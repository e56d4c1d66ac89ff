"""Input checks shared by the Triton launchers: every user mistake becomes one ValueError that names the op and the
argument, before anything is launched."""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (parsed as Triton parses it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


# Triton decides between compiling and interpreting when its @triton.jit decorators run, i.e. when the kernel modules
# are imported; this flag records that decision for the launchers.
INTERPRET = interpreter_requested()


def check_tensor(op: str, name: str, t, ndim: int, dtype: torch.dtype | None = None, device=None) -> None:
    """`t` is a tensor with `ndim` dimensions, a supported float dtype (`dtype` when given), on `device` when given,
    on a device the Triton kernels can run on."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {dtype} (all inputs must share one dtype)")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (all inputs must be on one device)")
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{op}: {name} is on the CPU; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported; otherwise use fastsd35.kernels.REFERENCE_OPS)"
        )
    # Meta tensors (shapes, no data) pass: the launchers then compute their launch and stop (kernels/launch.py).
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: {name} is on {t.device}; the Triton kernels run on CUDA (or the CPU interpreter)")


HEAD_DIMS = (64, 128)  # the head sizes the attention-side kernels are built for


def check_head_dim(op: str, head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim {head_dim} is not supported (supported: {', '.join(map(str, HEAD_DIMS))})")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """An input whose last dimension is contiguous: `t` itself (any other strides are passed to the kernel), or an
    explicit contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def check_writable_rows(op: str, name: str, t: torch.Tensor) -> None:
    """Outputs are written in place, so they cannot be copied into shape: the last dimension must be contiguous."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")
