"""The kernel launches that matter, at real SD3.5 sizes: the registry `fastsd35 kernels` compiles from.

Each kernel module registers, next to its launchers, a function that calls those launchers with meta tensors shaped
and strided as the model hands them over (kernels/launch.py captures the launches instead of running them). The
compile report then compiles every distinct specialization those launches produce, for every config an autotuned
kernel can pick. A new kernel, or a new variant of one (an FP8 output, say), adds a `@report_case` function beside
its launcher and is reported, checked and tested with no change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Shape:
    """One transformer's attention geometry."""

    name: str
    hidden: int  # D
    heads: int  # H

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# The released models (SPEC.md): SD3.5 Large (and Turbo), SD3.5 Medium (and SD3 Medium). Dh 128 is supported by the
# attention-side kernels but in no release; "dh128" keeps Large's width with heads of 128.
LARGE = Shape("large", 2432, 38)
MEDIUM = Shape("medium", 1536, 24)
DH128 = Shape("dh128", 2432, 19)
SHAPES = (LARGE, MEDIUM)
IMAGE_TOKENS = 4096  # a 1024x1024 image: (1024 / 8 / 2) ** 2 patches
CONTEXT_TOKENS = (154, 333)  # CLIP 77 + T5 77 (the shortest prompt) and T5 256 (the longest default prompt)
BATCHES = (1, 2)  # cfg <= 1 (Turbo) and the CFG pair
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ReportCase = Callable[[torch.dtype], None]
REPORT_CASES: dict[str, ReportCase] = {}


def report_case(fn: ReportCase) -> ReportCase:
    """Register `fn(dtype)`: it calls launchers with meta tensors of dtype `dtype` at the sizes worth compiling."""
    REPORT_CASES[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def modulation_rows(batch: int, hidden: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """n (B, D) views into one batched modulation tensor, as MMDiTX.modulations slices it: every block's vectors
    side by side in each row (here 12 per block over 38 blocks plus the final layer's 2, Large's layout)."""
    width = (12 * 38 + 2) * hidden
    mods = meta_tensor(batch, width, dtype=dtype)
    return [mods[:, j * hidden : (j + 1) * hidden] for j in range(n)]


def sd35_launch_sizes():
    """(shape, batch, n_ctx) for the released models: both batches, both context lengths."""
    return [(s, b, c) for s in SHAPES for b in BATCHES for c in CONTEXT_TOKENS]
