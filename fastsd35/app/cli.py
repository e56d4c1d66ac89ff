"""The command line: `fastsd35 run` turns prompts into PNGs; `fastsd35 bench` times the kernels, the transformer step
and a generation (fastsd35.benchmarks.suite); `fastsd35 kernels` compiles every kernel variant for the GPUs and reports it
(fastsd35.kernels.report).

Every user mistake ends in one line on stderr and exit status 2, found before any model is loaded where possible,
and never with a file written or overwritten.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from .. import kernels
from ..version import __version__
from ..benchmarks import suite as benchmark
from . import torchrun
from ..pipeline import hub, memory
from ..pipeline.distributed import launched
from ..weights.checkpoints import find_model_files, transformer_config
from ..kernels import report as kernel_report
from ..errors import FastSD35Error
from ..pipeline.inputs import DTYPES, MAX_IMAGE_FILE_BYTES, MAX_PROMPTS_FILE_BYTES, check_device, check_prompts, check_values, image_from_bytes
from ..files import read_user_file
from .records import check_record, check_same_file, sha256
from .outputs import check_output, image_name, png_bytes, png_size_bound, read_record, write_png
from ..models.mmditx import CONFIGS
from ..models.controlnet import CONTROL_TYPES
from ..pipeline.presets import PRESETS, Preset, Settings, get_preset
from ..models.fp8 import is_quantized
from ..pipeline.sampling import SAMPLERS, CFGDenoiser, SLGConfig
from ..tiny.family import TINY_MMDITX_CONFIG, TRAINED_MMDITX_CONFIG

PRESET_OF_VARIANT = {"sd3_medium": "sd3_medium", "sd3.5_medium": "medium"}  # sd3.5_large: large or large_turbo
MAX_T5_TOKENS = 512


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
    what.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    what.add_argument("--negative-prompt", help='negative prompt (default: "")')
    what.add_argument("--seed", type=int, help="seed of the first image (default 23); image i of a prompt uses seed+i")
    what.add_argument("--batch-size", type=int, default=1, help="images per prompt, sampled together (default 1)")
    what.add_argument("--from-png", type=Path, help="reproduce an image from the settings stored in its metadata")
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
    how.add_argument("--init-image", type=Path, help="img2img: start from this image")
    how.add_argument("--denoise", type=float, help="img2img strength in (0, 1] (default 0.8)")
    cn = run.add_argument_group("ControlNet (SD3.5 Large)")
    cn.add_argument("--controlnet", type=Path, help="an SD3.5 ControlNet file (blur, canny or depth) or diffusers folder")
    cn.add_argument("--control-image", type=Path, help="the control image (edges, blurred image or depth map)")
    cn.add_argument("--control-preprocess", choices=("canny", "blur", "depth"),
                    help="make the control image from a photo: canny edges or a Gaussian blur (depth maps must be supplied)")
    cn.add_argument("--control-strength", type=float, help="scales the ControlNet's residuals (default 1.0)")
    cn.add_argument("--control-type", choices=tuple(CONTROL_TYPES.values()),
                    help="the ControlNet's kind, for diffusers folders that do not record it")
    cn.add_argument("--canny-low", type=float, help="canny: low hysteresis threshold (default 100)")
    cn.add_argument("--canny-high", type=float, help="canny: high hysteresis threshold (default 200)")
    cn.add_argument("--blur-radius", type=float, help="blur: Gaussian radius in pixels (default 5)")
    hw = run.add_argument_group("hardware and text encoding")
    hw.add_argument("--dtype", choices=DTYPES, help="transformer/VAE precision (default bf16 on CUDA, fp32 on CPU); "
                    "fp8: the transformer's block Linears in FP8 (FP8 GEMMs on sm_89+), the rest at the default")
    hw.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    hw.add_argument("--text-encoder-device", default="auto", help="where CLIP/T5 run: auto (GPU when it fits), cuda or cpu")
    hw.add_argument("--no-graphs", action="store_true", help="run the transformer eagerly instead of from CUDA graphs")
    hw.add_argument("--t5-tokens", type=int, help="longest T5 prompt in tokens (default 256, max 512)")
    hw.add_argument("--no-t5", action="store_true", default=None, help="do not load T5-XXL (zeros in its place)")
    out = run.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default outputs/)")
    out.add_argument("--overwrite", action="store_true", help="replace existing files instead of writing name-2.png")
    out.add_argument("--dry-run", action="store_true", help="print the files, settings, memory estimate and output names; "
                                                            "download, load and write nothing")
    torchrun.add_arguments(run)
    run.set_defaults(handler=run_command)
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
        print(f"fastsd35: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"fastsd35: {signal.Signals(e.signum).name} received: stopped, nothing partial written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("fastsd35: interrupted", file=sys.stderr)
        return 130


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


@dataclass(frozen=True)
class Job:
    """A checked `fastsd35 run`: everything decided before any model is loaded."""

    preset: Preset
    model: Path
    prompts: list[str]
    negative_prompt: str
    seed: int
    batch_size: int
    settings: Settings
    init_image: Image.Image | None
    init_image_path: Path | None
    init_image_sha256: str | None
    device: torch.device
    dtype: torch.dtype | None
    t5: bool
    t5_tokens: int
    control: Control | None
    hub: hub.HubPlan | None = None  # a Hub name's files (downloaded by `load`)
    memory: memory.Request | None = None  # what the GPU memory preflight checks (released models)
    loras: tuple[tuple[Path, float], ...] = ()
    cfg_parallel: bool = False  # cond and uncond as two passes (on two ranks under torchrun)


@dataclass(frozen=True)
class Control:
    """A ControlNet run: the checkpoint and the control image, preprocessed when asked."""

    controlnet: Path
    control_type: str | None
    image: Image.Image
    image_path: Path
    image_sha256: str
    preprocess: str | None
    options: dict
    strength: float


def run_command(args) -> int:
    if launched():  # one rank of a torchrun job
        return torchrun.run_command(args)
    started = time.perf_counter()
    job = plan(args)
    if args.dry_run:
        return dry_run(job, args)
    if job.memory:
        memory.preflight(job.memory, job.device, tuple(DTYPES))
    names = [image_name(job.preset.name, p, job.seed + i) for p in job.prompts for i in range(job.batch_size)]
    check_output(args.out, names, args.overwrite, len(names) * png_size_bound(job.settings.width, job.settings.height))
    pipe = load(job, args)
    with warnings.catch_warnings():  # CLIP's truncation warnings come once, while generating
        warnings.simplefilter("ignore")
        pipe.text_encoders.tokenize(job.prompts + [job.negative_prompt])  # every prompt fits, before the first image
    timings, written = dict(pipe.timings), []
    control = control_latent(pipe, job)
    for prompt in job.prompts:
        gen = pipe.generate(prompt, **generate_kwargs(job, control))
        for stage, seconds in gen.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        for image, seed in zip(gen.images, gen.seeds):
            data = png_bytes(image, record(job, prompt, seed, pipe))
            written.append(write_png(args.out, image_name(job.preset.name, prompt, seed), data, args.overwrite))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.1f} s ({stages})")
    return 0


def dry_run(job: Job, args) -> int:
    """`fastsd35 run --dry-run`: what a run would read, do and write, with the memory estimate; nothing is written."""
    print(f"preset: {job.preset.name}: {_describe(job.settings)}, batch {job.batch_size}")
    if job.hub:
        h = job.hub
        print(f"model: {h.name} (commit {h.commit[:12]}, {h.layout} layout, listed from the {h.source})")
        for f in h.files:
            size = f"{f.size / 1e9:.2f} GB" if f.size is not None else "?"
            print(f"  {f.path}  {size}  {'cached' if f.cached else 'to download'}")
        print(f"  to download: {h.download_bytes / 1e9:.2f} GB into {h.snapshot}")
    elif job.preset.built_in and args.model is None:
        print(f"model: the built-in {job.preset.name} model (no files to find)")
    else:
        files = find_model_files(job.model, job.preset)
        print(f"model: transformer {files.transformer}, VAE {files.vae}, text encoders from {files.text_encoders}")
    if job.memory:
        e = memory.estimate(job.memory)
        where = f"{job.device}, not checked" if job.device.type != "cuda" else str(job.device)
        print(f"memory ({where}): {e.describe()}")
        if job.device.type == "cuda":
            e = memory.preflight(job.memory, job.device, tuple(DTYPES))  # raises with what would fit
            print(f"  fits: {memory.device_memory(job.device)[0] / 1e9:.1f} GB free; text encoders on "
                  f"{'the GPU' if e.text_encoders_on_gpu else 'the CPU'}")
    taken, names = set(), []
    for prompt in job.prompts:
        for i in range(job.batch_size):
            stem, name, n = image_name(job.preset.name, prompt, job.seed + i)[:-4], None, 1
            while name is None or (not args.overwrite and (name in taken or (args.out / name).exists())):
                name, n = (f"{stem}.png" if n == 1 else f"{stem}-{n}.png"), n + 1
            taken.add(name)
            names.append(str(args.out / name))
    print(f"outputs: {', '.join(names)}")
    return 0


def _describe(s: Settings) -> str:
    slg = f"SLG {s.slg.scale} on layers {list(s.slg.layers)}" if s.slg else "no SLG"
    return f"{s.steps} steps, cfg {s.cfg}, shift {s.shift}, {s.sampler}, {s.width}x{s.height}, {slg}"


def control_latent(pipe, job: Job):
    """One control latent for the whole run (None without a ControlNet)."""
    if job.control is None:
        return None
    return pipe.encode_control(job.control.image, job.settings.width, job.settings.height, job.seed)


def generate_kwargs(job: Job, control) -> dict:
    """`Pipeline.generate`'s arguments for every prompt of the job."""
    s = job.settings
    return dict(
        negative_prompt=job.negative_prompt, seed=job.seed, batch_size=job.batch_size, init_image=job.init_image,
        denoise=s.denoise if job.init_image else None, steps=s.steps, cfg=s.cfg, shift=s.shift, sampler=s.sampler, width=s.width,
        height=s.height, slg=s.slg or False, control_image=control,
        control_strength=job.control.strength if job.control else 1.0,
        denoiser_cls=partial(CFGDenoiser, split=True) if job.cfg_parallel else CFGDenoiser,
    )


