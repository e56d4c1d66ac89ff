"""What a run may be asked for: the documented limits and one check per value, shared by every front end (the
command line, `--from-png` records, the Python API, the HTTP server) through the job schema (fastsd35.app.jobs) and
by `Pipeline` itself; and user images, read within the pixel limit (files: fastsd35.files).

Every check raises FastSD35Error with one line naming the value, what is allowed and what was given. A new option
adds a `Field` to FIELDS (and, if it is stored in PNG records, its key to RECORD_KEYS) and is then checked the same
way everywhere.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import FastSD35Error
from ..files import read_user_file
from ..models.fp8 import FP8_DTYPE
from .sampling import SAMPLERS

# -- documented limits (README "Limits") --------------------------------------------------------------------------

MAX_STEPS = 1000  # the reference's sigma table has 1000 entries
MAX_BATCH = 64
MAX_SEED = 2**63 - 1  # seed, seed + image index and seed + 2**33 (VAE streams) all stay within the generator's uint64
MAX_PROMPTS = 10_000  # prompts in one run
MAX_PROMPT_CHARS = 20_000  # T5 reads at most 512 tokens; CLIP 75
MAX_PROMPTS_FILE_BYTES = 1 << 20
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # init and control images (8192 x 8192)
MAX_IMAGE_FILE_BYTES = 512 << 20
MAX_PNG_FILE_BYTES = 512 << 20  # --from-png
DEVICE_TYPES = ("cpu", "cuda")
# The precisions a run may ask for by name (`--dtype`, records, `dtype=`): fp8 is the transformer's block Linears in
# FP8 (fastsd35.models.fp8), everything else at the device's default.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": FP8_DTYPE}


@dataclass(frozen=True)
class Field:
    """One user-settable value: its type (int, float, str or bool), an inclusive range, and allowed choices."""

    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    low_open: bool = False  # low itself is excluded

    def describe(self) -> str:
        kind = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[self.kind]
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        low, high = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return kind


FIELDS: dict[str, Field] = {
    "prompt": Field(str),
    "negative_prompt": Field(str),
    "seed": Field(int, 0, MAX_SEED),
    "batch_size": Field(int, 1, MAX_BATCH),
    "steps": Field(int, 1, MAX_STEPS),
    "cfg": Field(float, 0),
    "shift": Field(float, 0, low_open=True),
    "sampler": Field(str, choices=SAMPLERS),
    "width": Field(int),  # multiples of 16 within the model's position table: Settings.check
    "height": Field(int),
    "denoise": Field(float, 0, 1, low_open=True),
    "t5_tokens": Field(int, 77, 512),  # tokenization.T5_MIN_LENGTH, T5_MAX_TOKENS
    "no_t5": Field(bool),
    "cfg_parallel": Field(bool),
    "dtype": Field(str, choices=tuple(DTYPES)),
    "preset": Field(str),
    "model": Field(str),
    "control_strength": Field(float),
    "lora_scale": Field(float),
    "dist_timeout": Field(float, 0, 7 * 24 * 3600, low_open=True),  # distributed.MAX_TIMEOUT_S
    "cache": Field(str, choices=("off", "on")),
    "cache_threshold": Field(float, 0),
    "cache_warmup": Field(int, 0, MAX_STEPS),
    "cache_max_skip": Field(int, 0, MAX_STEPS),
    "cache_blocks": Field(int, 1, 127),
    "cache_extrapolate": Field(bool),
    "control_preprocess": Field(str, choices=("canny", "blur", "depth")),
    "canny_low": Field(float, 0),
    "canny_high": Field(float, 0),
    "blur_radius": Field(float, 0),
    "slg_scale": Field(float),
    "slg_start": Field(float, 0, 1),
    "slg_end": Field(float, 0, 1),
}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """`value` if it is a valid `name` (see FIELDS), else FastSD35Error. bool is never taken for a number, a float
    never for an integer, and a number never for a string. Floats come back as float."""
    f = FIELDS[name]
    label = label or name.replace("_", " ")
    if f.kind is bool:
        ok = isinstance(value, bool)
    elif f.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif f.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    else:
        ok = isinstance(value, str)
    if ok and f.choices is not None:
        ok = value in f.choices
    if ok and f.low is not None:
        ok = value > f.low if f.low_open else value >= f.low
    if ok and f.high is not None:
        ok = value <= f.high
    if not ok:
        raise FastSD35Error(f"{label} must be {f.describe()}, got {shown(value)}")
    return float(value) if f.kind is float else value


def _finite(value) -> bool:
    """Finite as a float: an int beyond float's range is not (math.isfinite would raise OverflowError on it)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_path(value, label: str) -> Path:
    """A path argument: a str or os.PathLike, not empty; FastSD35Error for anything else (None, numbers, bytes)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise FastSD35Error(f"{label} must be a path (a str or Path, not empty, without NUL bytes), got {shown(value)}")
    return Path(value)


def check_optional_bool(value, label: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise FastSD35Error(f"{label} must be True, False or None, got {shown(value)}")
    return value


def check_loras(loras, label: str = "loras") -> list[tuple[Path, float, str | None]]:
    """LoRAs for the Python API: a list or tuple of (path, scale) or (path, scale, expected SHA-256) items."""
    from ..weights.lora import check_scale  # the LoRA scale's own check

    if not isinstance(loras, (list, tuple)):
        raise FastSD35Error(f"{label} must be a list of (path, scale) pairs, got {shown(loras)}")
    checked = []
    for i, item in enumerate(loras):
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise FastSD35Error(f"{label}[{i}] must be a (path, scale) pair, got {shown(item)}")
        path = check_path(item[0], f"{label}[{i}]'s path")
        scale = check_scale(item[1], f"{label}[{i}] ({path})")
        digest = item[2] if len(item) == 3 else None
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            raise FastSD35Error(f"{label}[{i}]'s SHA-256 must be 64 hex digits, got {shown(digest)}")
        checked.append((path, scale, digest))
    return checked


def shown(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a message stays one readable line whatever was given."""
    text = repr(value) if not isinstance(value, type) else value.__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_prompts(prompts, label: str = "prompt") -> list[str]:
    """A list of prompt strings within the limits (a single string is one prompt)."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)):
        raise FastSD35Error(f"{label} must be a string or a list of strings, got {type(prompts).__name__}")
    if len(items) > MAX_PROMPTS:
        raise FastSD35Error(f"{len(items)} prompts in one run; the limit is {MAX_PROMPTS}")
    for p in items:
        check("prompt", p, label)
        if len(p) > MAX_PROMPT_CHARS:
            raise FastSD35Error(f"a {label} of {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
    return list(items)


def check_device(requested, label: str = "device") -> torch.device:
    """A cpu or cuda device that exists here (cuda:N with N below the device count), named by a string, an int (a
    CUDA index, as torch takes it) or a torch.device."""
    if isinstance(requested, bool) or not isinstance(requested, (str, int, torch.device)):
        raise FastSD35Error(f"unknown {label} {shown(requested)}: use cuda, cuda:N or cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise FastSD35Error(f"unknown {label} {shown(requested)}: use cuda, cuda:N or cpu") from None
    if device.type not in DEVICE_TYPES:
        raise FastSD35Error(f"{label} {shown(requested)} is not supported: use cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastSD35Error(f"{label} {shown(requested)} asked for CUDA, which is not available here: use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FastSD35Error(f"{label} {shown(requested)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# -- user images --------------------------------------------------------------------------------------------------


def open_image(path, what: str) -> Image.Image:
    """An RGB image from a regular file of at most MAX_IMAGE_PIXELS pixels (checked from the header, before the
    pixels are decoded)."""
    return image_from_bytes(read_user_file(path, what, MAX_IMAGE_FILE_BYTES), path, what)


def image_from_bytes(data: bytes, path, what: str) -> Image.Image:
    """`open_image` for bytes already read (`read_user_file(path, what, MAX_IMAGE_FILE_BYTES)`)."""
    try:
        with warnings.catch_warnings():  # our own, lower limit applies below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise FastSD35Error(f"{what} {path} is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FastSD35Error(f"cannot read {what} {path}: {e}") from None


def check_image(image, label: str) -> Image.Image:
    """The Python API's image arguments: a PIL image within the pixel limit."""
    if isinstance(image, (str, Path)):
        raise FastSD35Error(f"{label} must be a PIL.Image.Image, got the path {str(image)!r}: open it with "
                            "PIL.Image.open (or fastsd35.pipeline.inputs.open_image)")
    if not isinstance(image, Image.Image):
        raise FastSD35Error(f"{label} must be a PIL.Image.Image, got {type(image).__name__}")
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise FastSD35Error(f"{label} is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
    return image


def check_values(values: dict, label=lambda name: name.replace("_", " ")) -> dict:
    """Check every value of `values` whose name is in FIELDS and that is not None (None: absent, the default
    applies); `label(name)` names it in the message ("--steps", "the record's steps")."""
    return {k: v if v is None or k not in FIELDS else check(k, v, label(k)) for k, v in values.items()}
