"""Benchmarks: each kernel, the transformer step, a whole generation and many GPUs, timed the same way by the
pytest-benchmark suite (bench/) and by `fastsd35 bench`. What is measured lives in `fastsd35.benchmarks.cases` (many
GPUs: `fastsd35.benchmarks.multi_gpu`); this module times it, keeps the results and reports them.

Timing. A figure is the median of `rounds` samples. A round is `iterations` back-to-back calls between two readings of
`synchronized_timer` (torch.cuda.synchronize(), when CUDA is in use, then time.perf_counter()); a sample is the round's
time divided by `iterations` (and by the `calls` one call makes, below). The first call is timed on its own and
reported as `first_ms`: the cold cost (Triton's compilation and autotuning, CUDA graph capture, torch.compile, the
allocator's first requests) beside the steady state; building the contender is timed apart (`extra.build_ms`: the
model's allocation, or for a kernel on CUDA its compilation, autotuning and graph capture). Then (kernels) two timed
calls whose faster one sizes `iterations` so that a round lasts at least the schedule's `min_round_s` (the
synchronisation, some microseconds, is then noise), then `warmup_rounds`. pytest-benchmark runs exactly this loop:
`benchmark.pedantic(fn, rounds=, warmup_rounds=, iterations=)` with its timer set to `synchronized_timer` through
`@pytest.mark.benchmark(timer=...)`; `fastsd35 bench` runs the same loop in `time_rounds`. (CUDA events inside the
benchmarked function would leave pytest-benchmark timing the measuring loop instead of the call.)

Kernels on CUDA are timed from a CUDA graph that runs the op once on each of several copies of its inputs, 4x the L2
of an H100/H200 in all (`benchmark_cases.ROTATE_BYTES`): one graph replay is `calls` kernel calls, none of which finds
its inputs in L2, and no Python runs between them. The launchers' Python work (checks, allocation: tens of
microseconds, as much as the GPU work at these sizes) is what eager mode pays on top; it is reported apart as
`eager_ms` (the same calls made from Python) and `launch_overhead_us` (eager minus graph, per call). pytest-benchmark's
own statistics for kernels are per replay, i.e. per `calls` calls; the results file and the table are per call.

Every contender's first outputs are checked (`OutputCheck`): all finite, and in agreement with the first contender
of the case (a baseline) within a tolerance for their dtype, or the contender's own where its precision has an error
model (FP8: `fastsd35.benchmarks.precision`). A failed check is recorded as the result's `error`, fails its
pytest-benchmark test, and makes `fastsd35 bench` exit 1: a figure for a different computation is no figure.

Each contender is built on entry and freed on exit, one at a time; its peak memory is
`torch.cuda.max_memory_allocated()` over its calls (weights included), after `reset_peak_memory_stats()` (many GPUs:
the largest of its worker processes'). A contender that breaks while running (`Failed`: a worker process raised or
died) is recorded as an error too.

Every figure is compared with the baselines measured in the same run: `ratios[b]` = median of baseline b / median of
the contender (above 1: faster than b). Results go to `<out>/<device-slug>.json` with the device name, versions,
shapes, medians and ratios, rewritten after every contender (a run stopped by a time limit keeps what it measured);
cases and contenders a run did not measure are kept from the file already there (same device and versions), each
result with the date of the run that measured it and its ratios from that run, so the parts, cases and contenders
can be run one command at a time (`--only`, `--cases`, `--contenders`).
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from .. import kernels
from ..errors import FastSD35Error
from ..files import check_writable
from ..version import __version__
from .cases import (DEFAULT_PARTS, MODELS, NOT_INTERPRETED, PARTS, Case, Contender, Failed, Skip,
                    build_cases)

GIB = 1 << 30
MAX_ITERATIONS = 1000


@dataclass(frozen=True)
class Schedule:
    rounds: int
    warmup_rounds: int = 0
    min_round_s: float = 0.0  # iterations per round are chosen so that a round lasts at least this long


SCHEDULES = {  # part -> (full, quick)
    "kernels": (Schedule(25, 3, 0.005), Schedule(8, 1, 0.002)),
    "transformer": (Schedule(10, 1), Schedule(3)),
    "e2e": (Schedule(3), Schedule(1)),
    "cache": (Schedule(3), Schedule(1)),
    "multigpu": (Schedule(3), Schedule(1)),
    "serve": (Schedule(3), Schedule(1)),
}


def schedule(part: str, quick: bool = False) -> Schedule:
    return SCHEDULES[part][quick]


# -- environment ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    device: torch.device
    name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC (2 threads)"
    backend: str  # fastsd35.kernels.backend(device): what FastMMDiTX runs here

    @property
    def slug(self) -> str:
        """The results file's name: the device name in lower case, runs of other characters as '-'."""
        name = self.name.split(" (")[0]
        return re.sub(r"[^a-z0-9]+", "-", (name if self.device.type == "cuda" else f"cpu {name}").lower()).strip("-")


