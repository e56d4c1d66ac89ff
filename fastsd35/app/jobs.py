"""Jobs: one validated request, whatever front end it came from.

A request is a plain mapping of the values below (REQUEST_KEYS), as a front end received them: the command line's
arguments (`from_args`), a PNG's record (`request_from_record`, for `--from-png`), a Python call or an HTTP body
(`plan(values)`). `plan` checks every value and every file once, in one pass, and returns a `Job`: everything a run
needs decided before any model is loaded (the preset and settings, prompts, seeds, LoRAs, ControlNet, images with
their hashes, where the model comes from, the outputs). The front ends then share the rest: `load` builds the
pipeline, `check_prompts_fit` refuses a prompt that cannot be encoded before the first image, `generate_kwargs`
gives each generation's arguments, `png_files` turns a generation into named PNGs with their records, and
`describe` is `--dry-run`'s account of the same job. Nothing here prints or writes files.

A value that is None (or absent) is not given: the default applies. Labels (`label(name)`) are the front end's names
for the values in messages: `--steps` on the command line, `steps` in Python and JSON.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from PIL import Image

from ..errors import FastSD35Error
from ..files import exists, is_dir, is_file, read_user_file
from ..models.controlnet import CONTROL_TYPES
from ..models.fp8 import is_quantized
from ..models.mmditx import CONFIGS
from ..pipeline import hub, memory
from ..pipeline.caching import CacheConfig
from ..pipeline.inputs import (DTYPES, MAX_IMAGE_FILE_BYTES, MAX_PROMPTS_FILE_BYTES, shown, check_device, check_loras,
                               check_path, check_prompts, check_values, image_from_bytes)
from ..pipeline.presets import PRESETS, Preset, Settings, get_preset
from ..pipeline.sampling import CFGDenoiser, SLGConfig, sampler_steps
from ..tiny.family import TINY_MMDITX_CONFIG, TRAINED_MMDITX_CONFIG
from ..version import __version__
from ..weights.checkpoints import find_model_files, transformer_config
from ..weights.lora import MAX_LORA_BYTES
from .outputs import image_name, png_bytes, png_size_bound
from .records import check_record, check_same_file, sha256

PRESET_OF_VARIANT = {"sd3_medium": "sd3_medium", "sd3.5_medium": "medium"}  # sd3.5_large: large or large_turbo
DEFAULT_MODEL = "models"  # --model's default: the folder of official files
DEFAULT_SEED = 23
DEFAULT_T5_TOKENS = 256
DEFAULT_DENOISE = 0.8

# Every value a request may hold. Those checked by a Field (fastsd35.pipeline.inputs.FIELDS) are checked there by
# name; the rest by `plan` itself.
REQUEST_KEYS = (
    "preset", "model", "prompt", "prompts_file", "negative_prompt", "seed", "batch_size", "lora",
    "steps", "cfg", "shift", "sampler", "width", "height", "slg", "init_image", "init_image_sha256", "denoise",
    "controlnet", "control_image", "control_image_sha256", "control_preprocess", "control_strength", "control_type",
    "canny_low", "canny_high", "blur_radius",
    "dtype", "device", "text_encoder_device", "graphs", "t5_tokens", "no_t5", "cfg_parallel",
    "cache", "cache_threshold", "cache_warmup", "cache_max_skip", "cache_blocks", "cache_extrapolate", "cache_schedule",
    "out", "overwrite",
)  # fmt: skip
CACHE_OPTIONS = ("cache_threshold", "cache_warmup", "cache_max_skip", "cache_blocks", "cache_extrapolate")
PATH_KEYS = ("model", "prompts_file", "init_image", "controlnet", "control_image", "out")
CONTROL_OPTIONS = ("control_image", "control_preprocess", "control_strength", "control_type", "canny_low", "canny_high",
                   "blur_radius")  # fmt: skip


def cli_label(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# -- the job ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """An init or control image: its pixels, the file they came from and that file's SHA-256 (kept in records)."""

    image: Image.Image
    path: Path
    sha256: str


