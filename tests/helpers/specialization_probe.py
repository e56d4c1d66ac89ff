"""Run as a script (without TRITON_INTERPRET: it needs the compiled-mode kernels): FastMMDiTX forwards at the released
SD3.5 sizes on meta tensors, every kernel launch they make captured, and for each launch the arguments the JIT would
not mark divisible by 16. Prints one JSON object: {"launches": {kernel: count}, "violations": [...],
"planted": [...]} ("planted": the same check on a launch with outputs of row stride D + 8, which must be caught).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch

from fastsd35 import kernels
from fastsd35.kernels import report
from fastsd35.kernels.launch import capture_launches
from fastsd35.models.mmditx import CONFIGS, FastMMDiTX

ARCH = 90  # divisibility of integers and pointers does not depend on the architecture


def lost_divisibility(launch) -> list[str]:
    """Names of the pointer and stride arguments of `launch` that the JIT would not specialize as divisible by 16."""
    jit_fn = report.jit_function(launch.kernel)
    kwargs = dict(launch.kwargs)
    if jit_fn is not launch.kernel:  # autotuned: bind with a config's meta-parameters, as the autotuner does
        kwargs.update(launch.kernel.configs[0].all_kwargs())
    signature, _, _, _ = report.specialize(jit_fn, ARCH, launch.args, kwargs)
    divisible = report.divisibility(jit_fn, ARCH, launch.args, kwargs)
    return [
        name
        for name, ok in divisible.items()
        if ok is not True and (signature[name].startswith("*") or name.startswith("stride_"))
    ]


def model_launches(name: str, batch: int, n_ctx: int, model=None):
    model = model or FastMMDiTX(CONFIGS[name], dtype=torch.bfloat16, device="meta")
    model.ops = lambda device: kernels.TRITON_OPS
    x = torch.empty(batch, 16, 128, 128, device="meta")  # a 1024x1024 image's latent
    ctx = torch.empty(batch, n_ctx, 4096, device="meta")
    with capture_launches() as seen:
        model(x, torch.empty(batch, device="meta"), torch.empty(batch, 2048, device="meta"), ctx)
    return model, seen


def main() -> None:
    counts, violations = Counter(), []
    for name in ("sd3.5_large", "sd3.5_medium", "sd3_medium"):
        model = None
        for batch, n_ctx in ((1, 154), (2, 154), (2, 333)):
            model, seen = model_launches(name, batch, n_ctx, model)
            for launch in seen:
                kernel = report.jit_function(launch.kernel).__name__
                counts[kernel] += 1
                lost = lost_divisibility(launch)
                if lost:
                    violations.append(dict(model=name, batch=batch, n_ctx=n_ctx, kernel=kernel, args=lost))
    # The check itself: attention outputs padded to a row stride of D + 8 (what the old GPU test did).
    B, H, L, Dh, n_ctx = 1, 38, 4250, 64, 154
    q = torch.empty(B, H, L, Dh, dtype=torch.bfloat16, device="meta")
    pad = lambda rows: torch.empty(B, rows, H * Dh + 8, dtype=q.dtype, device="meta")[..., : H * Dh]  # noqa: E731
    with capture_launches() as seen:
        kernels.TRITON_OPS.joint_attention(q, q, q, pad(n_ctx), pad(L - n_ctx), n_ctx)
    print(json.dumps(dict(launches=counts, violations=violations, planted=lost_divisibility(seen[0]))))


if __name__ == "__main__":
    sys.exit(main())
