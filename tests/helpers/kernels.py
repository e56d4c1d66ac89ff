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


def modulation_views(B, n, D, dtype, seed=10):
    """n (B, D) vectors exactly as model.py makes them: a column slice of the (B, total) all-blocks tensor, viewed
    (B, n, D), then [:, j] (row stride = total, column stride 1). Scales around 0, shifts around 0."""
    before, after = 3 * D, 2 * D + 5  # other blocks' vectors on both sides
    mods = randn((B, before + n * D + after), dtype, seed, scale=0.5)
    view = mods[:, before : before + n * D].view(B, n, D)
    return [view[:, j] for j in range(n)]


def rows(B, L, D, dtype, seed, strided=False, **kw):
    """(B, L, D) activations; `strided`: a view into a larger buffer (row and batch strides != D, last stride 1)."""
    if not strided:
        return randn((B, L, D), dtype, seed, **kw)
    return randn((B, L + 3, D + 8), dtype, seed, **kw)[:, 2 : 2 + L, :D]
