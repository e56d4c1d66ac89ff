"""torchrun data parallel and CFG-parallel (fastsd35.pipeline.distributed) on the CPU with gloo: 2 ranks, forked from this
process with torchrun's environment (so the imports are not paid again), and once through torchrun itself.

Every run is compared with a single-process run of the same command: the same file names and the same bytes."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd35.app import cli
from fastsd35.errors import FastSD35Error
from fastsd35.pipeline import distributed
from fastsd35.pipeline.sampling import CFGDenoiser, SLGConfig

FAST = ["--preset", "tiny_random", "--steps", "2", "--width", "64", "--height", "48"]
TIMEOUT_S = 60  # the gloo timeout of these jobs (loading on a busy 2-core machine can take a while)


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    """As tests/test_cli.py: the reference ops (not the interpreted kernels), no network, no real HF cache; and the
    loopback interface for gloo."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here and in every rank, as torchrun sets (OMP_NUM_THREADS=1): on a CPU the number of
    threads changes how GEMMs split their sums, hence the last bits, so bit-for-bit comparisons need the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Rank:
    code: int
    out: str
    err: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(target, rank, world_size, port, logs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(logs / f"{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    torch.set_num_threads(1)
    code = 1
    try:
        code = target(rank)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0)


def launch(target, tmp_path, world_size=2, wait_s=90) -> list[Rank]:
    """Run target(rank) in `world_size` forked processes that see torchrun's environment; their exit codes and
    output. Fails if any is still running after `wait_s`."""
    logs = tmp_path / f"logs-{time.monotonic_ns()}"
    logs.mkdir()
    port, ctx = free_port(), multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(target, r, world_size, port, logs)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    ranks = [Rank(p.exitcode, (logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text()) for r, p in enumerate(procs)]
    assert not hung, f"ranks {hung} still running after {wait_s} s: {ranks}"
    return ranks


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def cli_rank(*argv):
    return lambda rank: run(*argv, "--dist-timeout", TIMEOUT_S)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\na blue ball\na red cube\n")  # the repeat takes name-2: rank 0 must decide names
    return path


# -- data parallel ------------------------------------------------------------------------------------------------


def test_data_parallel_writes_the_single_process_files(tmp_path, capsys):
    """3 prompts of batch 2 over 2 ranks (rank 0 gets prompts 0 and 2): the same names, the same PNG bytes (pixels and
    metadata) as one process, a file already in the folder kept, only rank 0 speaks."""
    args = [*FAST, "--prompts-file", prompts_file(tmp_path), "--batch-size", 2]
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    for folder in (single, parallel):
        folder.mkdir()
        (folder / "tiny_random_a-blue-ball_24.png").write_bytes(b"not mine")
    assert run(*args, "--out", single) == 0
    expected = files(single)
    assert len(expected) == 7 and "tiny_random_a-red-cube_23-2.png" in expected and "tiny_random_a-blue-ball_24-2.png" in expected

    ranks = launch(cli_rank(*args, "--out", parallel), tmp_path)
    assert [r.code for r in ranks] == [0, 0], ranks
    assert files(parallel) == expected
    summary = ranks[0].out.strip()
    assert summary.startswith("wrote ") and "on 2 ranks" in summary and summary.count(".png") == 6
    assert ranks[1].out == "" and ranks[1].err == ""  # no summary, no progress bar, no warnings from rank 1


def test_two_jobs_into_one_folder_never_write_the_same_name(tmp_path):
    """Two 2-rank jobs at once, same prompts, same folder: every image lands under its own name (name, name-2, ...)."""
    out, args = tmp_path / "out", [*FAST, "--steps", 1, "--prompt", "a red cube", "--prompt", "a blue ball"]
    jobs = [cli_rank(*args, "--out", out, "--seed", 5) for _ in range(2)]

    def two_jobs(rank):  # ranks 0, 1 form job A, ranks 2, 3 job B: each job has its own torchrun environment
        job, job_rank = divmod(rank, 2)
        os.environ.update(RANK=str(job_rank), WORLD_SIZE="2", LOCAL_RANK=str(job_rank), MASTER_PORT=str(ports[job]))
        return jobs[job](job_rank)

    ports = [free_port(), free_port()]
    ranks = launch(two_jobs, tmp_path, world_size=4)
    assert [r.code for r in ranks] == [0, 0, 0, 0], ranks
    names = sorted(files(out))
    assert names == ["tiny_random_a-blue-ball_5-2.png", "tiny_random_a-blue-ball_5.png", "tiny_random_a-red-cube_5-2.png", "tiny_random_a-red-cube_5.png"]
    for name in names:
        assert pixels(out / name).std() > 0
    np.testing.assert_array_equal(pixels(out / names[0]), pixels(out / names[1]))  # the same image, twice


# -- CFG-parallel -------------------------------------------------------------------------------------------------


def test_cfg_parallel_equals_one_process_running_the_split_passes(tmp_path):
    """--cfg-parallel on a pair writes the files of one process with --cfg-parallel (the two passes one after the
    other), byte for byte; --from-png of one of them on one process reproduces it; and the default batched single
    run is within one level of 255 (batch 2 vs 1 rounds the GEMMs differently)."""
    args = [*FAST, "--prompts-file", prompts_file(tmp_path), "--cfg-parallel"]
    assert run(*args, "--out", tmp_path / "split") == 0
    ranks = launch(cli_rank(*args, "--out", tmp_path / "pair"), tmp_path)
    assert [r.code for r in ranks] == [0, 0], ranks
    expected = files(tmp_path / "split")
    assert sorted(expected) == ["tiny_random_a-blue-ball_23.png", "tiny_random_a-red-cube_23-2.png", "tiny_random_a-red-cube_23.png"]
    assert files(tmp_path / "pair") == expected

    image = tmp_path / "pair" / "tiny_random_a-blue-ball_23.png"
    assert run("--from-png", image, "--out", tmp_path / "again") == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again" / image.name), pixels(image))
    assert run(*args[:-1], "--out", tmp_path / "batched") == 0
    batched = pixels(tmp_path / "batched" / image.name)
    assert np.abs(batched - pixels(image)).max() <= 1


def test_cfg_parallel_with_skip_layer_guidance_from_python(tmp_path):
    """The Python API (distributed.init / generate) with SLG on every step: the pair's images equal one process's
    split passes; both ranks of the pair get them; the skip-layer pass runs on the odd rank only."""
    prompts, slg = ["a red cube", "a blue ball"], SLGConfig(scale=2.5, start=0.0, end=1.0, layers=(1,))
    settings = dict(steps=3, width=64, height=48, slg=slg, seed=3, negative_prompt="blurry")

    def pair(rank):
        from fastsd35.pipeline.runner import Pipeline

        ranks = distributed.init("cpu", cfg_parallel=True, timeout=TIMEOUT_S)
        pipe = Pipeline.from_preset("tiny_random", device=ranks.device)
        forward, skipping = pipe.transformer.forward, []

        def spy(*args, skip_layers=(), **kw):
            skipping.append(bool(skip_layers))
            return forward(*args, skip_layers=skip_layers, **kw)

        pipe.transformer.forward = spy
        for j, gen in distributed.generate(pipe, ranks, prompts, **settings):
            np.save(tmp_path / f"pair{rank}_{j}.npy", np.asarray(gen.images[0]))
        print(sum(skipping), len(skipping))
        distributed.close()
        return 0

    ranks = launch(pair, tmp_path)
    assert [r.code for r in ranks] == [0, 0], ranks
    # 2 images x 3 steps; SLG is active on steps 1 and 2 (start * steps < step < end * steps)
    assert ranks[0].out.split() == ["0", "6"] and ranks[1].out.split() == ["4", "10"]
    from fastsd35.pipeline.runner import Pipeline

    pipe = Pipeline.from_preset("tiny_random", device="cpu")
    for j, prompt in enumerate(prompts):
        split = pipe.generate(prompt, denoiser_cls=partial(CFGDenoiser, split=True), progress=False, **settings)
        for rank in (0, 1):
            np.testing.assert_array_equal(np.load(tmp_path / f"pair{rank}_{j}.npy"), np.asarray(split.images[0]))


def test_a_cfg_parallel_pair_decides_the_step_cache_as_one_process(tmp_path):
    """Both ranks of a pair sum the same per-pass distances in the same order: their decisions agree with each other
    and with one process running the two passes, and so do the images (bit for bit)."""
    from fastsd35.pipeline.caching import CacheConfig

    settings = dict(steps=8, width=64, height=48, seed=3, cache=CacheConfig(threshold=0.6, warmup=1, max_skip=2))

    def pair(rank):
        from fastsd35.pipeline.runner import Pipeline

        ranks = distributed.init("cpu", cfg_parallel=True, timeout=TIMEOUT_S)
        pipe = Pipeline.from_preset("tiny_random", device=ranks.device)
        for j, gen in distributed.generate(pipe, ranks, ["a red cube"], **settings):
            np.save(tmp_path / f"cache{rank}.npy", np.asarray(gen.images[0]))
            print(gen.cache["schedule"])
        distributed.close()
        return 0

    ranks = launch(pair, tmp_path)
    assert [r.code for r in ranks] == [0, 0], ranks
    from fastsd35.pipeline.runner import Pipeline

    one = Pipeline.from_preset("tiny_random", device="cpu").generate(
        "a red cube", denoiser_cls=partial(CFGDenoiser, split=True), progress=False, **settings)
    assert ranks[0].out.split() == ranks[1].out.split() == [one.cache["schedule"]]
    assert "R" in one.cache["schedule"] and "C" in one.cache["schedule"][1:-1], one.cache  # a real mix of decisions
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"cache{rank}.npy"), np.asarray(one.images[0]))


