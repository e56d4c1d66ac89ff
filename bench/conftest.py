"""pytest-benchmark front end of `fastsd35.benchmarks.suite`: `python -m pytest bench` (how things are timed: the docstring of
fastsd35/benchmark.py; what is measured: fastsd35/benchmark_cases.py).

Each test is one contender on one case, and pytest-benchmark groups a case's contenders together. The timing loop is
pytest-benchmark's own (`benchmark.pedantic`, with the synchronising timer each module sets through
`pytest.mark.benchmark(timer=...)`), so its table and its --benchmark-json/--benchmark-autosave files hold the
per-call times (for kernels on CUDA: per graph replay, i.e. per `input_sets` calls; the results file divides). Each
test's `extra_info` carries its ratios to the baselines measured before it in this run (the results file: to all of
them), with its TFLOP/s or GB/s and peak memory. A case's shared inputs are built for its first contender and
released when the next case starts; each contender builds and frees its own model. At the end the whole run is
written to bench/results/<device>.json and printed as the table `fastsd35 bench` prints.

Each contender's first outputs are checked to be finite and to agree with the case's first contender (a failed test
otherwise). A contender that cannot run here (diffusers not installed, Triton on the CPU, torch.compile failing, out of memory) is
a skipped test whose reason is also recorded in the results.
"""

from __future__ import annotations

import gc
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from fastsd35.benchmarks import suite as fb
from fastsd35.benchmarks.cases import MODELS, build_cases

RECORD = pytest.StashKey[dict]()
WRITTEN = pytest.StashKey[Path]()


def pytest_addoption(parser):
    group = parser.getgroup("fastsd35 bench")
    group.addoption("--bench-quick", action="store_true", help="fewer rounds (as fastsd35 bench --quick)")
    group.addoption("--bench-models", default=",".join(MODELS), help="kernel and step shapes: large,medium")
    group.addoption("--bench-out", default=str(Path(__file__).parent / "results"), help="folder of the results JSON")


def pytest_generate_tests(metafunc):
    """One test per (case, contender) of the module's PART, in the case's order."""
    if "contender" not in metafunc.fixturenames:
        return
    models = [m.strip() for m in metafunc.config.getoption("--bench-models").split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise pytest.UsageError(f"--bench-models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = [(case, c) for case in build_cases(device, (metafunc.module.PART,), models) for c in case.contenders]
    metafunc.parametrize("case,contender", pairs, ids=[f"{case.id}-{c.name}" for case, c in pairs])


class OpenCase:
    """The inputs of the case whose contenders are running: built for its first contender, kept for the next ones (a
    case's tests are consecutive), released when another case starts and at the end."""

    def __init__(self):
        self.key, self.inputs, self.check, self.stack = None, None, None, ExitStack()

    def get(self, case):
        """(the case's inputs, the check its contenders' outputs share)"""
        if self.key != (case.part, case.id):
            self.close()
            self.inputs = self.stack.enter_context(case.inputs())
            self.key, self.check = (case.part, case.id), fb.OutputCheck()
        return self.inputs, self.check

    def close(self):
        self.stack.close()
        self.key = self.inputs = self.check = None
        self.stack = ExitStack()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def bench_results(request):
    config = request.config
    results = fb.Results(fb.detect_environment(), quick=config.getoption("--bench-quick"), runner="pytest bench")
    yield results
    if results.timed():
        config.stash[WRITTEN] = results.write(config.getoption("--bench-out"))
        config.stash[RECORD] = results.record()


@pytest.fixture(scope="session")
def open_case():
    cases = OpenCase()
    yield cases
    cases.close()


def pedantic(benchmark) -> fb.Timer:
    """fastsd35.benchmarks.suite's timer interface on pytest-benchmark: its pedantic loop, its samples."""

    def timer(fn, *, rounds, warmup_rounds, iterations):
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
        return None if benchmark.stats is None else list(benchmark.stats.stats.data)  # None: --benchmark-disable

    return timer


@pytest.fixture
def measure(benchmark, bench_results, open_case, request):
    """measure(case, contender): time it through `benchmark`, record it, skip the test if it could not run."""
    quick = request.config.getoption("--bench-quick")

    def run(case, contender):
        benchmark.group = f"{case.part} {case.id}"
        inputs, check = open_case.get(case)
        result = fb.run_contender(case, contender, inputs, device=bench_results.env.device, quick=quick,
                                  timer=pedantic(benchmark), check=check)  # fmt: skip
        bench_results.add(case, result)
        record = bench_results.latest(case)
        benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("contender", "baseline")})
        benchmark.extra_info["device"] = bench_results.env.name
        if result.error:
            pytest.fail(f"output check: {result.error}", pytrace=False)
        if result.skipped:
            pytest.skip(result.skipped)

    return run


def pytest_terminal_summary(terminalreporter, config):
    if RECORD in config.stash:
        terminalreporter.write_sep("-", "fastsd35 bench: ratios to the baselines of this run")
        terminalreporter.write_line(fb.format_table(config.stash[RECORD]))
        terminalreporter.write_line(f"wrote {config.stash[WRITTEN]}")
