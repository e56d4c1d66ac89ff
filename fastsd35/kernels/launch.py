"""The one place the launchers hand a kernel its grid and arguments: on the tensors' own device, or to an observer.

Triton launches on `torch.cuda.current_device()` and its current stream, whatever device the tensors live on, so a
launch for tensors on cuda:N (N not current) would fail its pointer checks or run on the wrong GPU; `launch` makes
their device current for the call (and only when it is not already: the common case costs one comparison).

Meta tensors carry shapes and strides but no memory. A launcher called with them computes exactly the arguments it
would pass on a GPU and stops here: `capture_launches()` collects those launches. The compile report
(kernels/report.py) and the specialization tests use that to see what the kernels get at real SD3.5 sizes without a
GPU or the memory to hold the tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Launch:
    """One kernel launch as a launcher built it: `kernel[grid](*args, **kwargs)` on `device`."""

    kernel: Any  # a triton JITFunction, or an Autotuner over one
    grid: Any  # a tuple, or a callable of the meta-parameters (autotuned kernels)
    args: tuple
    kwargs: dict
    device: torch.device


_observers: list[list[Launch]] = []


@contextmanager
def capture_launches():
    """Collect the launches made with meta tensors inside the block (a list, filled as they happen)."""
    seen: list[Launch] = []
    _observers.append(seen)
    try:
        yield seen
    finally:
        _observers.remove(seen)


def guard_device(device: torch.device):
    """The context a launch on `device` needs: `torch.cuda.device(device)` when it is a CUDA device other than the
    current one, else None (nothing to switch)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)


def launch(kernel, grid, args: tuple, kwargs: dict, device: torch.device) -> None:
    """Run `kernel[grid](*args, **kwargs)` on `device`, the device of every tensor in `args`."""
    if device.type == "meta":
        for seen in _observers:
            seen.append(Launch(kernel, grid, args, dict(kwargs), device))
        return
    switch = guard_device(device)
    if switch is None:
        kernel[grid](*args, **kwargs)
        return
    with switch:  # the launch stream then is the current stream of `device`, as it is for torch's own ops there
        kernel[grid](*args, **kwargs)


# Autotuned kernels choose among configs per architecture; the compile report asks each the same way the launch does.
_config_choosers: dict[int, Callable] = {}


def register_autotuned(kernel, configs_for: Callable) -> None:
    """`configs_for(arch: int, named_args: dict) -> list[triton.Config]`: the configs `kernel` may pick from on a GPU
    of compute capability `arch` (e.g. 90) for these arguments."""
    _config_choosers[id(kernel)] = configs_for


def configs_for(kernel, arch: int, named_args: dict) -> list | None:
    """The configs an autotuned `kernel` can pick on `arch` (None for a kernel that is not autotuned)."""
    chooser = _config_choosers.get(id(kernel))
    return None if chooser is None else chooser(arch, named_args)
