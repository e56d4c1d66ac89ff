"""Loading CLIP-L, CLIP-G and T5-XXL for SD3: the official files (`clip_l.safetensors`, `clip_g.safetensors`,
`t5xxl*.safetensors`, also FP8 T5 files), diffusers `text_encoder*/` folders and `text_encoders.*` keys in a single
checkpoint, strict and one tensor at a time into models allocated on their device; tokenizers beside them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..errors import CheckpointError
from ..files import exists, is_dir, is_file
from ..models.devices import default_device, default_dtype
from ..models.strict import check_keys_and_shapes
from ..models.text_encoders import (
    ENCODERS,
    LABELS,
    T5_EMBEDDINGS,
    TextEncoders,
    allocate,
    clip_config_from_shapes,
    t5_config_from_shapes,
)
from ..models.tokenization import check_t5_tokens, find_tokenizer
from .checkpoints import TensorSource, diffusers_weight_headers, safetensors_header
from .fp8 import FP8Reader

OFFICIAL_FILES = {"clip_l": ("clip_l.safetensors",), "clip_g": ("clip_g.safetensors",),
                  "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl.safetensors")}  # then any other t5xxl*.safetensors
DIFFUSERS_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"}
SINGLE_FILE_PREFIX = "text_encoders.{}.transformer."
_CLIP_EXTRA_KEYS = ("text_model.embeddings.position_ids", "logit_scale")  # carried by some CLIP files; not weights


def load_weights(model: torch.nn.Module, source, label: str, *, defaults: Mapping[str, Callable] = {},
                 aliases: Mapping[str, str] = {}, ignore: Sequence[str] = ()):
    """Strict load, one tensor at a time. `defaults`: model key -> factory for a tensor the file may lack; `aliases`:
    model key -> another file key holding the same tensor; `ignore`: file keys that are not weights."""
    stored = source.shapes
    where = {k: k for k in stored if k not in ignore}
    where.update({k: alt for k, alt in aliases.items() if k not in where and alt in stored})
    expected = model.state_dict()
    where.update({k: None for k in defaults if k not in where and k in expected})
    shapes = {k: (stored[f] if f else tuple(expected[k].shape)) for k, f in where.items()}
    check_keys_and_shapes(model, shapes, label)
    done = set()
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in done:  # tied weights appear under two names
                done.add(id(tensor))
                tensor.copy_(source.get(where[key]) if where[key] else defaults[key]())


def load_clip(source, role: str, *, device, dtype):
    from transformers import CLIPTextModelWithProjection

    label = f"{source.label} ({LABELS[role]})"
    config = clip_config_from_shapes(source.shapes, role, label)
    model = allocate(CLIPTextModelWithProjection, config, device, dtype)
    eye = lambda: torch.eye(config.hidden_size)  # noqa: E731  the reference's default: CLIP-L files may lack it
    load_weights(model, source, label, defaults={"text_projection.weight": eye} if role == "clip_l" else {},
                 ignore=_CLIP_EXTRA_KEYS)
    return model


def load_t5(source, *, device, dtype):
    from transformers import T5EncoderModel

    label = f"{source.label} (T5-XXL)"
    model = allocate(T5EncoderModel, t5_config_from_shapes(source.shapes, label), device, dtype)
    a, b = T5_EMBEDDINGS
    load_weights(model, source, label, aliases={a: b, b: a})
    return model


# -- finding the weights -----------------------------------------------------------------------------------------


def _official_files(folder: Path, name: str) -> list[Path]:
    files = []
    for where in (folder, folder / "text_encoders"):  # the official Hub repositories keep them in text_encoders/
        files += [where / f for f in OFFICIAL_FILES[name]]
        if name == "t5xxl":
            files += [p for p in sorted(where.glob("t5xxl*.safetensors")) if p not in files]
    return [p for p in files if is_file(p)]


def find_text_encoder_weights(model_path, names: Sequence[str] = ENCODERS) -> tuple[dict[str, object], Path]:
    """Tensor sources for the named encoders and the folder to look for tokenizers in. Per encoder, the first of:
    `text_encoders.<name>.transformer.*` keys in `model_path` (when it is a file); a diffusers `text_encoder*/`
    folder; the official file (clip_l.safetensors, clip_g.safetensors, t5xxl_fp16/t5xxl/t5xxl*.safetensors) in the
    folder; `text_encoders.*` keys in another .safetensors file of the folder. Raises one CheckpointError naming all
    that is missing and where it looked."""
    path = Path(model_path)
    if not exists(path):
        raise CheckpointError(f"{path}: no such file or folder; expected a model folder or an SD3 .safetensors checkpoint")
    folder = path if is_dir(path) else path.parent
    singles = [path] if is_file(path) else []
    headers: dict[Path, dict] = {}

    def single_source(name):
        for file in singles + [p for p in sorted(folder.glob("*.safetensors")) if p not in singles]:
            if file not in headers:
                headers[file] = safetensors_header(file) if file in singles else _try_header(file)
            prefix = SINGLE_FILE_PREFIX.format(name)
            if any(k.startswith(prefix) for k in headers[file]):
                return TensorSource.from_file(file, prefix, headers[file])
        return None

    sources, missing = {}, []
    for name in names:
        diffusers = folder / DIFFUSERS_FOLDERS[name]
        official = _official_files(folder, name)
        if singles and (source := single_source(name)) is not None:
            sources[name] = source
        elif is_dir(diffusers):
            sources[name] = TensorSource(diffusers_weight_headers(diffusers, "model"), label=str(diffusers))
        elif official:
            sources[name] = TensorSource.from_file(official[0])
        elif (source := single_source(name)) is not None:
            sources[name] = source
        else:
            missing.append(name)
    if missing:
        what = " and ".join(f"{LABELS[n]} ({' or '.join(OFFICIAL_FILES[n])})" for n in missing)
        looked = (f"looked in {folder} and its text_encoders/ for those files, for {'/, '.join(DIFFUSERS_FOLDERS[n] for n in missing)}/ "
                  f"and for 'text_encoders.<name>.transformer.*' keys in its .safetensors files")
        hint = "; or pass --no-t5 to run without T5 (weaker prompt following)" if missing == ["t5xxl"] else ""
        raise CheckpointError(f"text encoder weights not found: {what}; {looked}{hint}")
    return sources, folder


def _try_header(path: Path) -> dict:
    try:
        return safetensors_header(path)
    except CheckpointError:  # a broken file that is not the one asked for: not a text-encoder source
        return {}


def load_text_encoders(model_path, *, device=None, dtype=None, t5: bool = True, t5_tokens: int = 256,
                       t5_width: int = 4096) -> TextEncoders:
    """Load CLIP-L, CLIP-G and T5-XXL (unless `t5=False`) and their tokenizers for the model at `model_path` (a
    folder with the official files, a diffusers folder, or a checkpoint with `text_encoders.*` keys; see
    `find_text_encoder_weights`). Tokenizers come from the folder's tokenizer/, tokenizer_2/, tokenizer_3/, else the
    local Hugging Face cache, else a download. Weights are read from safetensors one tensor at a time into models
    allocated on `device` (default CUDA when available) in `dtype` (default bf16 on CUDA, fp32 on CPU).
    `t5_width` is the context width used in place of T5's when `t5=False`."""
    check_t5_tokens(t5_tokens)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    names = ENCODERS if t5 else ENCODERS[:2]
    sources, folder = find_text_encoder_weights(model_path, names)
    # FP8 files (t5xxl_fp8_e4m3fn*.safetensors) are dequantized into `dtype` one tensor at a time.
    sources = {name: FP8Reader(source, device) for name, source in sources.items()}
    with ExitStack() as stack:
        for source in sources.values():
            stack.enter_context(source)
        tokenizer_l = find_tokenizer("clip", [folder / TOKENIZER_FOLDERS["clip_l"]])
        folder_g = folder / TOKENIZER_FOLDERS["clip_g"]
        tokenizer_g = find_tokenizer("clip", [folder_g]) if is_dir(folder_g) else tokenizer_l
        tokenizer_t5 = find_tokenizer("t5", [folder / TOKENIZER_FOLDERS["t5xxl"]]) if t5 else None
        clip_l = load_clip(sources["clip_l"], "clip_l", device=device, dtype=dtype)
        clip_g = load_clip(sources["clip_g"], "clip_g", device=device, dtype=dtype)
        t5_model = load_t5(sources["t5xxl"], device=device, dtype=dtype) if t5 else None
    return TextEncoders(clip_l, clip_g, t5_model, tokenizer_l, tokenizer_g, tokenizer_t5, t5_tokens=t5_tokens,
                        t5_width=None if t5 else t5_width)