def plan(args) -> Job:
    """Check every argument and input file that can be checked without loading a model."""
    if args.from_png:
        _fill_from_record(args, read_record(args.from_png))
    check_values({k: v for k, v in vars(args).items() if k != "prompt"}, label=lambda name: f"--{name.replace('_', '-')}")
    model = Path(args.model or "models")
    preset = get_preset(args.preset) if args.preset else _preset_from_checkpoint(model)
    prompts = check_prompts(_prompts(args))
    t5_tokens = 256 if args.t5_tokens is None else args.t5_tokens
    if args.denoise is not None and args.init_image is None:
        raise FastSD35Error("--denoise needs --init-image (it sets how much of the init image is repainted)")
    device = _device(args.device)
    if args.text_encoder_device != "auto":
        check_device(args.text_encoder_device, "--text-encoder-device")
    init_image, init_sha = _image(args.init_image, "init image", getattr(args, "init_image_sha256", None), "--init-image")
    control = _control(args)
    loras = tuple(_lora(text) for text in args.lora or ())
    if control:
        if not preset.built_in and preset.variant != "sd3.5_large":
            raise FastSD35Error(f"the SD3.5 ControlNets are made for SD3.5 Large: use --preset large or large_turbo, not {preset.name}")
        preset = preset.with_controlnet()
    settings = preset.resolve(
        steps=args.steps, cfg=args.cfg, shift=args.shift, sampler=args.sampler, width=args.width, height=args.height,
        slg=args.slg, denoise=(0.8 if args.denoise is None else args.denoise) if init_image else 1.0,
        max_pixels=_max_pixels(preset),
    )
    device, hub_name = _device(args.device), hub.parse_hub_name(args.model)
    need = None
    if preset.variant in memory.LABELS:
        need = memory.Request(preset.variant, args.dtype or ("bf16" if device.type == "cuda" else "fp32"), settings.width,
                              settings.height, args.batch_size, settings.cfg > 1 and not args.cfg_parallel,
                              not args.no_t5, t5_tokens, args.text_encoder_device)  # fmt: skip
    if args.cfg_parallel and settings.cfg <= 1:
        raise FastSD35Error(f"--cfg-parallel splits the cond and uncond passes, but cfg {settings.cfg:g} <= 1 runs "
                            f"the cond pass only: drop --cfg-parallel (or raise --cfg)")
    return Job(
        preset=preset, model=model, prompts=prompts, negative_prompt=args.negative_prompt or "",
        seed=23 if args.seed is None else args.seed, batch_size=args.batch_size, settings=settings,
        init_image=init_image, init_image_path=args.init_image, init_image_sha256=init_sha, device=device,
        dtype=DTYPES[args.dtype] if args.dtype else None, t5=not args.no_t5, t5_tokens=t5_tokens, control=control,
        hub=hub.plan(*hub_name, preset, t5=not args.no_t5, dtype=args.dtype) if hub_name else None, memory=need,
        loras=loras,
        cfg_parallel=bool(args.cfg_parallel),
    )


