"""`fastsd35 bench --only multigpu` (fastsd35.benchmarks.multi_gpu): skipped below 2 GPUs without starting anything, and
its real machinery (worker pools over torch.distributed) run on the CPU with gloo, 2 processes standing in for GPUs
on the tiny preset: the same images at 1 and 2 workers, CFG-parallel bit for bit the split passes, and a worker that
fails or dies gives the contender an error within a bounded time, with no process left behind.

The pools here are forked (a spawned worker pays seconds importing torch and transformers, each): the parent imports
what the workers need first. The spawn path that CUDA uses runs once, on a worker that fails early."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import time
from dataclasses import replace
from functools import partial

import pytest
import torch

from fastsd35.app import cli
from fastsd35.benchmarks import cases as bc
from fastsd35.benchmarks import multi_gpu as bm
from fastsd35.benchmarks import suite as fb

ENV = fb.Environment(torch.device("cpu"), "Test CPU (1 thread)", "torch")
BOUND_S = 30  # a failing pool must be gone well within this (its gloo timeout is 60 s)


@pytest.fixture(autouse=True)
def gloo_on_loopback(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tiny preset runs the reference ops


@pytest.fixture(scope="module")
def warm():
    """Build the tiny components once here, so that forked workers find transformers' models imported."""
    with bc._e2e_components(torch.device("cpu"), torch.float32, False):
        pass


def no_children():
    for p in multiprocessing.active_children():  # reaps finished ones
        p.join(1.0)
    return multiprocessing.active_children() == []


class Recorded(fb.OutputCheck):
    """The case's check, keeping every contender's outputs."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __call__(self, contender, outputs, tolerance=None):
        self.seen[contender] = [t.clone() for t in outputs]
        return super().__call__(contender, outputs, tolerance)


def run_case(case) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every contender of the case, quick: (contender -> result record, contender -> its images)."""
    results, check = fb.Results(ENV, quick=True), Recorded()
    for contender in case.contenders:
        results.add(case, fb.run_contender(case, contender, None, device="cpu", quick=True, check=check))
    records = {r["contender"]: r for r in results.record()["cases"][0]["results"]}
    return records, {name: outputs[0] for name, outputs in check.seen.items()}


# -- no GPUs: skipped ---------------------------------------------------------------------------------------------


def test_world_sizes():
    assert [bm.world_sizes(n) for n in (1, 2, 3, 4, 6, 8)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 6],
                                                                [1, 2, 4, 8]]  # fmt: skip


def test_cases_at_eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    dp, cfg = bm.multi_gpu_cases("cuda")  # listing builds nothing
    assert (dp.id, cfg.id) == ("large-data_parallel", "large-cfg_parallel")
    assert [c.name for c in dp.contenders] == ["1 GPU", "2 GPUs", "4 GPUs", "8 GPUs"]
    assert [c.baseline for c in dp.contenders] == [True, False, False, False]
    assert dp.images == 16 and dp.shape == dict(images=16, preset="large_turbo", size="1024x1024", steps=4, cfg=1.0)
    assert [c.name for c in cfg.contenders] == ["1 GPU, split passes", "2 GPUs cfg-parallel", "1 GPU"]
    assert [c.baseline for c in cfg.contenders] == [True, False, True]
    assert cfg.shape == dict(images=1, preset="large", size="1024x1024", steps=bm.CFG_STEPS, cfg=4.5, preset_steps=40)
    specs = [c.build.args[0] for c in (*dp.contenders, *cfg.contenders)]
    assert [s.world_size for s in specs] == [1, 2, 4, 8, 1, 2, 1]
    assert all(s.cuda and s.start_method == "spawn" for s in specs)  # CUDA does not survive a fork
    assert len(set(specs[0].prompts)) == 16 and [s.split for s in specs[4:]] == [True, False, False]
    assert [s.cfg_parallel for s in specs[4:]] == [False, True, False]


@pytest.mark.parametrize("device,gpus,reason", [
    ("cpu", 0, "needs 2 or more CUDA GPUs; this machine has 0"),
    ("cuda", 1, "needs 2 or more CUDA GPUs; this machine has 1"),
    ("cpu", 4, "needs 2 or more CUDA GPUs; this run is on cpu"),
])  # fmt: skip
def test_below_two_gpus_every_contender_is_skipped_and_nothing_starts(monkeypatch, device, gpus, reason):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(bm, "Pool", None)  # any pool would fail loudly
    cases = bc.build_cases(device, ("multigpu",))
    assert [c.id for c in cases] == ["large-data_parallel", "large-cfg_parallel"]
    assert [c.name for c in cases[0].contenders] == ["1 GPU", "2 GPUs"]
    for case in cases:
        for contender in case.contenders:
            result = fb.run_contender(case, contender, None, device="cpu", quick=True)
            assert result.skipped == reason and result.error is None and result.median_s is None
    assert no_children()