def detect_environment(device=None) -> Environment:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{_cpu_name()} ({threads} thread{'s' if threads > 1 else ''})"
    return Environment(device, name, kernels.backend(device))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def versions() -> dict:
    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:  # as the diffusers contenders see it: importable or not
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "fastsd35": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": installed("triton"), "transformers": installed("transformers"),
        "diffusers": diffusers_version,
    }  # fmt: skip


# -- timing -----------------------------------------------------------------------------------------------------


def synchronized_timer() -> float:
    """time.perf_counter() once the GPU has finished everything queued (pytest-benchmark's timer in bench/)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_rounds(fn: Callable[[], object], *, rounds: int, warmup_rounds: int, iterations: int) -> list[float]:
    """Seconds per call of each round: pytest-benchmark's pedantic loop, for the command line."""
    samples = []
    for i in range(warmup_rounds + rounds):
        start = synchronized_timer()
        for _ in range(iterations):
            fn()
        elapsed = synchronized_timer() - start
        if i >= warmup_rounds:
            samples.append(elapsed / iterations)
    return samples


def plan_iterations(fn: Callable[[], object], min_round_s: float, estimates: int = 2) -> int:
    """Call `fn` once untimed; with a `min_round_s`, time it `estimates` more times and return the calls per round
    that make a round last that long (from the fastest call: one late thread wake-up must not shrink the rounds)."""
    fn()
    if not min_round_s:
        return 1
    once = math.inf
    for _ in range(estimates):
        start = synchronized_timer()
        fn()
        once = min(once, synchronized_timer() - start)
    return max(1, min(MAX_ITERATIONS, math.ceil(min_round_s / max(once, 1e-9))))


# -- checking ---------------------------------------------------------------------------------------------------

# Largest relative error ||a - b|| / ||b|| between contenders' outputs, by the outputs' dtype: bf16 keeps 8 bits of
# mantissa (and a 38-block model adds up its rounding), fp16 11, fp32 24 (but SDPA and matmul orders still differ).
# uint8 are images from the same pipeline: they may differ by a level here and there.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-3, torch.uint8: 2e-2}


class Mismatch(Exception):
    """A contender's outputs are not finite, or differ from the case's reference outputs."""


