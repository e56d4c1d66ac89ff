"""Many GPUs, each contender a pool of worker processes joined by torch.distributed (fastsd35.benchmarks.multi_gpu): images/s
of data parallel at 1, 2, 4, ... GPUs (the large_turbo preset, 2 images per GPU of the largest pool; ratios to one
GPU are the speedup) and one CFG-parallel pair's latency (the large preset at 8 steps) against one GPU batching
[cond, uncond] and one GPU running the split passes. Full-size random weights. With fewer than 2 GPUs: skipped."""

import pytest

from fastsd35.benchmarks.suite import synchronized_timer

PART = "multigpu"
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


def test_multi_gpu(measure, case, contender):
    measure(case, contender)
