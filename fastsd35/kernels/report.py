"""`fastsd35 kernels`: compile every kernel variant the launchers can pick, ahead of time and without a GPU, and show
what each becomes on sm_80 / sm_90 (/ sm_100): registers, stack (spills), shared memory, which tensor-core
instructions (wgmma, mma.sync), async copies (cp.async) and TMA it uses.

What gets compiled is what the JIT would compile for the released SD3.5 sizes: the registered cases
(kernels/variants.py) call the real launchers with meta tensors, kernels/launch.py captures the launches, and each
launch's arguments are specialized by Triton's own binder for the target (16-byte aligned pointers and integers
divisible by 16 get the divisibility attribute, integers equal to 1 become constants). A stride that loses that
attribute would compile, and show up here, as the slower variant the GPU would really run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import FastSD35Error
from ..files import check_writable, is_file
from . import checks

ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
DEFAULT_ARCHS = "sm_80,sm_90"
# Largest shared memory one block may use (opt-in), per architecture: A100 163 KB, H100 227 KB, B200 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# The CUDA caching allocator hands out blocks aligned to 512 bytes; a view's pointer is that base plus its offset.
ALLOCATION_ALIGNMENT = 512
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Variant:
    """One compile: a kernel specialized for one architecture and one set of arguments and meta-parameters."""

    kernel: str
    arch: str
    dtype: str
    config: str
    shapes: list[str] = field(default_factory=list)  # the launches that produce this variant
    registers: int | None = None
    stack_bytes: int | None = None
    spill_stores: int | None = None
    shared_bytes: int | None = None
    shared_limit: int = 0
    wgmma: bool = False
    mma: bool = False
    cp_async: bool = False
    tma: bool = False
    ok: bool = False
    error: str = ""
    seconds: float = 0.0

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        found = []
        if self.stack_bytes or self.spill_stores:
            found.append(f"spills ({self.stack_bytes} stack bytes, {self.spill_stores} local stores)")
        if self.shared_bytes is not None and self.shared_bytes > self.shared_limit:
            found.append(f"{self.shared_bytes} bytes of shared memory > {self.shared_limit}")
        return found


# -- what the JIT would compile ------------------------------------------------------------------------------------


class _Pointer:
    """A tensor argument as the JIT's specializer sees it: a dtype and an address (no memory behind it)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = ALLOCATION_ALIGNMENT + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