@dataclass(frozen=True)
class Control:
    """A ControlNet run: the checkpoint and the control image, preprocessed when asked."""

    controlnet: Path
    control_type: str | None
    image: ImageInput
    preprocess: str | None
    options: dict
    strength: float


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from, decided once: the built-in model of a tiny preset (`builtin`), a Hugging Face Hub
    repository (`hub`: repo and revision), or a local file or folder (`path`, which may not exist: the loaders say
    what they expected there)."""

    given: str | None  # --model as given (None: not given)
    path: Path | None = None
    hub: tuple[str, str | None] | None = None
    builtin: bool = False

    @staticmethod
    def parse(model, preset_builtin: bool) -> "ModelSource":
        if model is None and preset_builtin:
            return ModelSource(None, builtin=True)
        text = DEFAULT_MODEL if model is None else str(model)
        name = None if isinstance(model, Path) else hub.parse_hub_name(text)
        if name is not None:
            return ModelSource(text, hub=name)
        return ModelSource(None if model is None else text, path=Path(text))


@dataclass(frozen=True)
class Job:
    """A checked run: everything decided before any model is loaded."""

    preset: Preset
    model: ModelSource
    prompts: list[str]
    negative_prompt: str
    seed: int
    batch_size: int
    settings: Settings
    init: ImageInput | None
    control: Control | None
    loras: tuple[tuple[Path, float, str | None], ...]  # file, scale, the SHA-256 a record expects
    device: torch.device
    dtype: str | None  # a DTYPES name; None: the device's default
    t5: bool
    t5_tokens: int
    text_encoder_device: str
    graphs: bool | None  # None: on CUDA
    cfg_parallel: bool  # cond and uncond as two passes (on two ranks under torchrun)
    cache: CacheConfig | None  # step caching (None: off)
    hub: hub.HubPlan | None  # a Hub name's files (downloaded by `load`)
    memory: memory.Request | None  # what the GPU memory preflight checks (released models)
    out: Path | None = None  # where the PNGs go (None: the front end keeps them)
    overwrite: bool = False

    @property
    def n_images(self) -> int:
        return len(self.prompts) * self.batch_size

    def image_names(self) -> list[str]:
        """The file name each image asks for, in order (taken names become name-2.png, ... when written)."""
        return [image_name(self.preset.name, p, self.seed + i) for p in self.prompts for i in range(self.batch_size)]

    def output_bytes(self) -> int:
        """The most the job's PNGs can take on disk."""
        return self.n_images * png_size_bound(self.settings.width, self.settings.height)


# -- requests -----------------------------------------------------------------------------------------------------


def request_from_args(args) -> dict:
    """The `fastsd35 run` arguments as a request (with --from-png's record under them)."""
    request = {key: getattr(args, key, None) for key in REQUEST_KEYS}
    request["graphs"] = False if getattr(args, "no_graphs", False) else None
    request["no_t5"] = True if args.no_t5 else None
    request["overwrite"] = bool(args.overwrite)
    if args.text_encoder_device == "auto":
        request["text_encoder_device"] = None
    if getattr(args, "from_png", None) is not None:
        from .outputs import read_record

        png = check_path(args.from_png, "--from-png")
        recorded = request_from_record(read_record(png), png)
        if any(request.get(k) is not None for k in ("cache", *CACHE_OPTIONS, "steps", "denoise", "init_image")):
            recorded["cache_schedule"] = None  # settings that change the steps or the cache: decided anew
        request = merge(request, recorded)
    return request


