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
