"""kernels/launch.py: launches run on the tensors' own device; meta-tensor launches are captured, not run."""

import contextlib

import pytest
import torch

from fastsd35 import kernels
from fastsd35.kernels import launch as launch_mod
from fastsd35.kernels import reference as ref

from helpers.kernels import randn


class FakeKernel:
    """Records each launch with the CUDA device current at that moment (per the patched torch.cuda below)."""

    def __init__(self, current):
        self.current, self.calls = current, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs, self.current[0]))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as if two GPUs were present and cuda:0 were current; `torch.cuda.device(d)` switches `current`."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    return current


def test_launch_switches_to_the_tensors_device(fake_cuda):
    kernel = FakeKernel(fake_cuda)
    launch_mod.launch(kernel, (3,), (1, 2), {"BLOCK": 4}, torch.device("cuda", 1))
    assert kernel.calls == [((3,), (1, 2), {"BLOCK": 4}, 1)]
    assert fake_cuda[0] == 0  # and back


@pytest.mark.parametrize("device", [torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")], ids=str)
def test_launch_stays_when_nothing_to_switch(fake_cuda, device):
    assert launch_mod.guard_device(device) is None
    kernel = FakeKernel(fake_cuda)
    launch_mod.launch(kernel, (1,), (), {}, device)
    assert kernel.calls == [((1,), (), {}, 0)]


def test_meta_launches_are_captured_not_run():
    kernel = FakeKernel([0])
    with launch_mod.capture_launches() as seen:
        launch_mod.launch(kernel, (2,), ("a",), {"X": 1}, torch.device("meta"))
    assert kernel.calls == [] and len(seen) == 1
    assert (seen[0].kernel, seen[0].grid, seen[0].args, seen[0].kwargs) == (kernel, (2,), ("a",), {"X": 1})
    launch_mod.launch(kernel, (2,), ("a",), {"X": 1}, torch.device("meta"))  # nobody watching: nothing happens
    assert len(seen) == 1


def test_every_op_launches_through_launch(monkeypatch):
    """Each Triton op hands its launch to launch() with its tensors' device (so the device guard covers them all)."""
    ops = kernels.TRITON_OPS
    m = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    B, L, D, H, Dh = 2, 40, 128, 2, 64
    calls = {
        "ln_modulate": lambda: ops.ln_modulate(m(B, L, D), m(B, D), m(B, D)),
        "ln_modulate2": lambda: ops.ln_modulate2(m(B, L, D), m(B, D), m(B, D), m(B, D), m(B, D)),
        "gated_residual_ln_modulate": lambda: ops.gated_residual_ln_modulate(m(B, L, D), m(B, L, D), m(B, D), m(B, D), m(B, D)),
        "gated_residual": lambda: ops.gated_residual(m(B, L, D), m(B, L, D), m(B, D)),
        "split_qkv_rmsnorm": lambda: ops.split_qkv_rmsnorm(m(B, L, 3 * D), None, None, *(m(B, H, L, Dh) for _ in range(3)), 0),
        "joint_attention": lambda: ops.joint_attention(*(m(B, H, L, Dh) for _ in range(3)), m(B, 5, D), m(B, L - 5, D), 5),
    }  # fmt: skip
    for name, call in calls.items():
        with launch_mod.capture_launches() as seen:
            call()
        assert len(seen) == 1 and seen[0].device.type == "meta", name


@pytest.mark.gpu
def test_ops_on_a_second_gpu():
    """With cuda:0 current, every op on cuda:1 tensors runs there and matches the reference ops there."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (runs the ops on cuda:1 while cuda:0 is current)")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    ops = kernels.TRITON_OPS
    B, L, D, H, Dh = 2, 77, 256, 4, 64
    x, y = randn((B, L, D), torch.float16, 0).to(dev), randn((B, L, D), torch.float16, 1).to(dev)
    mods = [randn((B, D), torch.float16, 2 + i).to(dev) for i in range(3)]
    torch.testing.assert_close(ops.ln_modulate(x, *mods[:2]), ref.ln_modulate(x, *mods[:2]), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ops.gated_residual(x, y, mods[2]), ref.gated_residual(x, y, mods[2]))
    qkv = randn((B, L, 3 * H * Dh), torch.float16, 9).to(dev)
    bufs = [torch.empty(B, H, L, Dh, dtype=torch.float16, device=dev) for _ in range(6)]
    ops.split_qkv_rmsnorm(qkv, None, None, *bufs[:3], 0)
    ref.split_qkv_rmsnorm(qkv, None, None, *bufs[3:], 0)
    for a, b in zip(bufs[:3], bufs[3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out, expect = (torch.empty(B, L, H * Dh, dtype=torch.float16, device=dev) for _ in range(2))
    ops.joint_attention(*bufs[:3], None, out, 0)
    ref.joint_attention(*bufs[:3], None, expect, 0)
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(out, expect, atol=2e-3, rtol=2e-3)
    assert torch.cuda.current_device() == 0