def _lora(text: str) -> tuple[Path, float]:
    """A --lora FILE[:SCALE], with the file's keys checked (it is read whole only when the model is loaded)."""
    from ..weights.lora import lora_layers, parse_lora_arg

    path, scale = parse_lora_arg(text)
    lora_layers(path)
    return path, scale


def _control(args) -> Control | None:
    """The ControlNet inputs, checked and preprocessed before any model is loaded."""
    cn_options = ("control_image", "control_preprocess", "control_strength", "control_type", "canny_low", "canny_high", "blur_radius")
    if args.controlnet is None:
        given = [f"--{name.replace('_', '-')}" for name in cn_options if getattr(args, name) is not None]
        if given:
            raise FastSD35Error(f"{', '.join(given)} need --controlnet")
        return None
    if not args.controlnet.exists():
        raise FastSD35Error(f"{args.controlnet}: no such ControlNet file or folder")
    if args.control_image is None:
        raise FastSD35Error("--controlnet needs --control-image (edges, a blurred image or a depth map)")
    image, sha = _image(args.control_image, "control image", getattr(args, "control_image_sha256", None), "--control-image")
    strength = 1.0 if args.control_strength is None else args.control_strength
    if not math.isfinite(strength):
        raise FastSD35Error(f"--control-strength must be a finite number, got {strength}")
    options = {"canny": {"low": args.canny_low, "high": args.canny_high}, "blur": {"radius": args.blur_radius}}
    options = {k: v for k, v in options.get(args.control_preprocess, {}).items() if v is not None}
    stray = [f"--{o}" for o, kind in (("canny-low", "canny"), ("canny-high", "canny"), ("blur-radius", "blur"))
             if getattr(args, o.replace("-", "_")) is not None and args.control_preprocess != kind]
    if stray:
        raise FastSD35Error(f"{', '.join(stray)} only apply with the matching --control-preprocess")
    if args.control_preprocess:
        from ..pipeline.control import preprocess

        image = preprocess(image, args.control_preprocess, **options)
    return Control(args.controlnet, args.control_type, image, args.control_image, sha, args.control_preprocess, options, strength)