def request_from_record(record: dict, source) -> dict:
    """A PNG's record as a request. The record is checked first (records.check_record: types, ranges and keys); the
    files it names must still hold what they held (their SHA-256 goes with them and is checked when they are read)."""
    record = check_record(record, source)
    request = {key: record.get(key) for key in ("preset", "model", "negative_prompt", "seed", "steps", "cfg", "shift",
                                                 "sampler", "width", "height", "denoise", "dtype", "t5_tokens", "no_t5")}
    request["prompt"] = [record["prompt"]]
    if record.get("init_image") is not None:
        request["init_image"] = record["init_image"]
        request["init_image_sha256"] = record.get("init_image_sha256")
    slg = record.get("slg")
    request["slg"] = SLGConfig(**{**slg, "layers": tuple(slg["layers"])}) if slg else False
    request["lora"] = [(Path(lora["file"]), lora["scale"], lora.get("sha256")) for lora in record.get("loras") or []] or None
    request["cfg_parallel"] = record.get("cfg_parallel", False)
    cache = record.get("cache")
    if cache:
        request.update(cache="on", cache_threshold=cache["threshold"], cache_warmup=cache["warmup"],
                       cache_max_skip=cache["max_skip"], cache_blocks=cache["blocks"],
                       cache_extrapolate=cache["extrapolate"], cache_schedule=cache["schedule"])  # fmt: skip
    control = record.get("controlnet")
    if control:
        options = control.get("options") or {}
        request.update(controlnet=control["controlnet"], control_type=control.get("control_type"),
                       control_image=control["control_image"],
                       control_image_sha256=control.get("control_image_sha256"),
                       control_preprocess=control.get("preprocess"), control_strength=control["strength"],
                       canny_low=options.get("low"), canny_high=options.get("high"),
                       blur_radius=options.get("radius"))  # fmt: skip
    return request


def merge(primary: Mapping, fallback: Mapping) -> dict:
    """`primary`'s values, and `fallback`'s where `primary` gives none. An image given in `primary` replaces the
    fallback's (and its hash); a ControlNet given in `primary` brings none of the fallback's ControlNet options."""
    merged = {**fallback, **{k: v for k, v in primary.items() if v is not None}}
    for image in ("init_image", "control_image"):
        if primary.get(image) is not None:
            merged[f"{image}_sha256"] = primary.get(f"{image}_sha256")
    if primary.get("controlnet") is not None:
        for key in CONTROL_OPTIONS + ("control_image_sha256",):
            merged[key] = primary.get(key)
    return merged


# -- planning -----------------------------------------------------------------------------------------------------


def from_args(args) -> Job:
    return plan(request_from_args(args), label=cli_label)


