"""Block-level ops for MMDiT-X and the choice of backend that runs them.

`REFERENCE_OPS` are plain PyTorch (kernels/reference.py). `TRITON_OPS` are the Triton kernels implementing the same
contracts; they compile on CUDA and run in Triton's interpreter on the CPU when TRITON_INTERPRET=1 is set when this
package is imported. Triton is imported lazily, on first use, so fastsd35 imports (and runs the reference ops) on
machines without it.

Interpreter or compiler is decided once per process, and Triton decides it at import time twice over: its own
library functions (`tl.sum`, `tl.max`, ...) when `triton` is imported, our kernels when their modules are. Both must
agree: an interpreted kernel calling a compiled `tl.sum` fails ("Cannot call @triton.jit'd outside of the scope of a
kernel"). So when the interpreter is asked for here, triton and the kernel modules are imported right away, while
TRITON_INTERPRET still says so; a later change of the variable (a test that sets it to 0 to run the reference ops,
after which torch imports triton) can then no longer split the decision. `backend()` still reads the variable on
each call to choose between the interpreted kernels and the reference ops on the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import checks, reference
from .checks import interpreter_requested

_OP_NAMES = (
    "ln_modulate",
    "ln_modulate2",
    "gated_residual_ln_modulate",
    "gated_residual",
    "split_qkv_rmsnorm",
    "joint_attention",
)

REFERENCE_OPS = SimpleNamespace(name="torch", **{n: getattr(reference, n) for n in _OP_NAMES})

_triton = SimpleNamespace(ops=None, interpreted=None, error=None)  # filled by the first _load_triton_ops()


def _load_triton_ops() -> SimpleNamespace | None:
    """TRITON_OPS, importing the kernel modules on first call; None when triton cannot be imported."""
    if _triton.ops is None and _triton.error is None:
        try:
            from . import checks, fused_adaln_modulate, joint_attention, rmsnorm_qk
        except ImportError as e:
            _triton.error = e
            return None
        _triton.ops = SimpleNamespace(
            name="triton",
            ln_modulate=fused_adaln_modulate.ln_modulate,
            ln_modulate2=fused_adaln_modulate.ln_modulate2,
            gated_residual_ln_modulate=fused_adaln_modulate.gated_residual_ln_modulate,
            gated_residual=fused_adaln_modulate.gated_residual,
            split_qkv_rmsnorm=rmsnorm_qk.split_qkv_rmsnorm,
            joint_attention=joint_attention.joint_attention,
        )
        _triton.interpreted = checks.INTERPRET  # how the kernels were built, fixed at their import
        mixed = _mixed_modes(fused_adaln_modulate._layer_norm_row)
        if mixed:
            _triton.ops, _triton.error = None, ImportError(mixed)
            return None
        if _triton.interpreted:
            from .interpreter import fix_loop_bounds

            fix_loop_bounds()  # Triton 3.6 with NumPy 2.4 (kernels/interpreter.py)
    return _triton.ops


def _mixed_modes(kernel_helper) -> str:
    """Why the kernels cannot run ("" when they can): the kernels and Triton's own library functions were not both
    built for the interpreter, or both for the compiler (TRITON_INTERPRET changed between the two imports)."""
    import triton.language.standard as standard

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without an interpreter: everything is compiled
        return ""
    ours, theirs = (isinstance(f, InterpretedFunction) for f in (kernel_helper, standard.sum))
    if ours == theirs:
        return ""
    mode = {True: "Triton's interpreter", False: "the compiler"}
    return (f"the fastsd35 kernels were built for {mode[ours]} but triton's own functions for {mode[theirs]}: "
            "TRITON_INTERPRET changed after triton was imported; set it before the process imports torch or triton")


if checks.INTERPRET:  # decide for the whole process now (module docstring): triton and the kernels, interpreted
    _load_triton_ops()


def __getattr__(name: str):
    if name == "TRITON_OPS":
        ops = _load_triton_ops()
        if ops is None:
            raise ImportError(f"fastsd35.kernels.TRITON_OPS needs triton, which failed to import: {_triton.error}")
        return ops
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend(device=None) -> str:
    """The backend that runs the ops for tensors on `device` (default: CUDA if available, else the CPU):
    "triton" (CUDA), "triton-interpreter" (CPU with TRITON_INTERPRET=1) or "torch" (the reference ops)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    # On the CPU the interpreter is asked for before importing anything: plain CPU runs never import triton.
    if kind == "cuda" or (kind == "cpu" and interpreter_requested()):
        if _load_triton_ops() is not None:
            if _triton.interpreted:  # the kernels were built for the interpreter, whatever the device
                return "triton-interpreter"
            if kind == "cuda":
                return "triton"
    return "torch"


def ops_for(device=None) -> SimpleNamespace:
    """The op set for tensors on `device`: TRITON_OPS where `backend(device)` names Triton, else REFERENCE_OPS."""
    return REFERENCE_OPS if backend(device) == "torch" else _load_triton_ops()
