"""The command line: `fastsd35 run` turns prompts into PNGs; `fastsd35 serve` serves them over HTTP (fastsd35.app.serve);
`fastsd35 bench` times the kernels, the transformer step, a generation and the server (fastsd35.benchmarks.suite);
`fastsd35 kernels` compiles every kernel variant for the GPUs and reports it (fastsd35.kernels.report).

Every user mistake ends in one line on stderr and exit status 2, found before any model is loaded where possible,
and never with a file written or overwritten.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from contextlib import contextmanager

from ..benchmarks import suite as benchmark
from ..errors import FastSD35Error
from ..kernels import report as kernel_report
from ..models.controlnet import CONTROL_TYPES
from ..pipeline import caching, memory
from ..pipeline.distributed import launched
from ..pipeline.inputs import DTYPES, check
from ..pipeline.presets import PRESETS
from ..pipeline.sampling import SAMPLERS
from ..version import __version__
from . import jobs, torchrun
from .outputs import check_output, write_png
from .serve import bench as serve_bench  # noqa: F401  (registers the "serve" part of fastsd35 bench)
from .serve import command as serve


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsd35", description="Fast, faithful Stable Diffusion 3 / 3.5.")
    parser.add_argument("--version", action="version", version=f"fastsd35 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="generate images from prompts", description="Generate images from prompts.")
    what = run.add_argument_group("what to generate")
    what.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (read from the checkpoint when it can be)")
    what.add_argument("--model", help="Hugging Face Hub name ORG/NAME[@REVISION], checkpoint file, folder with the official "
                                      "files, or diffusers folder (default: models/); a local path wins over a Hub name")
    what.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    what.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines skipped)")
    what.add_argument("--negative-prompt", help='negative prompt (default: "")')
    what.add_argument("--seed", type=int, help="seed of the first image (default 23); image i of a prompt uses seed+i")
    what.add_argument("--batch-size", type=int, default=1, help="images per prompt, sampled together (default 1)")
    what.add_argument("--from-png", help="reproduce an image from the settings stored in its metadata")
    what.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                      help="fuse a LoRA (.safetensors, diffusers or kohya layout) into the transformer at load, with "
                           "SCALE (default 1.0); repeat for several")
    how = run.add_argument_group("sampling (defaults from the preset)")
    how.add_argument("--width", type=int)
    how.add_argument("--height", type=int)
    how.add_argument("--steps", type=int)
    how.add_argument("--cfg", type=float, help="classifier-free guidance scale (<= 1 runs the cond pass only)")
    how.add_argument("--shift", type=float, help="sigma schedule shift")
    how.add_argument("--sampler", choices=SAMPLERS)
    how.add_argument("--slg", action=argparse.BooleanOptionalAction, help="skip-layer guidance (on by default for medium)")
    how.add_argument("--init-image", help="img2img: start from this image")
    how.add_argument("--denoise", type=float, help="img2img strength in (0, 1] (default 0.8)")
    cn = run.add_argument_group("ControlNet (SD3.5 Large)")
    cn.add_argument("--controlnet", help="an SD3.5 ControlNet file (blur, canny or depth) or diffusers folder")
    cn.add_argument("--control-image", help="the control image (edges, blurred image or depth map)")
    cn.add_argument("--control-preprocess", choices=("canny", "blur", "depth"),
                    help="make the control image from a photo: canny edges or a Gaussian blur (depth maps must be supplied)")
    cn.add_argument("--control-strength", type=float, help="scales the ControlNet's residuals (default 1.0)")
    cn.add_argument("--control-type", choices=tuple(CONTROL_TYPES.values()),
                    help="the ControlNet's kind, for diffusers folders that do not record it")
    cn.add_argument("--canny-low", type=float, help="canny: low hysteresis threshold (default 100)")
    cn.add_argument("--canny-high", type=float, help="canny: high hysteresis threshold (default 200)")
    cn.add_argument("--blur-radius", type=float, help="blur: Gaussian radius in pixels (default 5)")
    cache = run.add_argument_group("step caching (off by default; README \"Step caching\")")
    cache.add_argument("--cache", choices=("off", "on"),
                       help="reuse the later blocks' work between steps whose first blocks barely change")
    cache.add_argument("--cache-threshold", type=float, help=f"relative change below which a step reuses "
                                                            f"(default {caching.DEFAULT_THRESHOLD:g}; 0 computes every step)")
    cache.add_argument("--cache-warmup", type=int, help=f"first steps always computed (default {caching.DEFAULT_WARMUP})")
    cache.add_argument("--cache-max-skip", type=int,
                       help=f"most steps reused in a row (default {caching.DEFAULT_MAX_SKIP})")
    cache.add_argument("--cache-blocks", type=int,
                       help=f"blocks always computed, whose change decides (default {caching.DEFAULT_BLOCKS})")
    cache.add_argument("--cache-extrapolate", action=argparse.BooleanOptionalAction,
                       help="extrapolate the reused residual to first order from the last two computed steps")
    hw = run.add_argument_group("hardware and text encoding")
    hw.add_argument("--dtype", choices=DTYPES, help="transformer/VAE precision (default bf16 on CUDA, fp32 on CPU); "
                    "fp8: the transformer's block Linears in FP8 (FP8 GEMMs on sm_89+), the rest at the default")
    hw.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    hw.add_argument("--text-encoder-device", default="auto", help="where CLIP/T5 run: auto (GPU when it fits), cuda or cpu")
    hw.add_argument("--no-graphs", action="store_true", help="run the transformer eagerly instead of from CUDA graphs")
    hw.add_argument("--t5-tokens", type=int, help="longest T5 prompt in tokens (default 256, max 512)")
    hw.add_argument("--no-t5", action="store_true", default=None, help="do not load T5-XXL (zeros in its place)")
    out = run.add_argument_group("output")
    out.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    out.add_argument("--overwrite", action="store_true", help="replace existing files instead of writing name-2.png")
    out.add_argument("--dry-run", action="store_true", help="print the files, settings, memory estimate and output names; "
                                                            "download, load and write nothing")
    torchrun.add_arguments(run)
    run.set_defaults(handler=run_command)
    server = commands.add_parser("serve", help="serve images over HTTP (the OpenAI Images API)",
                                 description="Load the model once and serve POST /v1/images/generations (the OpenAI "
                                             "Images API), GET /v1/models, /health and /metrics; needs the serve "
                                             "extra: pip install 'fastsd35[serve]'.")  # fmt: skip
    serve.add_arguments(server)
    server.set_defaults(handler=serve.serve_command)
    bench = commands.add_parser("bench", help="time the kernels, the transformer step and a generation",
                                description="Time the kernels, the transformer step and a whole generation against "
                                            "their baselines; print a table and write the results as JSON.")
    benchmark.add_arguments(bench)
    bench.set_defaults(handler=benchmark.bench_command)
    compile_report = commands.add_parser(
        "kernels", help="compile every Triton kernel variant for sm_80/sm_90 and report registers, spills, memory",
        description="Compile every kernel variant the launchers can pick, as the JIT would for the SD3.5 sizes, for "
                    "GPUs that need not be here; print registers, stack, shared memory and instructions per variant. "
                    "Exit 1 when one fails to compile, spills or exceeds shared memory.")  # fmt: skip
    kernel_report.add_arguments(compile_report)
    compile_report.set_defaults(handler=kernel_report.kernels_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with signals_as_interrupts():
            return args.handler(args)
    except FastSD35Error as e:
        say(f"fastsd35: error: {e}")
        return 2
    except Terminated as e:
        say(f"fastsd35: {signal.Signals(e.signum).name} received: stopped, nothing partial written")
        return 128 + e.signum
    except KeyboardInterrupt:
        say("fastsd35: interrupted")
        return 130


MAX_LINE = 600  # characters of one message line


def say(line: str):
    """One line on stderr, on a line of its own: progress bars still open are closed first, which ends their line;
    a bar an interrupt caught half made (it may have drawn itself but cannot close) gets its line ended here."""
    from tqdm import tqdm

    unended = False
    for bar in list(getattr(tqdm, "_instances", ())):
        # Interrupted inside tqdm.__init__ after it drew itself, a bar has no last_print_t and its close() returns
        # without ending the line.
        unended |= getattr(bar, "sp", None) is not None and not hasattr(bar, "last_print_t")
        try:
            bar.close()
        except Exception:  # noqa: BLE001
            unended = True
    if len(line) > MAX_LINE:  # a value given thousands of characters long is cut, not echoed whole
        cut = len(line) - MAX_LINE
        line = f"{line[:MAX_LINE // 2]}... ({cut} characters cut) ...{line[-MAX_LINE // 2:]}"
    print(("\n" if unended else "") + line, file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def signals_as_interrupts():
    """SIGTERM and SIGHUP end the run as Ctrl-C does (no partial file, exit 128 + the signal's number)."""
    def handler(signum, frame):
        raise Terminated(signum)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- fastsd35 run -------------------------------------------------------------------------------------------------


def run_command(args) -> int:
    """`fastsd35 run`: the arguments become a job (fastsd35.app.jobs), the job's images become PNGs in --out."""
    check("dist_timeout", args.dist_timeout, "--dist-timeout")  # checked in one process too: the same command line
    if launched():  # one rank of a torchrun job
        return torchrun.run_command(args)
    started = time.perf_counter()
    job = jobs.from_args(args)
    if args.dry_run:
        for line in jobs.describe(job):
            print(line)
        return 0
    if job.memory:
        memory.preflight(job.memory, job.device, tuple(DTYPES))
    check_output(job.out, job.image_names(), job.overwrite, job.output_bytes())
    pipe = jobs.load(job)
    jobs.check_prompts_fit(job, pipe)
    timings, written, caches = dict(pipe.timings), [], []
    control = jobs.control_latent(job, pipe)
    for prompt in job.prompts:
        gen = pipe.generate(prompt, **jobs.generate_kwargs(job, control))
        caches.append(gen.cache)
        for stage, seconds in gen.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        for name, data in jobs.png_files(job, gen, pipe):
            written.append(write_png(job.out, name, data, job.overwrite))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.1f} s ({stages}"
          f"{jobs.describe_cache(caches)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
