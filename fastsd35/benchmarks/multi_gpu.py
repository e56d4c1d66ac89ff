"""Many GPUs (`fastsd35 bench --only multigpu`): images/s of data parallel at 1, 2, 4, ... GPUs, and the latency of
one CFG-parallel pair against one GPU, with `fastsd35.pipeline.distributed` doing the work as under torchrun.

A contender is a pool of worker processes started when it is built (spawned: CUDA does not survive a fork), one per
GPU, joined by torch.distributed (`distributed.init`: NCCL on CUDA, gloo on CPUs) with torchrun's environment
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK). Each builds the end-to-end case's components (full-size random
weights on CUDA, the same seeds, hence the same weights, on every rank; the tiny preset on CPUs) and a `Pipeline`,
says it is ready, then waits for commands. A timed call sends "run" to every worker: each generates its share of the
plan with `distributed.generate` and rank 0 gathers the kept images (the writer ranks'), as the CLI's writer does.
The first call's images come back to the benchmark in plan order, so that `OutputCheck` compares the contenders
(the timed calls leave them on rank 0): data parallel must give the 1-GPU images, and CFG-parallel those of one GPU
running the two passes one after the other (`CFGDenoiser(split=True)`, the case's first contender: bit for bit on
CPUs); the default batched [cond, uncond] run differs in the last bits, within the check's tolerance.

Every wait is bounded and watches the workers: a worker that raises, dies or goes silent past the timeout makes the
contender `Failed` (its result's `error`), and the pool is torn down (stragglers terminated, then killed) whatever
happens. With fewer than 2 CUDA GPUs every contender is skipped with the reason, and no process is started.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..pipeline import distributed
from .cases import PROMPT, Case, Contender, Failed, Prepared, Skip, register

MIN_GPUS = 2
CFG_STEPS = 8  # the CFG-parallel case's steps on CUDA (the large preset's 40 would add minutes to the run)
CPU_SETTINGS = (("steps", 3), ("width", 96), ("height", 64))  # CPU workers (tests): the tiny preset, made smaller
TIMEOUT_S = {"cuda": 900.0, "cpu": 60.0}  # the longest wait for a worker (building, one run) and at a collective
POLL_S = 0.2  # how often a wait looks at the workers
GRACE_S = 2.0  # after a failure, how long to collect the other workers' reports (to name the first cause)
JOIN_S = 30.0  # how long a healthy pool gets to shut down before it is terminated


@dataclass(frozen=True)
class PoolSpec:
    """What a contender's workers do: one per rank, `prompts[j]` (one image, `seed`) on worker j mod W."""

    world_size: int
    cuda: bool
    preset: str
    prompts: tuple[str, ...]
    settings: tuple[tuple[str, object], ...] = ()  # Pipeline.generate keyword arguments (steps, width, height)
    cfg_parallel: bool = False  # ranks 2p, 2p+1 run the cond and uncond passes of one image
    split: bool = False  # (one process) the cond and uncond passes one after the other, not batched
    seed: int = 23
    timeout_s: float = TIMEOUT_S["cuda"]
    start_method: str = "spawn"  # "fork" only where CUDA is not in use (tests: spares each worker importing torch)
    fail_rank: int | None = None  # for tests: this rank raises when told to run


# -- the workers --------------------------------------------------------------------------------------------------


def _worker(spec: PoolSpec, rank: int, port: int, commands, replies):
    """One rank: join the job, build the pipeline, say "ready", then one share of the plan per "run" until None.
    Whatever stops it early is reported to the benchmark ("skip", "lost" contact, "error") before it exits 1."""
    parent = os.getppid()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(spec.world_size), LOCAL_WORLD_SIZE=str(spec.world_size))  # fmt: skip
    try:
        _serve(spec, rank, commands, replies, parent)
        return
    except Skip as e:
        replies.put(("skip", rank, str(e)))
    except torch.cuda.OutOfMemoryError:
        replies.put(("skip", rank, f"out of GPU memory on rank {rank}"))
    except distributed.LostContact as e:
        replies.put(("lost", rank, str(e)))
    except BaseException as e:  # noqa: BLE001  reported, and the traceback left on stderr
        traceback.print_exc()
        replies.put(("error", rank, f"{type(e).__name__}: {e}"))
    sys.exit(1)


