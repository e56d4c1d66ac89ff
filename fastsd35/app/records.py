"""The settings record a PNG carries (`fastsd35 run --from-png`): its schema, checked with the same value checks as
the command line (fastsd35.pipeline.inputs), and the content hashes that make sure a record never silently reproduces a
different image.

Files are stored as absolute paths, and images with the SHA-256 of their bytes, checked when the record is used. A
record with a key this version does not know is refused (it may change the image); a new option registers its key in
RECORD_KEYS (a checker for its value) and, for a file, stores the file's hash the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from ..errors import FastSD35Error
from ..pipeline.inputs import check, shown


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _field(name: str) -> Callable[[Any, str], Any]:
    return lambda value, label: check(name, value, label)


def _string(value, label):
    if not isinstance(value, str):
        raise FastSD35Error(f"{label} must be a string, got {value!r}")
    return value


def _digest(value, label):
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise FastSD35Error(f"{label} must be a SHA-256 hex digest, got {value!r}")
    return value


def _object(keys: dict[str, Callable], required: tuple[str, ...] = ()):
    def checker(value, label):
        if not isinstance(value, dict):
            raise FastSD35Error(f"{label} must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise FastSD35Error(f"{label} has fields this fastsd35 version does not know: {', '.join(unknown)} "
                                "(written by a newer version?)")
        for key in required:
            if value.get(key) is None:
                raise FastSD35Error(f"{label} has no {key}")
        for key, item in value.items():
            if item is not None:
                keys[key](item, f"{label}.{key}")
        return value

    return checker


def _layers(value, label):
    if not (isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
        raise FastSD35Error(f"{label} must be a list of block numbers, got {value!r}")
    return value


_SLG = _object({"scale": _field("slg_scale"), "start": _field("slg_start"), "end": _field("slg_end"),
                "layers": _layers, "cfg": _field("cfg")}, required=("scale", "start", "end", "layers", "cfg"))
_CONTROL = _object(
    {"controlnet": _string, "control_type": _string, "control_image": _string, "control_image_sha256": _digest,
     "preprocess": lambda v, label: check("control_preprocess", v, label), "strength": _field("control_strength"),
     "options": _object({"low": _field("canny_low"), "high": _field("canny_high"), "radius": _field("blur_radius")})},
    required=("controlnet", "control_image", "strength"),
)  # fmt: skip

_LORA = _object({"file": _string, "scale": _field("lora_scale"), "sha256": _digest}, required=("file", "scale"))


def _loras(value, label):
    if not isinstance(value, list):
        raise FastSD35Error(f"{label} must be a list of {{file, scale}} objects, got {type(value).__name__}")
    for i, item in enumerate(value):
        _LORA(item, f"{label}[{i}]")
    return value


def _schedule(value, label):
    if not (isinstance(value, str) and value and set(value) <= {"C", "R"}):
        raise FastSD35Error(f"{label} must be a string of C and R, got {shown(value)}")
    return value


def _count(value, label):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 32:
        raise FastSD35Error(f"{label} must be a whole number, got {shown(value)}")
    return value


_CACHE = _object({"threshold": _field("cache_threshold"), "warmup": _field("cache_warmup"),
                  "max_skip": _field("cache_max_skip"), "blocks": _field("cache_blocks"),
                  "extrapolate": _field("cache_extrapolate"), "schedule": _schedule, "passes": _count,
                  "computed": _count},
                 required=("threshold", "warmup", "max_skip", "blocks", "extrapolate", "schedule"))  # fmt: skip


# Every key a record may hold, with the check of its value (None always means "not set").
RECORD_KEYS: dict[str, Callable[[Any, str], Any]] = {
    **{name: _field(name) for name in ("preset", "model", "prompt", "negative_prompt", "seed", "steps", "cfg", "shift",
                                       "sampler", "width", "height", "denoise", "dtype", "t5_tokens", "no_t5",
                                       "cfg_parallel")},
    "fastsd35_version": _string,
    "backend": _string,
    "slg": _SLG,
    "init_image": _string,
    "init_image_sha256": _digest,
    "controlnet": _CONTROL,
    "loras": _loras,
    "cache": _CACHE,
}


def check_record(record, source) -> dict:
    """The record, after checking its shape and every value (FastSD35Error naming the PNG and the field)."""
    _object(RECORD_KEYS, required=("prompt",))(record, f"{source}: the record")
    return record


def check_same_file(data: bytes, expected: str | None, path: Path, what: str, flag: str):
    """The file a record names must still be the one it was made with."""
    if expected is not None and sha256(data) != expected:
        raise FastSD35Error(f"{what} {path} is not the file the PNG was made with (its SHA-256 differs): pass {flag} "
                            "to use it anyway")