def plan(request: Mapping[str, Any], *, label: Callable[[str], str] = cli_label) -> Job:
    """Check every value of `request` and every file it names that can be checked without loading a model, and
    decide everything the run needs: FastSD35Error (one line, naming the value by `label`) at the first problem."""
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise FastSD35Error(f"unknown option{'s' if len(unknown) > 1 else ''}: {', '.join(map(label, unknown))}")
    r = {key: request.get(key) for key in REQUEST_KEYS}
    check_values({k: v for k, v in r.items() if k != "prompt"}, label=label)
    for key in PATH_KEYS:
        if r[key] is not None:
            path = check_path(r[key], label(key))
            if not (key == "model" and isinstance(r[key], str)):  # the model's text stays as given: a Hub name?
                r[key] = path
    preset = get_preset(r["preset"]) if r["preset"] is not None else None
    model = ModelSource.parse(r["model"], preset is not None and preset.built_in)
    t5 = not r["no_t5"]
    hub_plan = None
    if preset is None:  # read from the model; a Hub repository is listed once, for its preset and its files
        if model.hub is not None:
            hub_plan = hub.plan(*model.hub, None, t5=t5, dtype=r["dtype"])
            preset = hub_plan.preset
        else:
            preset = _preset_from_checkpoint(model.path)
    prompts = check_prompts(_prompts(r["prompt"], r["prompts_file"]))
    t5_tokens = DEFAULT_T5_TOKENS if r["t5_tokens"] is None else r["t5_tokens"]
    if r["denoise"] is not None and r["init_image"] is None:
        raise FastSD35Error(f"{label('denoise')} needs {label('init_image')} (it sets how much of the init image is repainted)")
    device = _device(r["device"], label("device"))
    text_encoder_device = r["text_encoder_device"] or "auto"
    if text_encoder_device != "auto":
        check_device(text_encoder_device, label("text_encoder_device"))
    if r["graphs"] is not None and not isinstance(r["graphs"], bool):
        raise FastSD35Error(f"{label('graphs')} must be true or false, got {r['graphs']!r}")
    if r["overwrite"] is not None and not isinstance(r["overwrite"], bool):
        raise FastSD35Error(f"{label('overwrite')} must be true or false, got {r['overwrite']!r}")
    init = _image(r["init_image"], "init image", r["init_image_sha256"], label("init_image"))
    control = _control(r, label)
    loras = tuple(_lora(item, label("lora")) for item in _items(r["lora"], label("lora")))
    if control:
        if not preset.built_in and preset.variant != "sd3.5_large":
            raise FastSD35Error(f"the SD3.5 ControlNets are made for SD3.5 Large: use --preset large or large_turbo, not {preset.name}")
        preset = preset.with_controlnet()
    settings = preset.resolve(
        steps=r["steps"], cfg=r["cfg"], shift=r["shift"], sampler=r["sampler"], width=r["width"], height=r["height"],
        slg=r["slg"], denoise=(DEFAULT_DENOISE if r["denoise"] is None else r["denoise"]) if init else 1.0,
        max_pixels=_max_pixels(preset),
    )
    if settings.slg and preset.variant in CONFIGS and max(settings.slg.layers) >= CONFIGS[preset.variant].depth:
        raise FastSD35Error(f"skip-layer guidance layers {list(settings.slg.layers)} do not exist in "
                            f"{preset.name}'s {CONFIGS[preset.variant].depth}-block transformer")
    batch_size = 1 if r["batch_size"] is None else r["batch_size"]
    cfg_parallel = bool(r["cfg_parallel"])
    if cfg_parallel and settings.cfg <= 1:
        raise FastSD35Error(f"{label('cfg_parallel')} splits the cond and uncond passes, but cfg {settings.cfg:g} <= 1 "
                            f"runs the cond pass only: drop {label('cfg_parallel')} (or raise {label('cfg')})")
    cache = _cache(r, label, preset, settings)
    if model.hub is not None and hub_plan is None:  # the files the named preset needs (the network comes last)
        hub_plan = hub.plan(*model.hub, preset, t5=t5, dtype=r["dtype"])
    need = None
    if preset.variant in memory.LABELS:
        need = memory.Request(preset.variant, r["dtype"] or ("bf16" if device.type == "cuda" else "fp32"),
                              settings.width, settings.height, batch_size, settings.cfg > 1 and not cfg_parallel, t5,
                              t5_tokens, text_encoder_device)  # fmt: skip
    return Job(
        preset=preset, model=model, prompts=prompts, negative_prompt=r["negative_prompt"] or "",
        seed=DEFAULT_SEED if r["seed"] is None else r["seed"], batch_size=batch_size, settings=settings, init=init,
        control=control, loras=loras, device=device, dtype=r["dtype"], t5=t5, t5_tokens=t5_tokens,
        text_encoder_device=text_encoder_device, graphs=r["graphs"], cfg_parallel=cfg_parallel, cache=cache,
        hub=hub_plan,
        memory=need, out=None if r["out"] is None else Path(r["out"]), overwrite=bool(r["overwrite"]),
    )


def _cache(r: dict, label, preset: Preset, settings: Settings) -> CacheConfig | None:
    """The step cache's settings: None when off (then no cache option may be given)."""
    if r["cache"] != "on":
        given = [label(k) for k in CACHE_OPTIONS if r[k] is not None]
        if given:
            raise FastSD35Error(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} {label('cache')} on")
        return None
    given = {k.removeprefix("cache_"): r[k] for k in CACHE_OPTIONS if r[k] is not None}
    config = CacheConfig(**given, schedule=r["cache_schedule"])
    return config.checked(_depth(preset, r["model"]), sampler_steps(settings), label)