def _serve(spec: PoolSpec, rank: int, commands, replies, parent: int):
    from ..models.mmditx import FastMMDiTX
    from ..pipeline.runner import Pipeline
    from ..pipeline.sampling import CFGDenoiser
    from .cases import _e2e_components, _need_triton

    if not spec.cuda:
        torch.set_num_threads(1)  # as torchrun sets on CPUs; and the same GEMM sums whatever the world size
    ranks = distributed.init("cuda" if spec.cuda else "cpu", cfg_parallel=spec.cfg_parallel, timeout=spec.timeout_s)
    dtype = torch.bfloat16 if spec.cuda else torch.float32
    try:
        with _e2e_components(ranks.device, dtype, spec.cuda) as parts:
            if isinstance(parts.transformer, FastMMDiTX):
                _need_triton(ranks.device)
            pipe = Pipeline(parts.transformer, parts.vae, parts.text, spec.preset, graphs=spec.cuda)
            kwargs = dict(spec.settings, seed=spec.seed, progress=False)
            replies.put(("ready", rank, parts.note))
            while (command := _next_command(commands, parent)) is not None:
                _, send = command
                if rank == spec.fail_rank:
                    raise RuntimeError(f"planted failure on rank {rank}")
                if spec.split:  # distributed.generate picks the denoiser itself: the batched one for one process
                    made = ((j, pipe.generate(p, denoiser_cls=partial(CFGDenoiser, split=True), **kwargs))
                            for j, p in enumerate(spec.prompts))  # fmt: skip
                else:
                    made = distributed.generate(pipe, ranks, spec.prompts, **kwargs)
                mine = [(j, np.stack([np.asarray(image) for image in gen.images])) for j, gen in made]
                peak = torch.cuda.max_memory_allocated(ranks.device) if spec.cuda else None
                gathered = [None] * ranks.world_size if rank == 0 else None
                distributed._collective("sending images to rank 0", dist.gather_object,
                                        (mine if ranks.writer else [], peak), gathered, dst=0, group=ranks.control)
                if rank == 0:  # the images reach rank 0 every time, as the CLI's writer gets them; the benchmark once
                    units = sorted((unit for images, _ in gathered for unit in images), key=lambda unit: unit[0])
                    images = np.concatenate([im for _, im in units]) if send else None
                    peak = max((p for _, p in gathered if p is not None), default=None)
                    replies.put(("images", 0, [j for j, _ in units], images, peak))
    finally:
        distributed.close()


def _next_command(commands, parent: int):
    """The benchmark's next command; None (stop) also when the benchmark process is gone (this one was reparented)."""
    while True:
        try:
            return commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