def load(job: Job, args):
    from ..pipeline.runner import Pipeline# the heavy imports wait until the arguments are known to be good

    common = dict(dtype=job.dtype, device=job.device, t5=job.t5, t5_tokens=job.t5_tokens,
                  graphs=False if args.no_graphs else None, controlnet=job.control and job.control.controlnet,
                  control_type=job.control and job.control.control_type, loras=job.loras)  # fmt: skip
    if job.preset.built_in and args.model is None:
        return Pipeline.from_preset(job.preset.name, **common)
    model = hub.download(job.hub) if job.hub else job.model
    return Pipeline.from_pretrained(model, job.preset, text_encoder_device=args.text_encoder_device, **common)


def record(job: Job, prompt: str, seed: int, pipe) -> dict:
    """Every setting needed to reproduce one image (`fastsd35 run --from-png`)."""
    s, slg, c = job.settings, job.settings.slg, job.control
    control = None
    if c:
        control = {"controlnet": os.path.abspath(c.controlnet), "control_type": pipe.controlnet.control_name,
                   "control_image": os.path.abspath(c.image_path), "control_image_sha256": c.image_sha256,
                   "preprocess": c.preprocess, "options": c.options, "strength": c.strength}  # fmt: skip
    return {
        "fastsd35_version": __version__,
        "preset": job.preset.name,
        "model": f"{job.hub.repo}@{job.hub.commit}" if job.hub else  # a Hub name, pinned to the commit used
        None if job.preset.built_in and job.model == Path("models") else _stored_path(job.model),
        "prompt": prompt,
        "negative_prompt": job.negative_prompt,
        "seed": seed,
        "steps": s.steps,
        "cfg": s.cfg,
        "shift": s.shift,
        "sampler": s.sampler,
        "width": s.width,
        "height": s.height,
        "slg": None if slg is None else {"scale": slg.scale, "start": slg.start, "end": slg.end, "layers": list(slg.layers), "cfg": slg.cfg},
        "init_image": os.path.abspath(job.init_image_path) if job.init_image_path else None,
        "init_image_sha256": job.init_image_sha256,
        "denoise": s.denoise if job.init_image_path else None,
        "dtype": "fp8" if is_quantized(pipe.transformer) else {v: k for k, v in DTYPES.items()}[pipe.transformer.dtype],
        "t5_tokens": job.t5_tokens,
        "no_t5": not job.t5,
        "controlnet": control,
        "loras": [{"file": _stored_path(file), "scale": scale} for file, scale in pipe.loras],
        "backend": kernels.backend(pipe.device),
        "cfg_parallel": job.cfg_parallel,
    }


def _stored_path(path) -> str:
    """A path for a record: absolute when it names a file or folder here (so the record works from any folder),
    else as given (a name resolved elsewhere)."""
    return os.path.abspath(path) if os.path.exists(path) else str(path)