def _items(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise FastSD35Error(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _prompts(prompt, prompts_file) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if prompts is not None and not isinstance(prompts, (list, tuple)):
        check_prompts(prompts)  # the one-line type error
    prompts = list(prompts or [])
    if prompts_file is not None:
        data = read_user_file(prompts_file, "prompts file", MAX_PROMPTS_FILE_BYTES)
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise FastSD35Error(f"cannot read prompts file {prompts_file}: {e}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise FastSD35Error(f"prompts file {prompts_file} has no prompts (blank lines are skipped)")
        prompts += from_file
    if not prompts:
        raise FastSD35Error('nothing to generate: give --prompt "..." or --prompts-file FILE')
    return prompts


def _lora(item, what: str) -> tuple[Path, float, str | None]:
    """A LoRA as "FILE[:SCALE]", (file, scale) or (file, scale, SHA-256), with the file's keys checked (it is read
    whole when the model is loaded) and, where a record gives its SHA-256, the file's bytes checked against it."""
    from ..weights.lora import lora_layers, parse_lora_arg

    if isinstance(item, str):
        path, scale = parse_lora_arg(item)
        digest = None
    elif isinstance(item, tuple):
        [(path, scale, digest)] = check_loras([item], what)
    else:
        raise FastSD35Error(f"{what} must be FILE[:SCALE] or a (file, scale) pair, got {shown(item)}")
    lora_layers(path)
    if digest is not None:
        check_same_file(read_user_file(path, "LoRA file", MAX_LORA_BYTES), digest, path, "LoRA file", "--lora")
    return path, scale, digest


def _control(r: dict, label) -> Control | None:
    """The ControlNet inputs, checked and preprocessed before any model is loaded."""
    if r["controlnet"] is None:
        given = [label(name) for name in CONTROL_OPTIONS if r[name] is not None]
        if given:
            raise FastSD35Error(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} {label('controlnet')}")
        return None
    controlnet = Path(r["controlnet"])
    if not exists(controlnet):
        raise FastSD35Error(f"{controlnet}: no such ControlNet file or folder")
    if r["control_image"] is None:
        raise FastSD35Error(f"{label('controlnet')} needs {label('control_image')} (edges, a blurred image or a depth map)")
    image = _image(r["control_image"], "control image", r["control_image_sha256"], label("control_image"))
    strength = 1.0 if r["control_strength"] is None else r["control_strength"]
    if r["control_type"] is not None and r["control_type"] not in CONTROL_TYPES.values():
        raise FastSD35Error(f"{label('control_type')} must be one of {', '.join(CONTROL_TYPES.values())}, "
                            f"got {r['control_type']!r}")
    kind = r["control_preprocess"]
    options = {"canny": {"low": r["canny_low"], "high": r["canny_high"]}, "blur": {"radius": r["blur_radius"]}}
    options = {k: v for k, v in options.get(kind, {}).items() if v is not None}
    stray = [label(o) for o, wanted in (("canny_low", "canny"), ("canny_high", "canny"), ("blur_radius", "blur"))
             if r[o] is not None and kind != wanted]
    if stray:
        raise FastSD35Error(f"{', '.join(stray)} only apply with the matching {label('control_preprocess')}")
    if kind:
        from ..pipeline.control import preprocess

        image = replace(image, image=preprocess(image.image, kind, **options))
    return Control(controlnet, r["control_type"], image, kind, options, strength)


def _image(path, what: str, expected_sha256: str | None, flag: str) -> ImageInput | None:
    """The image at `path` (None: none) and the SHA-256 of its file, which must be `expected_sha256` when given."""
    if path is None:
        return None
    path = Path(path)
    data = read_user_file(path, what, MAX_IMAGE_FILE_BYTES)
    check_same_file(data, expected_sha256, path, what, flag)
    return ImageInput(image_from_bytes(data, path, what), path, sha256(data))


def _device(requested, label: str) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(requested, label)


def _depth(preset: Preset, model) -> int | None:
    """The transformer's depth when the preset tells it (a released model, or a built-in one), else None."""
    if preset.variant in CONFIGS:
        return CONFIGS[preset.variant].depth
    built_in = {"tiny": TRAINED_MMDITX_CONFIG, "tiny_random": TINY_MMDITX_CONFIG}
    return built_in[preset.name].depth if model is None and preset.name in built_in else None


def _max_pixels(preset: Preset) -> int:
    built_in = {"tiny": TRAINED_MMDITX_CONFIG, "tiny_random": TINY_MMDITX_CONFIG}
    config = built_in.get(preset.name) or CONFIGS[preset.variant]
    return config.pos_embed_max_size * config.patch_size * 8


def _preset_from_checkpoint(model: Path) -> Preset:
    """The preset a local checkpoint implies, read from its tensor shapes (never from its file name)."""
    if not exists(model):
        raise FastSD35Error(f"no --preset given and {model} does not exist to read one from: pass --preset "
                            f"({', '.join(PRESETS)}) and --model")
    if is_dir(model) and not (is_dir(model / "transformer") or is_file(model / "model_index.json")):
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


# -- running ------------------------------------------------------------------------------------------------------


def load(job: Job, device: torch.device | None = None):
    """The job's pipeline (downloading a Hub model's missing files first), on `device` (default: the job's)."""
    from ..pipeline.runner import Pipeline  # the heavy imports wait until the request is known to be good

    device = job.device if device is None else device
    common = dict(dtype=DTYPES[job.dtype] if job.dtype else None, device=device, t5=job.t5, t5_tokens=job.t5_tokens,
                  graphs=job.graphs, controlnet=job.control and job.control.controlnet,
                  control_type=job.control and job.control.control_type, loras=job.loras)  # fmt: skip
    if job.model.builtin:
        return Pipeline.from_preset(job.preset.name, **common)
    # The job decided where the model comes from: a local path is passed in a form no Hub name can take.
    model = hub.download(job.hub) if job.hub else job.model.path.absolute()
    return Pipeline.from_pretrained(model, job.preset, text_encoder_device=job.text_encoder_device, **common)


def check_prompts_fit(job: Job, pipe):
    """Every prompt (and the negative one) tokenizes within the T5 length: refused before the first image, so that
    no run writes some images and then fails on a later prompt."""
    with warnings.catch_warnings():  # CLIP's truncation warnings come once, while generating
        warnings.simplefilter("ignore")
        pipe.text_encoders.tokenize(job.prompts + [job.negative_prompt])


def control_latent(job: Job, pipe):
    """One control latent for the whole run (None without a ControlNet)."""
    if job.control is None:
        return None
    return pipe.encode_control(job.control.image.image, job.settings.width, job.settings.height, job.seed)


def generate_kwargs(job: Job, control, denoiser_cls=None) -> dict:
    """`Pipeline.generate`'s arguments for every prompt of the job (the prompt itself aside)."""
    s = job.settings
    if denoiser_cls is None:
        denoiser_cls = partial(CFGDenoiser, split=True) if job.cfg_parallel else CFGDenoiser
    return dict(
        cache=job.cache, negative_prompt=job.negative_prompt, seed=job.seed, batch_size=job.batch_size,
        init_image=job.init.image if job.init else None, denoise=s.denoise if job.init else None, steps=s.steps,
        cfg=s.cfg, shift=s.shift, sampler=s.sampler, width=s.width, height=s.height, slg=s.slg or False,
        control_image=control, control_strength=job.control.strength if job.control else 1.0,
        denoiser_cls=denoiser_cls,
    )


def png_files(job: Job, gen, pipe) -> list[tuple[str, bytes]]:
    """A generation's images as (file name, PNG bytes with the record), in order."""
    return [(image_name(job.preset.name, prompt, seed), png_bytes(image, record(job, prompt, seed, pipe, gen.cache)))
            for image, prompt, seed in zip(gen.images, gen.prompts, gen.seeds)]


def describe_cache(caches: list[dict | None]) -> str:
    """The run's last line's account of the step cache ("" without it): passes computed of all."""
    caches = [c for c in caches if c]
    if not caches:
        return ""
    computed, passes = sum(c["computed"] for c in caches), sum(c["passes"] for c in caches)
    deciding = sum(c["decide_s"] for c in caches)
    return f"; step cache: {computed} of {passes} transformer passes computed, deciding {deciding:.2f} s"


def record(job: Job, prompt: str, seed: int, pipe, cache: dict | None = None) -> dict:
    """Every setting needed to reproduce one image (`fastsd35 run --from-png`)."""
    from .. import kernels

    s, slg, c = job.settings, job.settings.slg, job.control
    control = None
    if c:
        control = {"controlnet": os.path.abspath(c.controlnet), "control_type": pipe.controlnet.control_name,
                   "control_image": os.path.abspath(c.image.path), "control_image_sha256": c.image.sha256,
                   "preprocess": c.preprocess, "options": c.options, "strength": c.strength}  # fmt: skip
    return {
        "fastsd35_version": __version__,
        "preset": job.preset.name,
        "model": _stored_model(job),
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
        "init_image": os.path.abspath(job.init.path) if job.init else None,
        "init_image_sha256": job.init.sha256 if job.init else None,
        "denoise": s.denoise if job.init else None,
        "dtype": "fp8" if is_quantized(pipe.transformer) else {v: k for k, v in DTYPES.items()}[pipe.transformer.dtype],
        "t5_tokens": job.t5_tokens,
        "no_t5": not job.t5,
        "controlnet": control,
        "loras": [{"file": _stored_path(f.path), "scale": f.scale, "sha256": f.sha256} for f in pipe.loras],
        "backend": kernels.backend(pipe.device),
        "cfg_parallel": job.cfg_parallel,
        "cache": None if cache is None else {k: v for k, v in cache.items() if k != "decide_s"},
    }


def _stored_model(job: Job) -> str | None:
    if job.hub:
        return f"{job.hub.repo}@{job.hub.commit}"  # a Hub name, pinned to the commit used
    if job.model.builtin:
        return None
    return _stored_path(job.model.path)


def _stored_path(path) -> str:
    """A path for a record: absolute (so the record works from any folder)."""
    return os.path.abspath(path)


def fingerprint(job: Job) -> str:
    """A digest of everything that decides the images of a job (not the device): equal wherever the same request is
    planned from the same inputs (every torchrun rank compares it)."""
    digest = hashlib.sha256(repr((job.preset, job.model, job.prompts, job.negative_prompt, job.seed, job.batch_size,
                                  job.settings, job.dtype, job.t5, job.t5_tokens, job.cfg_parallel, job.loras, job.cache,
                                  job.control and (job.control.strength, job.control.preprocess))).encode())
    for image in (job.init, job.control and job.control.image):
        if image is not None:
            digest.update(image.image.tobytes())
    return digest.hexdigest()


# -- describing ---------------------------------------------------------------------------------------------------


def describe_settings(s: Settings) -> str:
    slg = f"SLG {s.slg.scale} on layers {list(s.slg.layers)}" if s.slg else "no SLG"
    return f"{s.steps} steps, cfg {s.cfg}, shift {s.shift}, {s.sampler}, {s.width}x{s.height}, {slg}"


def describe(job: Job) -> Iterable[str]:
    """`--dry-run`: what the job would read, do and write, with the memory estimate (raises FastSD35Error as the run
    would where the GPU is short of memory). Reads headers only; downloads, loads and writes nothing."""
    yield f"preset: {job.preset.name}: {describe_settings(job.settings)}, batch {job.batch_size}"
    if job.hub:
        h = job.hub
        yield f"model: {h.name} (commit {h.commit[:12]}, {h.layout} layout, listed from the {h.source})"
        for f in h.files:
            size = f"{f.size / 1e9:.2f} GB" if f.size is not None else "?"
            yield f"  {f.path}  {size}  {'cached' if f.cached else 'to download'}"
        yield f"  to download: {h.download_bytes / 1e9:.2f} GB into {h.snapshot}"
    elif job.model.builtin:
        yield f"model: the built-in {job.preset.name} model (no files to find)"
    else:
        files = find_model_files(job.model.path, job.preset)
        yield f"model: transformer {files.transformer}, VAE {files.vae}, text encoders from {files.text_encoders}"
    if job.memory:
        e = memory.estimate(job.memory)
        where = f"{job.device}, not checked" if job.device.type != "cuda" else str(job.device)
        yield f"memory ({where}): {e.describe()}"
        if job.device.type == "cuda":
            e = memory.preflight(job.memory, job.device, tuple(DTYPES))  # raises with what would fit
            yield (f"  fits: {memory.device_memory(job.device)[0] / 1e9:.1f} GB free; text encoders on "
                   f"{'the GPU' if e.text_encoders_on_gpu else 'the CPU'}")
    if job.out is not None:
        yield f"outputs: {', '.join(map(str, planned_outputs(job)))}"


def planned_outputs(job: Job) -> list[Path]:
    """The files the job would write now (existing names are skipped unless the job overwrites)."""
    taken, paths = set(), []
    for wanted in job.image_names():
        stem, name, n = wanted[:-4], None, 1
        while name is None or (not job.overwrite and (name in taken or exists(job.out / name))):
            name, n = (f"{stem}.png" if n == 1 else f"{stem}-{n}.png"), n + 1
        taken.add(name)
        paths.append(job.out / name)
    return paths
