"""The generation pipeline: load -> encode -> sample -> decode (DESIGN.md "The data path")."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..errors import CheckpointError, FastSD35Error
from ..models.controlnet import ControlNet, check_compatible
from ..models.devices import default_device, default_dtype
from ..models.fp8 import is_fp8, is_quantized, quantize_
from ..models.mmditx import FastMMDiTX, MMDiTX
from ..models.text_encoders import TextEncoders
from ..models.vae import SDVAE, image_to_tensor, process_in, process_out, tensor_to_images
from ..tiny import family as tiny
from ..weights.checkpoints import find_model_files, load_transformer, transformer_config
from ..weights.controlnet import load_controlnet
from ..weights.lora import Fused, fuse_loras
from ..weights.text_encoders import load_text_encoders
from ..weights.vae import load_vae
from . import hub, memory
from .caching import CacheConfig, StepCache, config_from
from .control import control_latent
from .graphs import CUDAGraphPasses
from .inputs import (
    DTYPES,
    MAX_BATCH,
    check,
    check_device,
    check_image,
    check_loras,
    check_optional_bool,
    check_path,
    check_prompts,
)
from .presets import PRESETS, Preset, Settings, get_preset
from .sampling import CFGDenoiser, get_sigmas, img2img_sigmas, initial_latent, make_noise, model_timestep, sample

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What the text encoders need on the GPU in bf16 (T5-XXL ~9.5 GB, CLIP-G ~1.4 GB, CLIP-L ~0.25 GB), and what
# sampling at 1024^2 needs beside the weights: below this much free memory they run on the CPU.
TEXT_ENCODER_BYTES = {True: 11.2e9, False: 1.7e9}  # keyed by "with T5"
SAMPLING_HEADROOM_BYTES = 6e9
OOM_HINTS = {
    "load": ("loading", "use --dtype bf16 or fp16, or a GPU with more memory"),
    "encode": ("encoding the prompts", "use --text-encoder-device cpu or --no-t5"),
    "sample": ("sampling", "lower --batch-size or --width/--height"),
    "decode": ("decoding", "lower --batch-size"),
}


@dataclass
class Generation:
    """What a call produced and how: enough to write the images with their metadata."""

    images: list[Image.Image]
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    settings: Settings
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict | None = None  # the step cache's settings, decisions and passes computed (caching.StepCache.summary)


class TransformerPass:
    """One transformer evaluation for the denoiser (`sampling.VelocityModel`): v = model(x, t, y, context) on the
    model's device, t = model_timestep(sigma), with the ControlNet's residuals when `control` is given.

    The step cache (fastsd35.pipeline.caching) runs a pass in stages: `head` (the first `blocks` blocks, and their
    residual), then `tail` (the other blocks and the final layer, and their residual) or `reuse` (the final layer on
    the head's output plus a kept tail residual). head + tail is the same computation as one call."""

    def __init__(self, transformer: MMDiTX, controlnet: ControlNet | None = None):
        self.transformer, self.controlnet = transformer, controlnet

    def __call__(self, x, sigma, y, context, *, skip_layers=(), control=None):
        device = self.transformer.device
        x, sigma = x.to(device), sigma.to(device)
        with on_device(device):  # Triton launches on the current device: make it the model's
            residuals = self._control(x, sigma, y, control)
            return self.transformer(x, model_timestep(sigma), y, context, controlnet_hidden_states=residuals,
                                    skip_layers=skip_layers)

    def _control(self, x, sigma, y, control):
        if control is None:
            return None
        latent, strength = control
        return self.controlnet(self.transformer, x, sigma, y, latent, strength)

    def head(self, x, sigma, y, context, *, blocks: int, control=None) -> dict[str, torch.Tensor]:
        """The first `blocks` blocks: {"x", "context", "mods", "residual" (x out - x in, fp32), "hs0", "hs1", ... (the
        ControlNet's residuals, when it runs)}, every value a tensor on the model's device."""
        device = self.transformer.device
        x, sigma = x.to(device), sigma.to(device)
        with on_device(device):
            hs = self._control(x, sigma, y, control)
            state = self.transformer.embed(x, model_timestep(sigma), y, context, hs)
            start = state.x
            self.transformer.run_blocks(state, 0, blocks, hs)
            head = {"x": state.x, "context": state.context, "mods": state.mods,
                    "residual": state.x.float() - start.float()}
            head.update((f"hs{i}", h) for i, h in enumerate(hs or ()))
            return head

    def tail(self, head: dict[str, torch.Tensor], *, blocks: int, hw) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks after the head's and the final layer: (v, the residual those blocks added, fp32)."""
        with on_device(self.transformer.device):
            state = self._state(head, hw)
            hs = [head[f"hs{i}"] for i in range(sum(k.startswith("hs") for k in head))] or None
            self.transformer.run_blocks(state, blocks, self.transformer.depth, hs)
            return self.transformer.final(state), state.x.float() - head["x"].float()

    def reuse(self, head: dict[str, torch.Tensor], tail_residual: torch.Tensor, *, hw) -> torch.Tensor:
        """The final layer on the head's output plus a kept tail residual: v."""
        with on_device(self.transformer.device):
            state = self._state(head, hw)
            state.x = (head["x"].float() + tail_residual).to(head["x"].dtype)
            return self.transformer.final(state)

    @staticmethod
    def _state(head, hw):
        from types import SimpleNamespace

        return SimpleNamespace(x=head["x"], context=head["context"], mods=head["mods"], hw=tuple(hw))


class Pipeline:
    """Text (and optionally an init image) to images with one SD3/SD3.5 model and a preset's settings."""

    def __init__(self, transformer: MMDiTX, vae: SDVAE, text_encoders: TextEncoders, preset: Preset | str, *,
                 controlnet: ControlNet | None = None, graphs: bool | None = None):
        """`controlnet`: an SD3.5 ControlNet for this transformer; with it the ControlNet settings apply (shift 3,
        60 steps, cfg 3.5, euler) and every generation needs a control image. `graphs`: replay the transformer
        passes from CUDA graphs (default: on when the transformer is on CUDA)."""
        self.transformer, self.vae, self.text_encoders = transformer, vae, text_encoders
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.controlnet = controlnet
        if controlnet is not None:
            check_compatible(controlnet, transformer)
            self.preset = self.preset.with_controlnet()
        if vae.config.latent_channels != transformer.in_channels:
            raise CheckpointError(f"the VAE has {vae.config.latent_channels} latent channels but the transformer takes "
                                  f"{transformer.in_channels}: they come from different models")
        self.model_pass = TransformerPass(transformer, controlnet)
        if use_graphs(graphs, transformer.device):
            self.model_pass = CUDAGraphPasses(self.model_pass, transformer.device)
        self.timings: dict[str, float] = {}
        self.loras: list[Fused] = []  # the LoRA files fused into the transformer, in order, with their SHA-256

    def load_lora(self, path: str | Path, scale: float = 1.0) -> "Pipeline":
        """Fuse a LoRA file (diffusers/PEFT or kohya/ComfyUI layout) into the transformer's weights: once, no cost
        per step. All or nothing: whatever fails (a bad file, out of memory, an interrupt), FastSD35Error or the
        failure is raised with the weights exactly as they were (the weights a LoRA changes are copied to the CPU
        while it is fused). The fusion works on the weights as loaded (full precision): a quantized (FP8)
        transformer must get its LoRAs before quantizing."""
        [(path, scale, _)] = check_loras([(path, scale)], "load_lora")
        if is_quantized(self.transformer):
            raise FastSD35Error("a LoRA cannot be fused into FP8 weights: pass it when loading "
                                "(Pipeline.from_pretrained(..., loras=[(path, scale)]) or fastsd35 run --lora)")
        self.loras += fuse_loras(self.transformer, [(path, scale)], atomic=True)
        return self

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        preset: Preset | str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device=None,
        t5: bool = True,
        t5_tokens: int = 256,
        text_encoder_device: str = "auto",
        fast: bool = True,
        graphs: bool | None = None,
        controlnet: str | Path | None = None,
        control_type: str | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
    ) -> "Pipeline":
        """Load from an official single file, a folder laid out as the official release, a diffusers folder, or a
        Hugging Face Hub repository `"ORG/NAME[@REVISION]"` (a str; a `Path` is always a local path; downloaded into the Hugging Face cache; a local path of
        that name wins; `preset` may then be left out for the released repositories). Before anything is downloaded
        or loaded, a GPU that is short of memory for the weights is a FastSD35Error saying what would fit.
        `fast` runs the transformer on the Triton kernels (FastMMDiTX); `graphs` replays its passes from CUDA graphs
        (default: on CUDA). Text encoders go on the GPU when they fit beside the transformer
        (`text_encoder_device="auto"`), else on the CPU. `controlnet`: an SD3.5 ControlNet file or diffusers folder
        (`control_type` names its kind when the files do not). `dtype="fp8"`: the transformer's (and ControlNet's)
        block Linears in FP8 (fastsd35.models.fp8), everything else in the device's default dtype. `loras`: (file,
        scale) pairs fused into the transformer as it is loaded (see `load_lora`), before any FP8 quantization."""
        preset = _check_preset(preset)
        if not isinstance(model, (str, Path)):
            raise FastSD35Error(f"model must be a path (str or Path), got {type(model).__name__}")
        device, dtype = check_load_options(device, dtype, t5, t5_tokens)
        controlnet, loras = _check_extras(fast, graphs, controlnet, control_type, loras)
        if text_encoder_device != "auto":
            check_device(text_encoder_device, "text_encoder_device")
        name = None if isinstance(model, Path) else hub.parse_hub_name(model)  # a Path is always local
        plan = hub.plan(*name, preset, t5=t5, dtype=memory.dtype_name(dtype)) if name else None
        preset = plan.preset if plan else preset
        if preset is None:
            raise FastSD35Error(f"{model}: name the preset ({', '.join(PRESETS)}) for a local model")
        if preset.variant in memory.LABELS:  # the weights, at the smallest size: generate's size is not known yet
            need = memory.Request(preset.variant, memory.dtype_name(dtype), 256, 256, guided=False, t5=t5,
                                  t5_tokens=t5_tokens, text_encoder_device=text_encoder_device)
            memory.preflight(need, device)
        model = hub.download(plan) if plan else model
        files = find_model_files(model, preset)
        variant = transformer_config(files.transformer).variant  # checked from the header, before loading
        if preset.variant != "custom" and variant != preset.variant:
            raise CheckpointError(
                f"{files.transformer}: holds a {variant} transformer, but preset '{preset.name}' needs "
                f"{preset.variant}: pass the matching --preset or checkpoint"
            )
        timings = {}
        with _stage("load", timings, device):
            # LoRAs fuse into full-precision weights: with them, FP8 is quantized after fusing (the full-precision
            # transformer is held once while loading); without them, FP8 files and quantization stream tensor by tensor.
            fuse_first = bool(loras) and is_fp8(dtype)
            transformer = load_transformer(files.transformer, dtype=default_dtype(device) if fuse_first else dtype,
                                           device=device, model_cls=FastMMDiTX if fast else MMDiTX)
            fused = fuse_loras(transformer, loras, atomic=False)  # a failed load keeps nothing
            if fuse_first:
                quantize_(transformer)
            cn = None if controlnet is None else load_controlnet(controlnet, control_type=control_type, dtype=dtype, device=device)
            if cn is not None:
                check_compatible(cn, transformer)
            vae = load_vae(files.vae, dtype=default_dtype(device) if is_fp8(dtype) else dtype, device=device)
            te_device = _text_encoder_device(text_encoder_device, device, t5)
            text = load_text_encoders(
                files.text_encoders, device=te_device, dtype=default_dtype(te_device), t5=t5, t5_tokens=t5_tokens,
                t5_width=transformer.config.context_dim,
            )
        pipe = cls(transformer, vae, text, preset, controlnet=cn, graphs=graphs)
        pipe.timings.update(timings)
        pipe.loras = fused
        return pipe

    @classmethod
    def from_preset(cls, name: str = "tiny", *, device=None, dtype=None, seed: int = 0, t5: bool = True,
                    t5_tokens: int = 256, graphs: bool | None = None, controlnet: str | Path | None = None,
                    control_type: str | None = None, loras: Sequence[tuple[str | Path, float]] = ()) -> "Pipeline":
        """A pipeline that needs no files: `tiny`, the trained tiny family shipped with the package (loaded from
        `tiny.TRAINED_MODEL_DIR` by the same loaders as real checkpoints), or `tiny_random`, random weights built in
        code from `seed` (seconds on a CPU), optionally with a ControlNet file made for it
        (`tiny.write_tiny_controlnet`)."""
        if name == "tiny":
            check("seed", seed, "seed")  # unused by the trained model, checked all the same
            return cls.from_pretrained(tiny.trained_model_dir(), "tiny", device=device, dtype=dtype, t5=t5,
                                       t5_tokens=t5_tokens, graphs=graphs, controlnet=controlnet,
                                       control_type=control_type, loras=loras)  # fmt: skip
        if name != "tiny_random":
            get_preset(name)  # an unknown name says so
            raise FastSD35Error(f"preset {name!r} needs checkpoint files: use Pipeline.from_pretrained(model, {name!r})")
        device, dtype = check_load_options(device, dtype, t5, t5_tokens)
        controlnet, loras = _check_extras(True, graphs, controlnet, control_type, loras)
        seed = check("seed", seed, "seed")
        timings = {}
        with _stage("load", timings, device):
            fp8, dtype = is_fp8(dtype), default_dtype(device) if is_fp8(dtype) else dtype
            transformer, vae, text = tiny.tiny_components(seed, device=device, dtype=dtype, t5=t5, t5_tokens=t5_tokens)
            fused = fuse_loras(transformer, loras, atomic=False)  # before quantizing: LoRAs fuse into full precision
            if fp8:
                quantize_(transformer)
            cn = None if controlnet is None else load_controlnet(controlnet, control_type=control_type,
                                                                 dtype="fp8" if fp8 else dtype, device=device)
        pipe = cls(transformer, vae, text, "tiny_random", controlnet=cn, graphs=graphs)
        pipe.timings.update(timings)
        pipe.loras = fused
        return pipe

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def max_pixels(self) -> int:
        """The largest width/height the transformer's position table allows."""
        cfg = self.transformer.config
        return cfg.pos_embed_max_size * cfg.patch_size * 8

    # -- generation --------------------------------------------------------------------------------------------

    def __call__(self, prompt, negative_prompt="", **kwargs) -> list[Image.Image]:
        return self.generate(prompt, negative_prompt, **kwargs).images

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        seed: int = 23,
        steps: int | None = None,
        cfg: float | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: Image.Image | None = None,
        denoise: float | None = None,
        slg=None,
        batch_size: int = 1,
        control_image: Image.Image | torch.Tensor | None = None,
        control_strength: float = 1.0,
        progress: bool = True,
        denoiser_cls=CFGDenoiser,
        cache: bool | CacheConfig | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Generation:
        """One batch: a prompt repeated `batch_size` times, or a list of prompts (one image each). Image i uses
        seed + i. Unset settings come from the preset (None: the preset's value; `denoise` defaults to 0.8 with an
        init image); every argument is checked (FastSD35Error for a wrong type or range, see fastsd35.pipeline.inputs); `slg` is None (preset default), False, True or SLGConfig.
        With a ControlNet, `control_image` (an image, or a latent from `encode_control`) steers every image with
        `control_strength` (1.0 as the reference). `denoiser_cls` builds the guidance denoiser (CFGDenoiser's
        signature): `functools.partial(CFGDenoiser, split=True)` runs cond and uncond as two passes, and
        fastsd35.pipeline.distributed passes its CFG-parallel pair here. `cache` (True, or a caching.CacheConfig)
        caches the later blocks' work from step to step (see fastsd35.pipeline.caching; off by default: None or
        False); the result's `cache` then says which steps were computed and how many passes. `seeds`: one seed per
        image instead of seed + i (a server's batch of several requests); `seed` still seeds the init and control
        images."""
        check("batch_size", batch_size, "batch_size")
        prompts = check_prompts([prompt] * batch_size if isinstance(prompt, str) else prompt, "prompt")
        negatives = check_prompts([negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt,
                                  "negative prompt")
        if not prompts or len(negatives) != len(prompts):
            raise FastSD35Error(f"got {len(prompts)} prompts and {len(negatives)} negative prompts: give one negative per prompt")
        if len(prompts) > MAX_BATCH:
            raise FastSD35Error(f"{len(prompts)} prompts in one batch; the limit is {MAX_BATCH}")
        seed = check("seed", seed, "seed")
        if init_image is not None:
            check_image(init_image, "init_image")
        elif denoise is not None:
            raise FastSD35Error("denoise needs an init_image (it sets how much of the init image is repainted)")
        if control_image is not None and not isinstance(control_image, (Image.Image, torch.Tensor)):
            check_image(control_image, "control_image")
        control_strength = check("control_strength", control_strength, "control_strength")
        cache_config = config_from(cache)
        if cache_config is not None:
            cache_config.checked(self.transformer.depth)
        s = self.preset.resolve(
            steps=steps, cfg=cfg, shift=shift, sampler=sampler, width=width, height=height, slg=slg,
            denoise=(0.8 if denoise is None else denoise) if init_image is not None else 1.0, max_pixels=self.max_pixels,
        )
        if s.slg and max(s.slg.layers) >= self.transformer.depth:
            raise FastSD35Error(f"skip-layer guidance layers {s.slg.layers} do not exist in a {self.transformer.depth}-block model")
        if (control_image is None) != (self.controlnet is None):
            raise FastSD35Error("a ControlNet needs a control image" if control_image is None
                                else "a control image needs a ControlNet (--controlnet)")
        B, timings, device = len(prompts), {}, self.device
        if seeds is None:
            seeds = [seed + i for i in range(B)]
        elif isinstance(seeds, (list, tuple)) and len(seeds) == B:
            seeds = [check("seed", one, "seed") for one in seeds]
        else:
            raise FastSD35Error(f"seeds must be a list of one seed per image ({B}), got {seeds!r}")

        with _stage("encode", timings, device):
            guided = s.cfg > 1
            context, pooled = self.text_encoders.encode(prompts + negatives if guided else prompts)
            context, pooled = (t.to(device, self.transformer.dtype) for t in (context, pooled))
            cond = (context[:B], pooled[:B])
            uncond = (context[B:], pooled[B:]) if guided else None
            self._make_room_for_sampling()

        with _stage("sample", timings, device):
            sigmas = get_sigmas(s.shift, s.steps)
            latent = None
            if init_image is not None:
                latent = self.encode_image(init_image, s.width, s.height, seed).expand(B, -1, -1, -1)
                sigmas = img2img_sigmas(sigmas, s.denoise)
            control = None
            if control_image is not None:
                if isinstance(control_image, Image.Image):
                    control_image = self.encode_control(control_image, s.width, s.height, seed)
                control = (control_image.to(device), torch.tensor(float(control_strength), device=device))
            noise = torch.cat([make_noise(one, 1, (16, s.height // 8, s.width // 8)) for one in seeds])
            x = initial_latent(sigmas[0].to(device), noise.to(device), latent)
            step_cache = None
            if cache_config is not None:
                step_cache = StepCache(cache_config.checked(self.transformer.depth, len(sigmas) - 1), len(sigmas) - 1)
            denoiser = denoiser_cls(self.model_pass, cond, uncond, s.cfg, s.steps, s.slg, control, cache=step_cache)
            x = sample(s.sampler, denoiser, x, sigmas, progress)
            check_finite(x, "sampling", s, control_strength if control is not None else None)

        with _stage("decode", timings, device):
            decoded = self.vae.decode(process_out(x).to(self.vae.dtype))
            check_finite(decoded, "decoding", s, None)
            images = tensor_to_images(decoded)
        self.timings.update(timings)
        return Generation(images, prompts, negatives, seeds, s, timings, step_cache and step_cache.summary())

    def _make_room_for_sampling(self):
        """Text encoders on a GPU that is short of memory for sampling move to the CPU (and encode there from now on)."""
        device = self.text_encoders.device
        if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < SAMPLING_HEADROOM_BYTES:
            self.text_encoders.to("cpu")
            with torch.cuda.device(device):
                torch.cuda.empty_cache()

    def encode_control(self, image: Image.Image, width: int, height: int, seed: int) -> torch.Tensor:
        """Control image -> the ControlNet's control latent (1, 16, h, w) as the reference makes it (SPEC.md §8.3), the
        VAE posterior sampled from the stream seed + 2 * 2**32. Compute it once and pass it to every `generate`."""
        cn = self.controlnet
        if cn is None:
            raise FastSD35Error("a control image needs a ControlNet (--controlnet)")
        generator = torch.Generator("cpu").manual_seed(seed + (2 << 32))
        return control_latent(self.vae, image, width, height, int(cn.control_type[0]), cn.config.is_8b, generator)

    def encode_image(self, image: Image.Image, width: int, height: int, seed: int) -> torch.Tensor:
        """Init image -> latent (1, 16, h, w) float32 on the CPU: resized to the output size, VAE posterior sampled
        from a generator seeded in a stream no image's noise uses (seed + 2**32), then process_in."""
        pixels = image_to_tensor(image, width, height).to(self.device, self.vae.dtype)
        generator = torch.Generator("cpu").manual_seed(seed + (1 << 32))
        return process_in(self.vae.encode(pixels, generator).float().cpu())


def _check_preset(preset) -> Preset | None:
    if preset is None or isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        return get_preset(preset)
    raise FastSD35Error(f"preset must be a preset name ({', '.join(PRESETS)}) or a Preset, got {type(preset).__name__}")


def _check_extras(fast, graphs, controlnet, control_type, loras):
    """The loading options beside the model, checked before anything is read: (controlnet path or None, LoRAs)."""
    if not isinstance(fast, bool):
        raise FastSD35Error(f"fast must be True or False, got {fast!r}")
    check_optional_bool(graphs, "graphs")
    controlnet = None if controlnet is None else check_path(controlnet, "controlnet")
    if control_type is not None and (isinstance(control_type, bool) or not isinstance(control_type, (str, int))):
        raise FastSD35Error(f"control_type must be blur, canny or depth, got {type(control_type).__name__}")
    return controlnet, check_loras(loras, "loras")


@contextmanager
def _stage(name: str, timings: dict, device: torch.device):
    """Time a stage (synchronising CUDA so the figure is real) and turn out-of-memory into a clear user error."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # its own device
    sync()
    start = time.perf_counter()
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        doing, hint = OOM_HINTS[name]
        raise FastSD35Error(f"out of GPU memory while {doing}: {hint}") from None
    sync()
    timings[name] = time.perf_counter() - start


def on_device(device: torch.device):
    """`torch.cuda.device(device)` for a CUDA device (the current device while inside), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def check_load_options(device, dtype, t5, t5_tokens) -> tuple[torch.device, torch.dtype]:
    """The device (default: CUDA when available) and dtype (default: bf16 on CUDA, fp32 on CPU) a pipeline loads
    with, after checking them and the T5 options (FastSD35Error before anything is read)."""
    device = check_device(device) if device is not None else default_device()
    if isinstance(dtype, str) and dtype in DTYPES:  # the names --dtype takes
        dtype = "fp8" if is_fp8(DTYPES[dtype]) else DTYPES[dtype]
    if dtype is not None and not is_fp8(dtype) and not any(dtype is d for d in MODEL_DTYPES):
        raise FastSD35Error(f"dtype must be one of {', '.join(DTYPES)} or a torch dtype of those, got {dtype!r}")
    if not isinstance(t5, bool):
        raise FastSD35Error(f"t5 must be True or False, got {t5!r}")
    check("t5_tokens", t5_tokens, "t5_tokens")
    return device, dtype or default_dtype(device)


def check_finite(x: torch.Tensor, stage: str, s: Settings, control_strength: float | None):
    """FastSD35Error naming the likely cause when `x` holds NaN or inf (one reduction; nothing is written then)."""
    if bool(torch.isfinite(x).all()):
        return
    extreme = [f"{name} {value:g}" for name, value, limit in
               (("cfg", s.cfg, 30), ("shift", s.shift, 30), ("control strength", control_strength, 10))
               if value is not None and abs(value) > limit]  # fmt: skip
    cause = (f"the extreme {' and '.join(extreme)}" if extreme
             else "NaN or infinite weights in a checkpoint, or a dtype too narrow for it (try --dtype fp32)")
    raise FastSD35Error(f"{stage} produced NaN or infinite values; likely cause: {cause}. No image was written")


def use_graphs(graphs: bool | None, device: torch.device) -> bool:
    """Whether the transformer passes replay from CUDA graphs: `graphs` None means on CUDA, off elsewhere; True where
    the transformer is not on CUDA is an error."""
    on_cuda = device.type == "cuda"
    if graphs and not on_cuda:
        raise FastSD35Error(f"CUDA graphs need a CUDA device; the transformer is on {device}")
    return on_cuda and graphs is not False


def _text_encoder_device(requested: str, device: torch.device, t5: bool) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > TEXT_ENCODER_BYTES[t5] + SAMPLING_HEADROOM_BYTES else torch.device("cpu")