class OutputCheck:
    """The reference outputs of one case (the first contender's) and the check of every contender against them."""

    def __init__(self):
        self.name, self.outputs = None, None

    def __call__(self, contender: str, outputs: list[torch.Tensor], tolerance: float | None = None) -> float | None:
        """Check `contender`'s outputs (the first call's are the reference). `tolerance`: the largest relative error
        its precision allows (an error model), instead of the dtypes' TOLERANCE. Returns the largest relative error
        found (None for the reference itself); raises Mismatch."""
        if not outputs:
            raise Mismatch(f"{contender} produced no tensor to check")
        for i, t in enumerate(outputs):
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).sum().item()
                raise Mismatch(f"{contender}: output {i} has {bad} non-finite values of {t.numel()}")
        if self.outputs is None:
            self.name, self.outputs = contender, [t.detach().clone() for t in outputs]
            return None
        if len(outputs) != len(self.outputs):
            raise Mismatch(f"{contender} gives {len(outputs)} outputs, {self.name} {len(self.outputs)}")
        largest = 0.0
        for i, (got, ref) in enumerate(zip(outputs, self.outputs)):
            if got.shape != ref.shape:
                raise Mismatch(f"{contender}: output {i} has shape {tuple(got.shape)}, {self.name} {tuple(ref.shape)}")
            tol = tolerance if tolerance is not None else max(TOLERANCE.get(got.dtype, 5e-2), TOLERANCE.get(ref.dtype, 5e-2))
            ref32, got32 = ref.to(got.device, torch.float32), got.float()
            error = ((got32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
            if not error <= tol:
                raise Mismatch(f"{contender} disagrees with {self.name}: output {i} relative error {error:.3g} > {tol:.3g}")
            largest = max(largest, error)
        return largest


# -- running ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    baseline: bool
    median_s: float | None = None
    min_s: float | None = None
    rounds: int = 0
    iterations: int = 0
    peak_bytes: int | None = None
    skipped: str | None = None
    error: str | None = None  # its outputs were not finite or disagreed with the reference, or it Failed
    first_s: float | None = None  # the first call: compilation, autotuning, capture
    extra: dict = field(default_factory=dict)


Timer = Callable[..., "list[float] | None"]  # (fn, *, rounds, warmup_rounds, iterations) -> seconds per call per round


def run_contender(case: Case, contender: Contender, inputs, *, device, quick=False, timer: Timer = time_rounds,
                  check: OutputCheck | None = None) -> Result:
    """Build the contender on the case's inputs, time its first call, check its outputs with `check` (one per case,
    shared by its contenders), time it with `timer`, free it. A `Skip` (or running out of GPU memory) gives a skipped
    result with its reason; outputs that fail the check give a result with its `error` and no timing."""
    device = torch.device(device)
    sched = schedule(case.part, quick)
    result = Result(contender.name, contender.baseline)
    check = check or OutputCheck()
    try:
        start = synchronized_timer()
        with contender.build(inputs) as prepared:
            result.extra["build_ms"] = 1e3 * (synchronized_timer() - start)  # kernels on CUDA: compile, tune, capture
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = synchronized_timer()
            first = prepared.fn()
            result.first_s = synchronized_timer() - start
            error = check(contender.name, prepared.outputs(first), prepared.tolerance)
            if error is not None:  # against the case's reference outputs: how far this contender's precision took it
                result.extra["rel_error"] = error
            del first
            iterations = plan_iterations(prepared.fn, sched.min_round_s)
            samples = timer(prepared.fn, rounds=sched.rounds, warmup_rounds=sched.warmup_rounds, iterations=iterations)
            if prepared.peak_bytes is not None:
                result.peak_bytes = prepared.peak_bytes()
            elif device.type == "cuda":
                result.peak_bytes = torch.cuda.max_memory_allocated(device)
            result.extra.update(prepared.extra)
            if samples is None:
                result.skipped = "timing disabled (--benchmark-disable)"
            else:
                per_call = [t / prepared.calls for t in samples]
                result.median_s, result.min_s = statistics.median(per_call), min(per_call)
                result.rounds, result.iterations = len(samples), iterations
                if prepared.eager is not None:
                    eager = time_rounds(prepared.eager, rounds=sched.rounds, warmup_rounds=1, iterations=1)
                    eager_ms = result.extra["eager_ms"] = 1e3 * statistics.median(eager) / prepared.calls
                    result.extra["launch_overhead_us"] = max(0.0, 1e3 * eager_ms - 1e6 * result.median_s)
            if prepared.stages and samples:
                timed = prepared.stages[-len(samples) * iterations :]
                result.extra["stages_ms"] = {k: 1e3 * statistics.median(t[k] for t in timed) for k in timed[0]}
    except Skip as e:
        result.skipped = str(e)
    except Mismatch as e:  # its outputs: the message says which check
        result.error = str(e)
    except Failed as e:  # its run: a worker raised or died
        result.error = f"stopped while running: {e}"
    except torch.cuda.OutOfMemoryError:
        result.skipped = "out of GPU memory"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


class Results:
    """The measurements of one run, by case, and their record (the JSON written to bench/results/)."""

    def __init__(self, env: Environment, *, quick: bool = False, runner: str = "fastsd35 bench"):
        self.env, self.quick, self.runner = env, quick, runner
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.versions = versions()
        self.cases: dict[str, tuple[Case, list[Result]]] = {}

    def add(self, case: Case, result: Result):
        self.cases.setdefault(f"{case.part}/{case.id}", (case, []))[1].append(result)

    def timed(self) -> bool:
        return any(r.median_s or r.error for _, results in self.cases.values() for r in results)

    def errors(self) -> list[str]:
        """Every failed output check of the run, as "part/case contender: why"."""
        return [f"{key}: {r.error}" for key, (_, results) in self.cases.items() for r in results if r.error]

    def latest(self, case: Case) -> dict:
        """The record of the case's last result, with its ratios to the baselines measured so far."""
        return self.case_record(case, self.cases[f"{case.part}/{case.id}"][1])["results"][-1]

    def record(self) -> dict:
        return {
            "device": self.env.name,
            "device_slug": self.env.slug,
            "device_type": self.env.device.type,
            "backend": self.env.backend,
            "timed_ops": "Triton kernels" if self.env.backend == "triton" else f"reference ops ({NOT_INTERPRETED})",
            "shapes": "released models at 1024x1024, bf16" if self.env.device.type == "cuda"
                      else "reduced on the CPU: depth-3 models, latent 32x32, fp32; end to end: tiny preset",
            "date": self.date,
            "versions": self.versions,
            "ratio": "median of the baseline / median of the contender (above 1: faster than that baseline)",
            "cases": sorted((self.case_record(case, results) for case, results in self.cases.values()),
                            key=lambda c: PARTS.index(c["part"])),
        }  # fmt: skip

    def case_record(self, case: Case, results: list[Result]) -> dict:
        baselines = {r.contender: r.median_s for r in results if r.baseline and r.median_s}
        return {
            "part": case.part, "id": case.id, "name": case.name, "model": case.model, "shape": case.shape,
            "flops": case.flops, "bytes": case.bytes, **({"rate_stage": case.rate_stage} if case.rate_stage else {}),
            "date": self.date, "quick": self.quick, "runner": self.runner,
            "contenders": [c.name for c in case.contenders],
            "baselines": [c.name for c in case.contenders if c.baseline],
            "results": [result_record(case, r, baselines) | {"date": self.date} for r in results],
        }  # fmt: skip

    def path(self, out_dir) -> Path:
        return Path(out_dir) / f"{self.env.slug}.json"

    def write(self, out_dir) -> Path:
        """Write `<out_dir>/<device-slug>.json` (whole or not at all: a new file renamed over the old one). What this
        run did not measure is kept from the file already there when it records the same device and versions: other
        cases whole, and in a case this run measured, the results of the contenders it did not run (so parts, cases
        and contenders can be run one command at a time). Each result carries the date of the run that measured it,
        and its ratios always come from that one run."""
        out = Path(out_dir)
        path = self.path(out)
        record = self.record()
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and old.get("device") == record["device"] and old.get("versions") == record["versions"]:
            record["cases"] = _merged(old.get("cases"), record["cases"])
        temporary = out / f".{path.name}.{os.getpid()}.tmp"
        try:
            out.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as e:
            temporary.unlink(missing_ok=True)
            raise FastSD35Error(f"cannot write the results to {path}: {e.strerror or e}") from None
        return path


def _merged(old_cases, new_cases: list[dict]) -> list[dict]:
    """The cases of an earlier results file with this run's laid over them, contender by contender (`Results.write`)."""
    if not isinstance(old_cases, list):
        return new_cases
    new = {(c["part"], c["id"]): c for c in new_cases}
    merged = []
    for c in old_cases:
        if not isinstance(c, dict) or c.get("part") not in PARTS:
            continue
        fresh = new.pop((c.get("part"), c.get("id")), None)
        if fresh is None:
            merged.append(c)
            continue
        measured = {r["contender"] for r in fresh["results"]}
        kept = [r | {"date": r.get("date", c.get("date"))} for r in c.get("results", [])
                if isinstance(r, dict) and r.get("contender") not in measured]  # fmt: skip
        order = fresh["contenders"]
        rank = lambda r: order.index(r["contender"]) if r.get("contender") in order else len(order)  # noqa: E731
        fresh["results"] = sorted(kept + fresh["results"], key=rank)  # stable: the case's contender order
        merged.append(fresh)
    return sorted(merged + list(new.values()), key=lambda c: PARTS.index(c["part"]))


def result_record(case: Case, r: Result, baselines: dict[str, float]) -> dict:
    out = {"contender": r.contender, "baseline": r.baseline}
    if r.error:
        return out | {"error": r.error}
    if r.median_s is None:
        return out | {"skipped": r.skipped}
    out |= {"median_ms": 1e3 * r.median_s, "min_ms": 1e3 * r.min_s, "rounds": r.rounds, "iterations": r.iterations}
    if r.first_s is not None:
        out["first_ms"] = 1e3 * r.first_s
    seconds = r.median_s
    if case.rate_stage:
        seconds = r.extra.get("stages_ms", {}).get(case.rate_stage, 0) / 1e3 or None
    if case.images:
        out["images_per_s"] = case.images / r.median_s
    if case.flops and seconds:
        out["tflop_s"] = case.flops / seconds / 1e12
    elif case.bytes and seconds:
        out["gb_s"] = case.bytes / seconds / 1e9
    out["peak_mem_gib"] = None if r.peak_bytes is None else r.peak_bytes / GIB
    out["ratios"] = {b: m / r.median_s for b, m in baselines.items() if b != r.contender}
    return out | ({"extra": r.extra} if r.extra else {})


def select(cases: list[Case], names=None, contenders=None) -> list[tuple[Case, list[Contender]]]:
    """The cases to run, each with the contenders to run on it: the cases whose id or name is in `names` (all when
    None), the contenders named in `contenders` (all when None); a case left with none is dropped."""
    chosen = []
    for case in cases:
        if names is not None and case.id not in names and case.name not in names:
            continue
        run = [c for c in case.contenders if contenders is None or c.name in contenders]
        if run:
            chosen.append((case, run))
    return chosen


def check_out(out, env: Environment) -> Path:
    """Before anything is measured: the results can be written in `out` (the folder, or what it would be made in,
    and the results file when it is there). Returns the results file's path."""
    check_writable(out, "--out", folder=True)
    path = Path(out) / f"{env.slug}.json"
    if os.path.lexists(path):
        check_writable(path, "--out")
    return path


def run_suite(*, parts=DEFAULT_PARTS, models=tuple(MODELS), quick=False, out="bench/results", device=None, log=None,
              cases=None, contenders=None):
    """Run the chosen parts (and of them the `cases` and `contenders` named, see `select`) on this machine (CUDA when
    available), writing the JSON after every contender; returns (this run's record, the file's path)."""
    env = detect_environment(device)
    path = check_out(out, env)
    results = Results(env, quick=quick)
    try:
        for case, chosen in select(build_cases(env.device, parts, models), cases, contenders):
            with case.inputs() as inputs:
                check = OutputCheck()
                for contender in chosen:
                    result = run_contender(case, contender, inputs, device=env.device, quick=quick, check=check)
                    results.add(case, result)
                    results.write(out)  # the moment it is measured: a time limit then loses only what is running
                    if log:
                        log(f"{case.part} {case.id} {contender.name}: {outcome(result)}")
    except KeyboardInterrupt:  # e.g. a time limit (bench/gpu_check.sh): what was measured is written already
        if results.cases and log:
            log(f"interrupted: wrote what was measured to {path}")
        raise
    return results.record(), path


def outcome(result: Result) -> str:
    if result.error:
        return f"FAILED: {result.error}"
    if result.median_s:
        return f"{1e3 * result.median_s:.3f} ms (first call {1e3 * result.first_s:.1f} ms)"
    return f"skipped: {result.skipped}"


# -- reporting --------------------------------------------------------------------------------------------------


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_table(record: dict) -> str:
    """One line per contender: case, shape, median ms, TFLOP/s or GB/s, peak memory, ratios to the baselines (and the
    stage times of a generation)."""
    rows = [("case", "shape", "contender", "median ms", "rate", "peak GiB", "vs baselines")]
    for case in record["cases"]:
        title = f"{case['part']} {case['name']} [{case['model']}]"
        for r in case["results"]:
            if "median_ms" not in r:
                why = f"FAILED: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                rows.append((title, shape_text(case["shape"]), r["contender"], "-", "-", "-", why))
                continue
            rate = (f"{r['tflop_s']:.3g} TFLOP/s" if "tflop_s" in r else f"{r['gb_s']:.3g} GB/s" if "gb_s" in r
                    else f"{r['images_per_s']:.3g} images/s" if "images_per_s" in r else "-")  # fmt: skip
            peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
            ratios = ", ".join(f"{v:.2f}x {b}" for b, v in r["ratios"].items())
            vs = "baseline" + (f" ({ratios})" if ratios else "") if r["baseline"] else ratios or "-"
            if stages := r.get("extra", {}).get("stages_ms"):
                vs += "; " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + " ms"
            if "launch_overhead_us" in r.get("extra", {}):
                vs += f"; eager {r['extra']['eager_ms']:.3f} ms (launch +{r['extra']['launch_overhead_us']:.0f} us)"
            elif case["part"] != "kernels" and "first_ms" in r:
                vs += f"; first call {r['first_ms']:.0f} ms"
            rows.append((title, shape_text(case["shape"]), r["contender"], f"{r['median_ms']:.3f}", rate, peak, vs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]  # fmt: skip
    head = f"{record['device']} ({record['backend']} backend; {record['shapes']})"
    return "\n".join([head, lines[0], "-" * len(lines[0]), *lines[1:]])


# -- fastsd35 bench ---------------------------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run of every measurement")
    parser.add_argument("--only", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated parts: {', '.join(PARTS)} (default: all but serve)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated kernel and step shapes: large, medium (default: both; end to end is "
                             "always large_turbo)")
    parser.add_argument("--cases", help="comma-separated case ids or names of the chosen parts (e.g. large-step-B2, "
                                        "joint_attention; default: all)")
    parser.add_argument("--contenders", help="comma-separated contenders to run (e.g. torch,fastsd35+graphs; default: "
                                             "all; name the baseline too for ratios)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder of the results JSON, named after the device (default bench/results)")


def _choices(value: str, allowed, option: str) -> tuple[str, ...]:
    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise FastSD35Error(f"{option} {value!r}: choose from {', '.join(allowed)} (comma-separated)")
    return chosen


def bench_command(args) -> int:
    """`fastsd35 bench`: every argument, and that the results can be written, is checked before anything runs."""
    parts = _choices(args.only, PARTS, "--only")
    models = _choices(args.models, tuple(MODELS), "--models")
    env = detect_environment()
    built = build_cases(env.device, parts, models)
    names = list(dict.fromkeys(n for c in built for n in (c.id, c.name)))
    cases = None if args.cases is None else _choices(args.cases, names, "--cases")
    contenders = None if args.contenders is None else _choices(
        args.contenders, list(dict.fromkeys(c.name for case in built for c in case.contenders)), "--contenders")
    if not select(built, cases, contenders):
        raise FastSD35Error(f"--cases {args.cases} with --contenders {args.contenders}: no case has those contenders")
    check_out(args.out, env)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    record, path = run_suite(parts=parts, models=models, quick=args.quick, out=args.out, log=log, cases=cases,
                             contenders=contenders)  # fmt: skip
    print(format_table(record))
    print(f"wrote {path}")
    failed = [f"{c['part']}/{c['id']} {r['contender']}: {r['error']}" for c in record["cases"] for r in c["results"]
              if "error" in r]  # fmt: skip
    for line in failed:
        print(f"fastsd35: benchmark failed: {line}", file=sys.stderr)
    return 1 if failed else 0


__all__ = [
    "Environment", "Mismatch", "OutputCheck", "Result", "Results", "SCHEDULES", "Schedule", "bench_command",
    "detect_environment",
    "format_table", "plan_iterations", "run_contender", "run_suite", "synchronized_timer", "time_rounds",
]  # fmt: skip
