"""One transformer step of the full-size SD3.5 Large and Medium (random weights, bf16, 1024x1024, 154 context
tokens, CFG batch 2 and batch 1): FastMMDiTX eager and replayed from a CUDA graph against MMDiTX on the reference ops
(eager, SDPA), diffusers' SD3Transformer2DModel eager and under torch.compile. ms/step, TFLOP/s, peak memory. On the
CPU: depth-3 stand-ins at latent 32x32, MMDiTX against diffusers."""

import pytest

from fastsd35.benchmarks.suite import synchronized_timer

PART = "transformer"
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


def test_step(measure, case, contender):
    measure(case, contender)