# -- failures -----------------------------------------------------------------------------------------------------


def test_bad_input_exits_2_on_every_rank_with_one_line_from_rank_0(tmp_path):
    out = tmp_path / "out"
    ranks = launch(cli_rank(*FAST, "--prompt", "a cube", "--cfg-parallel", "--cfg", 1, "--out", out), tmp_path)
    assert [r.code for r in ranks] == [2, 2], ranks
    assert ranks[0].err.startswith("fastsd35: error: --cfg-parallel") and ranks[0].err.count("\n") == 1, ranks[0].err
    assert "cfg 1 <= 1" in ranks[0].err
    assert ranks[1].err == "" and ranks[0].out == ranks[1].out == ""
    assert not out.exists()

    # Ranks that disagree (a file missing on one node only) agree to stop: rank 0 names the rank and its problem.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cube\n")

    def rank_1_lacks_the_file(rank):
        return run(*FAST, "--prompts-file", prompts if rank == 0 else tmp_path / "missing.txt", "--out", out)

    ranks = launch(rank_1_lacks_the_file, tmp_path)
    assert [r.code for r in ranks] == [2, 2], ranks
    assert ranks[0].err.startswith("fastsd35: error: rank 1: cannot read prompts file") and ranks[0].err.count("\n") == 1
    assert ranks[1].err == ""
    assert not out.exists()

    # ... and so do ranks whose inputs differ (the same file name, another picture): they would plan other images.
    for rank, colour in enumerate(("red", "blue")):
        (tmp_path / f"rank{rank}").mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"rank{rank}" / "init.png")

    def rank_1_differs(rank):
        return run(*FAST, "--prompts-file", prompts, "--init-image", tmp_path / f"rank{rank}" / "init.png", "--out", out)

    ranks = launch(rank_1_differs, tmp_path)
    assert [r.code for r in ranks] == [2, 2], ranks
    assert ranks[0].err.startswith("fastsd35: error: rank 1 planned other images than rank 0"), ranks[0].err
    assert ranks[0].err.count("\n") == 1 and ranks[1].err == ""
    assert not out.exists()