def _fill_from_record(args, record: dict):
    """Settings from a PNG's record (checked: records.check_record), for every option not given on the command line.
    Files named by the record must still hold what they held (their SHA-256 is checked when they are read)."""
    record = check_record(record, args.from_png)
    args.prompt = args.prompt or [record["prompt"]]
    fields = ("preset", "model", "negative_prompt", "seed", "steps", "cfg", "shift", "sampler", "width", "height",
              "denoise", "dtype", "t5_tokens", "no_t5")  # fmt: skip
    for name in fields:
        if getattr(args, name, None) is None and record.get(name) is not None:
            setattr(args, name, record[name])
    if args.init_image is None and record.get("init_image"):
        args.init_image = Path(record["init_image"])
        args.init_image_sha256 = record.get("init_image_sha256")
    if args.slg is None:
        slg = record.get("slg")
        args.slg = SLGConfig(**{**slg, "layers": tuple(slg["layers"])}) if slg else False
    loras = record.get("loras")
    if args.lora is None and loras:  # checked by records.check_record: a list of {file, scale}
        args.lora = [f"{lora['file']}:{float(lora['scale'])!r}" for lora in loras]
    if args.cfg_parallel is None:
        args.cfg_parallel = record.get("cfg_parallel", False)
    control = record.get("controlnet")
    if control and args.controlnet is None:
        args.controlnet, args.control_type = Path(control["controlnet"]), control.get("control_type")
        if args.control_image is None:
            args.control_image = Path(control["control_image"])
            args.control_image_sha256 = control.get("control_image_sha256")
        args.control_preprocess = args.control_preprocess or control.get("preprocess")
        args.control_strength = control["strength"] if args.control_strength is None else args.control_strength
        opts = control.get("options") or {}
        args.canny_low, args.canny_high = opts.get("low", args.canny_low), opts.get("high", args.canny_high)
        args.blur_radius = opts.get("radius", args.blur_radius)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        data = read_user_file(args.prompts_file, "prompts file", MAX_PROMPTS_FILE_BYTES)
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise FastSD35Error(f"cannot read prompts file {args.prompts_file}: {e}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise FastSD35Error(f"prompts file {args.prompts_file} has no prompts (blank lines are skipped)")
        prompts += from_file
    if not prompts:
        raise FastSD35Error('nothing to generate: give --prompt "..." or --prompts-file FILE')
    return prompts


def _image(path: Path | None, what: str, expected_sha256: str | None, flag: str):
    """The image at `path` (None: none) and the SHA-256 of its file, which must be `expected_sha256` when given."""
    if path is None:
        return None, None
    data = read_user_file(path, what, MAX_IMAGE_FILE_BYTES)
    check_same_file(data, expected_sha256, path, what, flag)
    return image_from_bytes(data, path, what), sha256(data)


def _device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(requested, "--device")


def _max_pixels(preset: Preset) -> int:
    built_in = {"tiny": TRAINED_MMDITX_CONFIG, "tiny_random": TINY_MMDITX_CONFIG}
    config = built_in.get(preset.name) or CONFIGS[preset.variant]
    return config.pos_embed_max_size * config.patch_size * 8


def _preset_from_checkpoint(model: Path) -> Preset:
    """The preset a checkpoint implies, read from its tensor shapes (never from its file name); for a Hub name, the
    preset of a released repository or of the one official checkpoint the repository holds."""
    if (name := hub.parse_hub_name(model)) is not None:
        return hub.preset_of(*name)
    if not model.exists():
        raise FastSD35Error(f"no --preset given and {model} does not exist to read one from: pass --preset "
                            f"({', '.join(PRESETS)}) and --model")
    if model.is_dir() and not ((model / "transformer").is_dir() or (model / "model_index.json").is_file()):
        names = {name for p in PRESETS.values() for name in p.checkpoints}
        found = sorted(p.name for p in model.glob("*.safetensors") if p.name in names)
        if len(found) != 1:
            listed = f"found {', '.join(found)}" if found else "found no known checkpoint"
            raise FastSD35Error(f"{model}: {listed}: pass --preset ({', '.join(PRESETS)})")
        model = model / found[0]
    variant = transformer_config(model).variant
    if variant not in PRESET_OF_VARIANT:
        users = [p.name for p in PRESETS.values() if p.variant == variant] or ["none"]
        raise FastSD35Error(f"{model}: holds a {variant} transformer (presets: {', '.join(users)}): pass --preset")
    return get_preset(PRESET_OF_VARIANT[variant])


if __name__ == "__main__":
    sys.exit(main())
