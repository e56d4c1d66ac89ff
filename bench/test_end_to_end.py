"""A whole generation, prompt to image: the large_turbo preset at 1024x1024 (4 steps) with full-size random-weight
transformer, VAE and text encoders, the transformer eager and replayed from CUDA graphs (the ratio); per-stage times
(encode, sample, decode) in each result. On the CPU: the tiny preset on the reference ops."""

import pytest

from fastsd35.benchmarks.suite import synchronized_timer

PART = "e2e"
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


def test_generation(measure, case, contender):
    measure(case, contender)
