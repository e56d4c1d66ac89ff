"""Tolerance rule and inputs shared by the kernel tests.

Rule (flash-attention's tests): with an fp32 "truth" (the reference op on fp32-upcast inputs), the kernel's max error
must be at most twice the max error of the same computation written plainly in the input dtype with torch, plus a
small floor per dtype.
"""

from __future__ import annotations

import math

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return (out.float() - truth.float()).abs().max().item()


def assert_within_tolerance(out: torch.Tensor, same_dtype: torch.Tensor, truth: torch.Tensor, what: str = "") -> float:
    """Assert the rule for `out` (kernel) against `truth`, with `same_dtype` the plain torch result in out's dtype.
    Returns the kernel's error."""
    assert out.shape == truth.shape == same_dtype.shape, f"{what}: {out.shape}, {same_dtype.shape}, {truth.shape}"
    assert out.dtype == same_dtype.dtype, f"{what}: kernel dtype {out.dtype}, torch dtype {same_dtype.dtype}"
    err, base = max_error(out, truth), max_error(same_dtype, truth)
    bound = 2 * base + FLOOR[out.dtype]
    assert math.isfinite(err) and err <= bound, (
        f"{what}: kernel error {err:.3g} > 2 * torch {out.dtype} error {base:.3g} + floor {FLOOR[out.dtype]:g}"
    )
    return err


def randn(shape, dtype, seed: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + mean).to(device=DEVICE, dtype=dtype)


def upcast(*tensors):
    return [None if t is None else t.float() for t in tensors]