@pytest.mark.parametrize("world_size, rank", [(3, 0), (3, 2)])
def test_cfg_parallel_needs_an_even_number_of_ranks(tmp_path, monkeypatch, capsys, world_size, rank):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    assert run(*FAST, "--prompt", "a cube", "--cfg-parallel", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err == ("fastsd35: error: --cfg-parallel pairs the ranks: run an even number of processes, not 3\n" if rank == 0 else "")


@pytest.mark.parametrize("option, value, message", [
    ("--dist-timeout", "0", "--dist-timeout must be a finite number in (0, 604800], got 0.0"),
    ("--dist-timeout", "nan", "--dist-timeout must be"), ("--dist-timeout", "inf", "--dist-timeout must be"),
    ("--dist-timeout", "-5", "--dist-timeout must be"), ("--dist-timeout", "1e300", "--dist-timeout must be"),
    ("--device", "mps", "torchrun jobs run on cuda (NCCL) or cpu (gloo)"), ("--device", "nonsense", "unknown device"),
])
def test_rank_options_are_checked_before_joining(tmp_path, monkeypatch, capsys, option, value, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert run(*FAST, "--prompt", "a cube", option, value, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsd35: error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.delenv("RANK")
    with pytest.raises(FastSD35Error, match="RANK and WORLD_SIZE"):
        distributed.init("cpu")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "x"}, "the environment's WORLD_SIZE is 'x': torchrun sets it to a whole number from 1 to"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE is '0'"), ({"WORLD_SIZE": "-2"}, "WORLD_SIZE is '-2'"),
    ({"WORLD_SIZE": "1" + "0" * 40}, "WORLD_SIZE is '1000"), ({"WORLD_SIZE": "2.5"}, "WORLD_SIZE is '2.5'"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "the environment's RANK is 'x': torchrun sets it to a whole number from 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK is '2'"), ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK is '-1'"),
    ({"WORLD_SIZE": "2"}, "not started by torchrun: RANK and WORLD_SIZE are not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK is 'x'"),
])  # fmt: skip
def test_a_broken_torchrun_environment_is_one_line(tmp_path, monkeypatch, capsys, env, message):
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run(*FAST, "--prompt", "a cube", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsd35: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_dist_timeout_is_checked_in_one_process_too(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run(*FAST, "--prompt", "a cube", "--dist-timeout", "nan", "--out", tmp_path / "out") == 2
    assert "--dist-timeout must be a finite number in (0, 604800], got nan" in capsys.readouterr().err


def test_a_prompt_too_long_for_t5_is_refused_before_any_image(tmp_path):
    """torchrun checks what one process checks before the first image: with the third prompt too long for
    --t5-tokens 77, no rank writes anything and every rank exits 2 (rank 0 says why)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n" + "word " * 120 + "\n")
    out = tmp_path / "out"
    ranks = launch(cli_rank(*FAST, "--prompts-file", prompts, "--t5-tokens", 77, "--out", out), tmp_path)
    assert [r.code for r in ranks] == [2, 2], ranks
    assert ranks[0].err.count("\n") == 1 and "T5 tokens" in ranks[0].err and "--t5-tokens" in ranks[0].err, ranks[0].err
    assert ranks[1].err == "" and not out.exists()
    assert run(*FAST, "--prompts-file", prompts, "--t5-tokens", 77, "--out", out) == 2  # one process: the same
    assert not out.exists()


@pytest.mark.parametrize("how", ["raises", "dies"])
@pytest.mark.parametrize("mode", ["data", "cfg"])
def test_a_rank_failing_mid_run_ends_the_job_without_partial_files(tmp_path, how, mode):
    """Rank 1 fails inside its second generation (data parallel: after round 0 was written; CFG-parallel: inside the
    sampling loop, while rank 0 waits for its pass): every rank exits non-zero well within the timeout, and the folder
    holds only whole PNGs."""
    out = tmp_path / "out"
    args = [*FAST, "--prompt", "one", "--prompt", "two", "--prompt", "three", "--prompt", "four", "--out", out]
    args += ["--cfg-parallel"] if mode == "cfg" else []

    def failing(rank):
        from fastsd35.pipeline.runner import TransformerPass

        calls, passes_per_unit = [0], 2  # 2 steps, one pass a step on each rank (batched in data parallel)

        def call(self, *a, **kw):
            calls[0] += 1
            if rank == 1 and calls[0] == passes_per_unit + 1:  # first step of rank 1's second generation
                (tmp_path / "failed_at").write_text(str(time.monotonic()))
                if how == "dies":
                    os._exit(9)
                raise FastSD35Error("out of GPU memory while sampling: lower --batch-size or --width/--height")
            return original(self, *a, **kw)

        original, TransformerPass.__call__ = TransformerPass.__call__, call
        code = run(*args, "--dist-timeout", TIMEOUT_S)
        (tmp_path / f"ended_{rank}").write_text(str(time.monotonic()))
        return code

    ranks = launch(failing, tmp_path)
    failed_at = float((tmp_path / "failed_at").read_text())
    assert float((tmp_path / "ended_0").read_text()) - failed_at < 10  # found at once, not at the timeout
    assert ranks[0].code == 1 and ranks[1].code == (9 if how == "dies" else 2), ranks
    assert "lost contact with the other ranks" in ranks[0].err, ranks[0].err
    if how == "raises":
        assert ranks[1].err == "fastsd35: error: rank 1: out of GPU memory while sampling: lower --batch-size or --width/--height\n"
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written == (["tiny_random_one_23.png", "tiny_random_two_23.png"] if mode == "data" else ["tiny_random_one_23.png"])
    for name in written:
        assert pixels(out / name).std() > 0


# -- torchrun itself ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_data_parallel(tmp_path):
    """The command a user types, through torchrun (`python -m torch.distributed.run`): the single-process files."""
    args = [*FAST, "--prompts-file", str(prompts_file(tmp_path))]
    assert run(*args, "--out", tmp_path / "single") == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}  # torchrun's default
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "fastsd35", "run", *map(str, args), "--out", str(tmp_path / "parallel"), "--dist-timeout", str(TIMEOUT_S)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(tmp_path / "parallel") == files(tmp_path / "single")
    assert done.stdout.count("wrote ") == 1