def test_cli_bench_only_multigpu_on_the_cpu(tmp_path):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(["bench", "--only", "multigpu", "--quick", "--out", str(tmp_path)]) == 0
    table = stdout.getvalue().splitlines()
    rows = [line for line in table if line.startswith("multigpu ")]
    assert [line.split()[1] for line in rows] == ["data_parallel"] * 2 + ["cfg_parallel"] * 3
    assert all(line.endswith("skipped: needs 2 or more CUDA GPUs; this machine has 0") for line in rows)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(c["part"], c["id"]) for c in record["cases"]] == [("multigpu", "large-data_parallel"),
                                                               ("multigpu", "large-cfg_parallel")]  # fmt: skip
    assert all("skipped" in r for c in record["cases"] for r in c["results"])


# -- CPU workers: the machinery -----------------------------------------------------------------------------------


def test_worker_pools_on_the_cpu(warm):
    """Data parallel at 1 and 2 workers gives the same images, as images/s with the ratio; CFG-parallel gives the
    split passes' images bit for bit (and the batched run's within the check's tolerance)."""
    dp, cfg = bm.multi_gpu_cases("cpu", cpu_workers=2, start_method="fork")
    assert [c.name for c in dp.contenders] == ["1 process", "2 processes"]

    records, images = run_case(dp)
    assert images["1 process"].shape == (4, 64, 96, 3) and images["1 process"].dtype == torch.uint8
    assert len({images["1 process"][i].sum().item() for i in range(4)}) == 4  # four different pictures
    assert torch.equal(images["2 processes"], images["1 process"])
    two = records["2 processes"]
    assert "error" not in two and two["images_per_s"] == pytest.approx(4e3 / two["median_ms"])
    assert two["ratios"].keys() == {"1 process"} and two["peak_mem_gib"] is None
    assert two["extra"]["processes"] == 2 and two["extra"]["images"] == 4

    records, images = run_case(cfg)
    assert not [r for r in records.values() if "error" in r], records
    assert torch.equal(images["2 processes cfg-parallel"], images["1 process, split passes"])
    assert set(records["2 processes cfg-parallel"]["ratios"]) == {"1 process", "1 process, split passes"}
    assert no_children()


def test_a_failing_worker_is_the_contenders_error(warm):
    case = bm.multi_gpu_cases("cpu", cpu_workers=2, start_method="fork")[0]
    spec = case.contenders[1].build.args[0]
    failing = bc.Contender("2 processes", partial(bm._pool_contender, replace(spec, fail_rank=1)))
    start = time.monotonic()
    result = fb.run_contender(case, failing, None, device="cpu", quick=True)
    assert time.monotonic() - start < BOUND_S
    assert result.error == "stopped while running: rank 1: RuntimeError: planted failure on rank 1", result
    assert result.median_s is None and no_children()


def test_a_killed_worker_ends_the_run_without_hanging(warm):
    spec = bm.multi_gpu_cases("cpu", cpu_workers=2, start_method="fork")[0].contenders[1].build.args[0]
    pool = bm.Pool(spec)
    try:
        pool.start()
        assert pool.run(send=False) == (None, None)  # timed calls leave the images on rank 0
        os.kill(pool.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(bc.Failed) as failed:
            pool.run()
        assert time.monotonic() - start < BOUND_S
    finally:
        pool.close()
    assert str(failed.value) == "rank 1 stopped (killed by signal 9) without a report"  # not rank 0's lost contact
    assert no_children()


def test_a_spawned_worker_reports_its_error():
    """The start method CUDA uses: the worker is imported afresh, finds no CUDA here and says so."""
    spec = bm.PoolSpec(1, cuda=True, preset="tiny_random", prompts=("a",), timeout_s=60)
    start = time.monotonic()
    with pytest.raises(bc.Failed, match="^rank 0: FastSD35Error: --device cuda but CUDA is not available here"):
        with bm._pool_contender(spec):
            pass
    assert time.monotonic() - start < BOUND_S and no_children()


def test_a_worker_whose_benchmark_is_gone_stops():
    """Reparented (the benchmark process died without closing the pool): the wait for a command ends."""
    commands = multiprocessing.get_context("fork").Queue()
    start = time.monotonic()
    assert bm._next_command(commands, parent=os.getppid() + 1) is None
    assert time.monotonic() - start < 5
    commands.put(("run", True))
    assert bm._next_command(commands, parent=os.getppid()) == ("run", True)
