"""Block-level ops for MMDiT-X and the choice of backend that runs them.

`REFERENCE_OPS` are plain PyTorch (kernels/reference.py). The Triton kernels implement the same contracts.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import reference

_OP_NAMES = (
    "ln_modulate",
    "ln_modulate2",
    "gated_residual_ln_modulate",
    "gated_residual",
    "split_qkv_rmsnorm",
    "joint_attention",
)

REFERENCE_OPS = SimpleNamespace(name="torch", **{n: getattr(reference, n) for n in _OP_NAMES})


def backend(device=None) -> str:
    """The backend that runs the ops for tensors on `device`: currently always "torch" (the reference ops)."""
    return "torch"


def ops_for(device=None) -> SimpleNamespace:
    """The op set to use for tensors on `device`."""
    return REFERENCE_OPS
