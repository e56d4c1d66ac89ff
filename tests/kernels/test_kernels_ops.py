"""The op sets and the backend choice (fastsd35.kernels): TRITON_OPS really runs Triton, and runs the model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsd35 import kernels

from helpers.kernels import DEVICE


def test_backend_is_triton_under_test_env():
    """Nothing falls back to torch silently: the tests run the kernels compiled on CUDA, else in the interpreter."""
    expected = "triton" if DEVICE.type == "cuda" else "triton-interpreter"
    assert kernels.backend(DEVICE) == expected
    assert kernels.backend() == expected
    ops = kernels.ops_for(DEVICE)
    assert ops is kernels.TRITON_OPS and ops.name == "triton"


def test_triton_ops_are_the_kernels():
    ops = kernels.TRITON_OPS
    names = sorted(n for n in vars(kernels.REFERENCE_OPS) if n != "name")
    assert sorted(n for n in vars(ops) if n != "name") == names
    for name in names:
        fn = getattr(ops, name)
        assert fn is not getattr(kernels.reference, name)
        assert fn.__module__ in ("fastsd35.kernels.fused_adaln_modulate", "fastsd35.kernels.rmsnorm_qk",
                                 "fastsd35.kernels.joint_attention"), fn.__module__  # fmt: skip


def test_other_devices_use_the_reference_ops():
    assert kernels.backend("meta") == "torch"
    assert kernels.ops_for("meta") is kernels.REFERENCE_OPS


def test_plain_cpu_uses_torch_without_importing_triton():
    """Without TRITON_INTERPRET a CPU run uses the reference ops and never imports triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, fastsd35, fastsd35.kernels as k; "
        "print(k.backend('cpu'), k.ops_for('cpu').name, 'triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.stdout.split() == ["torch", "torch", "False"]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU launcher guard; on CUDA the kernels compile")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from fastsd35.kernels import checks, fused_adaln_modulate

    monkeypatch.setattr(checks, "INTERPRET", False)
    x = torch.zeros(1, 2, 64)
    with pytest.raises(ValueError, match="x is on the CPU; the Triton kernels need CUDA tensors"):
        fused_adaln_modulate.ln_modulate(x, x[:, 0], x[:, 0])


def _python(code: str, **env) -> list[str]:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET as given (unset when None); its stdout's words."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base.update({k: v for k, v in env.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


# What a test does when it asks for the reference ops with TRITON_INTERPRET=0 and then for the kernels with 1: in
# between, torch imports triton (torch._dynamo does, on the first model call), and the kernels run afterwards.
_SWITCH_BACK_AND_FORTH = """
import os, torch, fastsd35.kernels as k
from fastsd35.kernels import reference
os.environ["TRITON_INTERPRET"] = "0"
import triton                       # as torch._dynamo imports it, under the reference ops' setting
print(k.backend("cpu"))
os.environ["TRITON_INTERPRET"] = "1"
x = torch.randn(1, 3, 64)
shift, scale = torch.randn(1, 64), torch.randn(1, 64)
got = k.ops_for("cpu").ln_modulate(x, shift, scale)
print(k.backend("cpu"), torch.allclose(got, reference.ln_modulate(x, shift, scale), atol=1e-5))
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter is the CPU's backend")
def test_interpreter_decided_once_at_import():
    """TRITON_INTERPRET=1 when fastsd35 is imported builds triton and the kernels for the interpreter right away, so
    a later switch to 0 and back (triton imported in between, as torch does) runs the interpreted kernels instead of
    failing inside them (tests/tiny/test_tiny_preset.py::test_triton_kernels_draw_the_same_picture run alone)."""
    assert _python(_SWITCH_BACK_AND_FORTH, TRITON_INTERPRET="1") == ["torch", "triton-interpreter", "True"]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter is the CPU's backend")
def test_kernels_and_triton_built_for_different_modes_are_refused():
    """triton imported for the compiler, then TRITON_INTERPRET=1 and fastsd35 imported: the interpreted kernels would
    call compiled `tl.sum`. The backend stays the reference ops, and asking for TRITON_OPS says why."""
    code = """
import os, triton
os.environ["TRITON_INTERPRET"] = "1"
import fastsd35.kernels as k
print(k.backend("cpu"))
try:
    k.TRITON_OPS
except ImportError as e:
    print("refused:", e)
"""
    words = _python(code, TRITON_INTERPRET=None)
    assert words[:2] == ["torch", "refused:"], words
    assert "built for Triton's interpreter but triton's own functions for the compiler" in " ".join(words)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter is the CPU's backend")
def test_interpreter_takes_scalar_loop_bounds():
    """The interpreter holds scalars as (1,) arrays; a loop bound goes through `__index__`, which Triton 3.6 writes as
    int(array), refused by NumPy 2.4. With the kernels loaded, every supported Triton takes it (kernels/interpreter.py)
    and a block is still no index."""
    import numpy as np
    from triton.language import core
    from triton.runtime import interpreter as triton_interpreter

    from fastsd35.kernels import interpreter

    assert kernels.backend("cpu") == "triton-interpreter"
    assert not interpreter._needs_fix(triton_interpreter)
    assert not interpreter.fix_loop_bounds()  # done once, when the kernels were loaded (or never needed)
    block = core.tensor.__new__(core.tensor)
    block.handle = triton_interpreter.TensorHandle(np.arange(4, dtype=np.int32), core.int32)
    with pytest.raises(TypeError, match=r"only a scalar can be a loop bound or an index, got a block of shape \(4,\)"):
        interpreter._index(block)