@functools.cache
def _binder(jit_fn, arch: int):
    """Triton's backend for `arch` and the argument binder the JIT builds for `jit_fn` (one per kernel and arch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(jit_fn.signature, jit_fn.params, backend)


def specialize(jit_fn, arch: int, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) that Triton's JIT derives for `jit_fn[grid](*args, **kwargs)` on a GPU
    of compute capability `arch`: its own binder and argument packing, with a `_Pointer` per tensor."""
    backend, binder = _binder(jit_fn, arch)
    args = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def jit_function(kernel):
    """The JITFunction behind a launched kernel (itself, or the one an Autotuner wraps)."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def divisibility(jit_fn, arch: int, args: tuple, kwargs: dict) -> dict[str, bool | str]:
    """Per non-constexpr argument name: True when the JIT gives it the divisibility-by-16 attribute, False when not,
    "constant" when it specializes the value away (an integer equal to 1)."""
    signature, constexprs, attrs, _ = specialize(jit_fn, arch, args, kwargs)
    divisible = {path[0] for path, a in attrs.items() if ["tt.divisibility", 16] in a}
    result = {}
    for i, name in enumerate(jit_fn.arg_names):
        if signature[name] == "constexpr":
            if (i,) in constexprs and name not in kwargs:
                result[name] = "constant"
            continue
        result[name] = i in divisible
    return result


def _config_label(kwargs: dict, options) -> str:
    parts = [f"Dh={kwargs['HEAD_DIM']}"] if "HEAD_DIM" in kwargs else []
    parts += [f"{k}={v}" for k, v in sorted(kwargs.items())
              if k.isupper() and k not in ("HEAD_DIM", "DOT_PRECISION") and not hasattr(v, "data_ptr")]  # no tensors
    parts.append(f"w{options.num_warps}")
    parts.append(f"s{options.num_stages}")
    return " ".join(parts)


@dataclass
class _Job:
    variant: Variant
    jit_fn: object
    source: tuple  # (signature, constexprs, attrs)
    options: dict


def _shape_label(args: tuple) -> str:
    dims = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    return "x".join(map(str, dims[0])) if dims else ""


FP8_MIN_ARCH = 89  # Triton compiles float8_e4m3fn conversions for sm_89 and newer only


def plan(archs: list[int], dtypes=None, quick: bool = False) -> list[_Job]:
    """Every distinct variant the registered launches can compile to on `archs`, one job each. `quick`: only the
    first variant of each kernel, load style, architecture and dtype (a smoke test of the whole path)."""
    from . import fused_adaln_modulate, joint_attention, rmsnorm_qk  # noqa: F401  (they register their cases)
    from .launch import capture_launches, configs_for
    from .variants import DTYPES, REPORT_CASES

    jobs: dict[tuple, _Job] = {}
    quick_seen = set()
    for dtype in dtypes or DTYPES:
        with capture_launches() as launches:
            for case in REPORT_CASES.values():
                case(dtype)
        for launch in launches:
            jit_fn = jit_function(launch.kernel)
            autotuned = jit_fn is not launch.kernel
            named = dict(zip(jit_fn.arg_names, launch.args))
            for arch in archs:
                if launch.kwargs.get("FP8_OUT") and arch < FP8_MIN_ARCH:
                    continue  # FP8 activations feed FP8 GEMMs, which only sm_89+ runs (fastsd35.models.fp8)
                configs = configs_for(launch.kernel, arch, {**named, **launch.kwargs}) if autotuned else [None]
                for config in configs:
                    kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
                    signature, constexprs, attrs, options = specialize(jit_fn, arch, launch.args, kwargs)
                    key = (jit_fn.__name__, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
                    if key not in jobs:
                        family = (jit_fn.__name__, arch, dtype, kwargs.get("USE_TMA", False), kwargs.get("FP8_OUT", False))
                        if quick and family in quick_seen:
                            continue
                        quick_seen.add(family)
                        variant = Variant(
                            kernel=jit_fn.__name__.strip("_").removesuffix("_kernel"),
                            arch=f"sm_{arch}",
                            dtype=DTYPE_NAMES[dtype],
                            config=_config_label(kwargs, options),
                            shared_limit=SHARED_LIMIT[arch],
                        )
                        jobs[key] = _Job(variant, jit_fn, (signature, constexprs, attrs), options.__dict__)
                    label = _shape_label(launch.args)
                    if label not in jobs[key].variant.shapes:
                        jobs[key].variant.shapes.append(label)
    return list(jobs.values())


# -- compile and inspect -------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    """The cuobjdump Triton uses (its wheel ships one; TRITON_CUOBJDUMP_PATH overrides it), like its ptxas."""
    from triton import knobs

    path = knobs.nvidia.cuobjdump.path
    if not path or not is_file(Path(path)):
        raise FastSD35Error(f"fastsd35 kernels: cuobjdump not found at {path} (the triton wheel ships one)")
    return path


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _inspect(variant: Variant, compiled) -> None:
    ptx = compiled.asm["ptx"]
    variant.wgmma = "wgmma.mma_async" in ptx
    variant.mma = "mma.sync" in ptx
    variant.cp_async = re.search(r"cp\.async\.c[ag]\b", ptx) is not None
    variant.tma = "cp.async.bulk.tensor" in ptx
    variant.shared_bytes = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True)
    m = _RESOURCES.search(usage.stdout)
    if usage.returncode or m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage failed: {usage.stderr.strip() or usage.stdout[:200]}")
    variant.registers, variant.stack_bytes = int(m.group(1)), int(m.group(2)) + int(m.group(4))
    variant.spill_stores = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass.stdout))


def _compile(job: _Job) -> Variant:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, start = job.variant, time.perf_counter()
    arch = int(variant.arch.removeprefix("sm_"))
    try:
        compiled = triton.compile(ASTSource(job.jit_fn, *job.source), target=GPUTarget("cuda", arch, 32),
                                  options=job.options)  # fmt: skip
        _inspect(variant, compiled)
    except Exception as e:  # a failed compile is a finding of the report, not a crash of it
        variant.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    variant.ok = not variant.problems()
    variant.seconds = round(time.perf_counter() - start, 2)
    return variant


def _compile_at(index: int) -> Variant:
    return _compile(_JOBS[index])


# The signals that stop a run (fastsd35.app.cli turns them into exceptions in the main thread).
_STOP_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


def _worker_signals(mask) -> None:
    """In a forked compile process, before any job: the default SIGTERM and SIGHUP (the pool ends its workers with
    SIGTERM when it closes or is interrupted; the inherited handler of `fastsd35.app.cli` would print a traceback in
    each) and SIGINT ignored (Ctrl-C reaches the whole process group: the parent stops the pool and says so, once);
    then the parent's signal mask again (`compile_all` blocked the stop signals while forking)."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