# -- the pool -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pool:
    """The benchmark's side of a contender's workers: start them, run the plan, stop them; every wait bounded."""

    def __init__(self, spec: PoolSpec):
        self.spec = spec
        ctx = mp.get_context(spec.start_method)
        self.replies = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(spec.world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(spec, r, port, self.commands[r], self.replies), daemon=True,
                                  name=f"fastsd35-bench-rank{r}") for r in range(spec.world_size)]  # fmt: skip
        self.broken = False

    def start(self) -> str:
        """Start the workers and wait until every one has built its pipeline; returns what rank 0 built."""
        for p in self.procs:
            p.start()
        return self._wait("ready", set(range(self.spec.world_size)), "building the pipeline")[0][0]

    def run(self, send: bool = True):
        """One pass over the plan: (the images in plan order, uint8 (N, H, W, 3), or None unless `send`; the workers'
        peak GPU bytes)."""
        for q in self.commands:
            q.put(("run", send))
        order, images, peak = self._wait("images", {0}, "generating")[0]
        if order != list(range(len(self.spec.prompts))):
            raise Failed(f"rank 0 returned images {order}, not one per prompt in order")
        return images, peak

    def _wait(self, kind: str, ranks: set[int], doing: str) -> dict[int, tuple]:
        deadline = time.monotonic() + self.spec.timeout_s
        got = {}
        while set(got) < ranks:
            try:
                what, rank, *payload = self.replies.get(timeout=POLL_S)
            except queue.Empty:
                if any(p.exitcode is not None for p in self.procs):  # died: killed, or its report is on its way
                    self._fail([])
                if time.monotonic() > deadline:
                    missing = sorted(ranks - set(got))
                    self._fail([], f"no answer from rank {', '.join(map(str, missing))} after {self.spec.timeout_s:g} "
                                   f"s {doing}")  # fmt: skip
                continue
            if what != kind:
                self._fail([(what, rank, *payload)])
            got[rank] = tuple(payload)
        return got

    def _fail(self, reports: list[tuple], timeout: str | None = None):
        """Raise what went wrong, after listening a moment for the other workers: a worker's own error (or Skip)
        comes before another's lost contact, which is only a consequence; then deaths without a report; then the
        timeout."""
        self.broken = True
        end = time.monotonic() + GRACE_S
        while time.monotonic() < end and not all(p.exitcode is not None for p in self.procs):
            try:
                reports.append(self.replies.get(timeout=POLL_S))
            except queue.Empty:
                pass
        while True:  # whatever is left in the pipe
            try:
                reports.append(self.replies.get_nowait())
            except (queue.Empty, OSError, ValueError):
                break
        said = {rank for _, rank, *_ in reports}
        by_kind = {kind: [(rank, msg) for what, rank, msg, *_ in reports if what == kind]
                   for kind in ("skip", "error", "lost")}
        if by_kind["skip"]:
            rank, why = by_kind["skip"][0]
            raise Skip(why)
        if by_kind["error"]:
            rank, why = by_kind["error"][0]
            raise Failed(f"rank {rank}: {why}")
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode is not None and r not in said]
        if dead:
            r, code = dead[0]
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise Failed(f"rank {r} stopped ({how}) without a report")
        if by_kind["lost"]:
            rank, why = by_kind["lost"][0]
            raise Failed(f"rank {rank}: {why}")
        raise Failed(timeout or f"unexpected report {reports[:1]}")

    def close(self):
        """Stop the workers: a None command and JOIN_S to leave when the pool is healthy; then, or at once when it
        is broken, terminate (SIGTERM) and finally kill what is left. Replies are drained meanwhile (a worker whose
        report is still in the pipe cannot exit)."""
        if not self.broken:
            for q in self.commands:
                q.put(None)
        end = time.monotonic() + (0.0 if self.broken else JOIN_S)
        while time.monotonic() < end and any(p.is_alive() for p in self.procs if p.pid is not None):
            try:
                self.replies.get(timeout=POLL_S)
            except queue.Empty:
                pass
        for stop in ("terminate", "kill"):
            for p in self.procs:
                if p.pid is not None and p.is_alive():
                    getattr(p, stop)()
            for p in self.procs:
                if p.pid is not None:
                    p.join(5.0)
        for q in (*self.commands, self.replies):
            q.cancel_join_thread()  # never block this process's exit on a pipe nobody reads
            q.close()


@contextmanager
def _pool_contender(spec: PoolSpec, inputs=None):
    pool = Pool(spec)
    try:
        note = pool.start()
        peaks = []

        def fn():  # the first call's images are checked; later calls leave them on rank 0 (no copy to this process)
            images, peak = pool.run(send=not peaks)
            peaks.append(peak)
            return None if images is None else torch.from_numpy(images)

        extra = {"processes": spec.world_size, "images": len(spec.prompts), "text_encoders": note}
        yield Prepared(fn, extra, peak_bytes=lambda: max(peaks, default=None) if spec.cuda else None)
    except BaseException:
        pool.broken = True
        raise
    finally:
        pool.close()


@contextmanager
def _skipped(reason: str, inputs=None):
    raise Skip(reason)
    yield  # a context manager that never enters


# -- the cases ----------------------------------------------------------------------------------------------------


def world_sizes(gpus: int) -> list[int]:
    """1, 2, 4, ... below `gpus`, then `gpus` itself."""
    sizes = [1]
    while sizes[-1] * 2 < gpus:
        sizes.append(sizes[-1] * 2)
    return sizes + [gpus] if gpus > 1 else sizes


