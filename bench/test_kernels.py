"""Each Triton kernel against its torch counterpart (kernels/reference.py eager; SDPA's flash backend for attention)
at SD3.5 Large and Medium shapes at 1024x1024: B=2, D=2432 / 1536, H=38 / 24, Dh=64, L=4096 (+154 or +333 for the
joint attention). TFLOP/s for attention, GB/s (each tensor read or written once) for the others. On the CPU the
Triton contenders are skipped: Triton's interpreter is not timed."""

import pytest

from fastsd35.benchmarks.suite import synchronized_timer

PART = "kernels"
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


def test_kernel(measure, case, contender):
    measure(case, contender)
