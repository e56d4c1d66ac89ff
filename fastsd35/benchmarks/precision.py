"""How far a lower precision may move the transformer's output: the error model the benchmark's output check uses for
the FP8 contender, instead of the dtype's tolerance (bf16's 5e-2 is below what FP8 costs a deep model).

FP8 (`--dtype fp8`: the block Linears' weights per output channel, their inputs per token, both float8_e4m3fn) moves
one step's output by a relative L2 error that grows with the depth and barely with the width: each block adds its
rounding to the residual stream. Measured on the CPU with `tools/fp8_error.py` (random N(0, 1/fan_in) weights, as the
benchmark draws them; CFG batch 2, 256 image + 154 context tokens, sigma 0.75), FP8 against the same model in bf16
(what the check compares: the FP8 contender against the reference ops' bf16), at width 512; the released widths
(64 x depth) come out a little lower (depth 24 at 1536: 7.0%; README's FP8 table), so this is the upper envelope.
"""

from __future__ import annotations

import math

# depth -> relative L2 error of FP8 against bf16, width 512 (tools/fp8_error.py --heads 8)
FP8_ERROR = {1: 0.0315, 2: 0.0393, 4: 0.0488, 8: 0.0609, 16: 0.0775, 24: 0.0819, 38: 0.0912}
# The check allows twice the model's error: other weight draws (the GPU's generator), the Triton kernels' rounding and
# the GPU's FP8 GEMMs move it by far less, while a broken FP8 path (a wrong scale, a transposed weight) moves the
# output by several times the model's error (tests/benchmarks/test_fp8_tolerance.py plants both).
FP8_MARGIN = 2.0


def fp8_error(depth: int) -> float:
    """The modelled relative L2 error of FP8 at `depth` blocks: the measured points, interpolated linearly in
    log2(depth), extended past the deepest one along the last segment's slope."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    points = sorted(FP8_ERROR.items())
    for (d0, e0), (d1, e1) in zip(points, points[1:]):
        if depth <= d1:
            break  # else: past the deepest point, on the last segment's line
    t = (math.log2(depth) - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
    return e0 + t * (e1 - e0)


def fp8_tolerance(depth: int) -> float:
    """The largest relative error the output check accepts from the FP8 contender of a `depth`-block model."""
    return FP8_MARGIN * fp8_error(depth)