_JOBS: list[_Job] = []  # read by the forked workers


def compile_all(jobs: list[_Job], workers: int) -> list[Variant]:
    """Compile every job (in `workers` forked processes when > 1); results in job order.

    The stop signals are blocked while the pool forks its workers: a handler that raises inside an at-fork callback
    (the logging module's runs in the parent after each fork) has its exception printed and ignored, so the signal
    would be lost and the run go on for minutes; blocked, it waits and is delivered once the pool is inside `with`,
    which then ends the workers. The workers start with it blocked too and set their own handlers first."""
    global _JOBS
    if workers <= 1 or len(jobs) <= 1:
        return [_compile(j) for j in jobs]
    import multiprocessing

    _JOBS = jobs
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        try:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals, initargs=(mask,))
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        with pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came while forking is raised here
            return pool.map(_compile_at, range(len(jobs)), chunksize=1)
    finally:
        _JOBS = []


# -- the command ---------------------------------------------------------------------------------------------------


def available_archs() -> dict[str, int]:
    """The architectures of ARCHS this Triton can target (sm_100 needs a Triton that knows Blackwell)."""
    from triton.backends.nvidia import compiler

    known = dict(ARCHS)
    try:
        compiler.sm_arch_from_capability(100)
    except Exception:
        known.pop("sm_100")
    return known


def parse_archs(value: str) -> list[int]:
    known = available_archs()
    names = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in names if a not in known]
    if bad or not names:
        raise FastSD35Error(f"--arch {value!r}: choose from {', '.join(known)} (comma-separated)")
    return [known[a] for a in dict.fromkeys(names)]


def parse_dtypes(value: str | None):
    if value is None:
        return None
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    names = [d.strip() for d in value.split(",") if d.strip()]
    bad = [d for d in names if d not in by_name]
    if bad or not names:
        raise FastSD35Error(f"--dtype {value!r}: choose from {', '.join(by_name)} (comma-separated)")
    return [by_name[d] for d in dict.fromkeys(names)]


def format_table(variants: list[Variant]) -> str:
    head = ("kernel", "arch", "dtype", "config", "regs", "stack", "smem", "mma", "cp.async", "tma", "first shape", "ok")
    rows = [head]
    for v in variants:
        mma = "wgmma" if v.wgmma else "mma.sync" if v.mma else "-"
        shape = (v.shapes[0] if v.shapes else "-") + (f" +{len(v.shapes) - 1}" if len(v.shapes) > 1 else "")
        rows.append((v.kernel, v.arch, v.dtype, v.config, str(v.registers), str(v.stack_bytes), str(v.shared_bytes),
                     mma, "yes" if v.cp_async else "-", "yes" if v.tma else "-", shape,
                     "ok" if v.ok else "FAIL: " + "; ".join(v.problems())))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=DEFAULT_ARCHS,
                        help="comma-separated GPU architectures: sm_80, sm_90, sm_100 where this Triton targets it "
                             f"(default {DEFAULT_ARCHS})")  # fmt: skip
    parser.add_argument("--dtype", help="comma-separated: fp16, bf16, fp32 (default: all three)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as a JSON list to FILE")
    parser.add_argument("--quick", action="store_true",
                        help="only the first variant of each kernel, load style, arch and dtype (a smoke test)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")


def kernels_command(args) -> int:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise FastSD35Error(f"fastsd35 kernels needs triton: {e}") from e
    archs, dtypes = parse_archs(args.arch), parse_dtypes(args.dtype)
    if args.jobs < 1:
        raise FastSD35Error(f"--jobs {args.jobs}: must be at least 1")
    if args.json is not None:  # before minutes of compiling, not after
        check_writable(args.json, "--json")
    if checks.INTERPRET:
        raise FastSD35Error("fastsd35 kernels compiles for the GPU: unset TRITON_INTERPRET (the interpreter was asked for)")
    start = time.perf_counter()
    jobs = plan(archs, dtypes, quick=args.quick)
    print(f"compiling {len(jobs)} kernel variants for {', '.join(f'sm_{a}' for a in archs)} ...", file=sys.stderr,
          flush=True)  # fmt: skip
    variants = compile_all(jobs, args.jobs)
    print(format_table(variants))
    failed = [v for v in variants if not v.ok]
    print(f"{len(variants)} variants, {len(failed)} failed, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps([asdict(v) for v in variants], indent=1) + "\n")
        except OSError as e:
            raise FastSD35Error(f"--json {args.json}: cannot write it ({e.strerror})") from e
    return 1 if failed else 0