@register("multigpu")
def _multi_gpu_part(device, models, dtype, full) -> list[Case]:
    return multi_gpu_cases(device)


def multi_gpu_cases(device, cpu_workers: int | None = None, start_method: str = "spawn") -> list[Case]:
    """Data parallel (2 x the GPU count images of the large_turbo preset, one prompt each, as images/s at 1, 2, 4,
    ... GPUs) and CFG-parallel (one image of the large preset, cfg 4.5, at CFG_STEPS steps: one GPU batched, one GPU
    with split passes, a pair). Full-size random weights on CUDA, with every visible GPU. `cpu_workers` (tests): that
    many CPU processes over gloo stand in for GPUs on the tiny preset (96x64, 3 steps), started by `start_method`."""
    from ..pipeline.presets import get_preset

    device = torch.device(device)
    if cpu_workers is not None and cpu_workers < MIN_GPUS:
        raise ValueError(f"cpu_workers: {MIN_GPUS} or more, got {cpu_workers}")
    gpus = cpu_workers or (torch.cuda.device_count() if device.type == "cuda" else 0)
    reason = None
    if gpus < MIN_GPUS:  # the cases as a GPU machine runs them, every contender skipped
        visible = torch.cuda.device_count()
        on_cpu = device.type != "cuda" and visible >= MIN_GPUS
        where = f"this run is on {device.type}" if on_cpu else f"this machine has {visible}"
        reason = f"needs {MIN_GPUS} or more CUDA GPUs; {where}"
    cuda = not cpu_workers
    units = ("GPU", "GPUs") if cuda else ("process", "processes")

    def name(n, what=""):
        return f"{n} {units[n > 1]}{what}"

    def contender(label, spec, baseline=False):
        build = partial(_skipped, reason) if reason else partial(_pool_contender, spec)
        return Contender(label, build, baseline)

    common = dict(cuda=cuda, timeout_s=TIMEOUT_S["cuda" if cuda else "cpu"],
                  start_method="spawn" if cuda else start_method)
    settings = () if cuda else CPU_SETTINGS
    model = "large" if cuda else "tiny"

    dp_preset = get_preset("large_turbo" if cuda else "tiny_random")
    sizes = world_sizes(max(gpus, MIN_GPUS))
    prompts = tuple(f"{PROMPT}, picture {i}" for i in range(2 * sizes[-1]))
    dp = PoolSpec(1, preset=dp_preset.name, prompts=prompts, settings=settings, **common)
    s = dp_preset.resolve(**dict(settings))
    dp_case = Case(
        "multigpu", "data_parallel", model,
        dict(images=len(prompts), preset=dp_preset.name, size=f"{s.width}x{s.height}", steps=s.steps, cfg=s.cfg),
        [contender(name(n), replace(dp, world_size=n), baseline=n == 1) for n in sizes], nullcontext,
        images=len(prompts),
    )  # fmt: skip

    cfg_preset = get_preset("large" if cuda else "tiny_random")
    cfg_settings = (("steps", CFG_STEPS),) if cuda else settings
    s = cfg_preset.resolve(**dict(cfg_settings))
    one = PoolSpec(1, preset=cfg_preset.name, prompts=(PROMPT,), settings=cfg_settings, **common)
    shape = dict(images=1, preset=cfg_preset.name, size=f"{s.width}x{s.height}", steps=s.steps, cfg=s.cfg)
    if cuda:
        shape["preset_steps"] = cfg_preset.resolve().steps  # the steps are cut to bound the time
    cfg_case = Case("multigpu", "cfg_parallel", model, shape, [  # the outputs are checked against the first one's:
        contender(name(1, ", split passes"), replace(one, split=True), baseline=True),  # what the pair computes
        contender(name(2, " cfg-parallel"), replace(one, world_size=2, cfg_parallel=True)),
        contender(name(1), one, baseline=True),  # batched [cond, uncond]: other roundings (within the tolerance)
    ], nullcontext, images=1)  # fmt: skip
    return [dp_case, cfg_case]


__all__ = ["Pool", "PoolSpec", "multi_gpu_cases", "world_sizes"]
