"""Reading checkpoints: official single files and diffusers folders, safetensors only.

Every problem a user can cause (a missing, truncated or non-safetensors file, weights of another model) raises
`CheckpointError` with one line naming the file, what was expected and what was found. Tensors are read one at a
time and copied straight into the model, which is allocated on the target device in the target dtype, so no second
full copy of the weights is ever held.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from ..files import exists, is_dir, is_file, open_regular
from ..models.devices import default_device, default_dtype
from ..models.mmditx import MMDiTX, MMDiTXConfig
from .loading import load_module

TRANSFORMER_PREFIX = "model.diffusion_model."
_MAX_HEADER = 100 * 1024 * 1024


# safetensors dtypes and their sizes in bytes (the format's own list).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
                      "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8, "C64": 8}  # fmt: skip
MAX_DIMS = 8
MAX_DIM = 2**31  # no tensor of any released model comes near; 0 is an empty tensor (ComfyUI's scaled_fp8 marker)
MAX_DEPTH = 128  # transformer blocks (the released models have 24 to 38)


def safetensors_header(path: Path, what: str = "checkpoint") -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking that the file is safetensors, complete and
    consistent: a JSON object of entries with a known dtype, a shape of non-negative integers and integer offsets that
    tile the data exactly (no overlap, no gap, byte counts matching the shapes), so that no crafted header can make
    anything allocate more than the file holds. The format is recognised from the header itself, so every file the
    `safetensors` library reads is accepted; zip and pickle files (PyTorch checkpoints) are named as such. Nothing
    here unpickles or executes anything from the file. `what` names the file in messages."""
    path = Path(path)
    with open_regular(path, what, CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        text = f.read(min(n, size - 8)) if 2 <= n <= _MAX_HEADER else b""
    return _parse_header(head, n, text, size, path)


def header_from_bytes(data: bytes, path: Path) -> dict[str, dict]:
    """`safetensors_header` for a file already read whole (`path` names it in messages)."""
    head = data[:8]
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    text = data[8 : 8 + min(n, len(data) - 8)] if 2 <= n <= _MAX_HEADER else b""
    return _parse_header(head, n, text, len(data), path)


def _parse_header(head: bytes, n: int, text: bytes, size: int, path: Path) -> dict[str, dict]:
    if text.lstrip()[:1] not in (b"{", b"["):  # a JSON header (an object, or the list a crafted file may hold)
        raise CheckpointError(f"{path}: {_not_safetensors(head)}; fastsd35 only reads .safetensors files")
    if 8 + n > size:
        raise CheckpointError(f"{path}: truncated: the header alone needs {8 + n} bytes but the file has {size}")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON); fastsd35 only reads .safetensors") from None
    tensors, data_end = _check_header(header, path)
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: its header describes {8 + n + data_end} bytes but the file has {size} "
            "(an interrupted download? fetch it again)"
        )
    if 8 + n + data_end < size:
        raise CheckpointError(f"{path}: {size - 8 - n - data_end} bytes after the last tensor: not a valid safetensors file")
    return tensors


def _not_safetensors(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "this is a PyTorch pickle checkpoint in a zip archive (.ckpt/.pt/.bin), not safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode and a protocol number
        return "this is a PyTorch pickle checkpoint (.ckpt/.pt/.bin), not safetensors"
    return "not a safetensors file (no valid header)"


def _check_header(header, path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries and the data size of a parsed header; CheckpointError naming the first inconsistency."""
    def bad(what):
        return CheckpointError(f"{path}: not a valid safetensors file: {what}")

    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not an object of strings")
    tensors, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(f"entry {key!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"entry {key!r} has unknown dtype {dtype!r}")
        ints = lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)  # noqa: E731
        if not ints(shape) or len(shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM for d in shape):  # 0: an empty tensor
            raise bad(f"entry {key!r} has shape {shape!r} (expected up to {MAX_DIMS} integers in [0, {MAX_DIM}])")
        if not ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise bad(f"entry {key!r} has data_offsets {offsets!r} (expected [begin, end] integers)")
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise bad(f"entry {key!r}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} bytes")
        tensors[key] = entry
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise bad(f"entry {key!r} {'overlaps the previous tensor' if begin < end else 'leaves a gap before it'}")
        end = stop
    return tensors, end


class TensorSource:
    """Named tensors from one or more safetensors files: `shapes` from the headers, `get(key)` reads one tensor."""

    def __init__(self, headers: dict[Path, dict], rename: dict[str, str] | None = None, label: str | None = None):
        # headers: file -> its safetensors header; rename: exposed key -> stored key (default: every stored key)
        self.files = {key: path for path, header in headers.items() for key in header}
        self._shapes = {key: tuple(entry["shape"]) for header in headers.values() for key, entry in header.items()}
        self._dtypes = {key: str(entry.get("dtype")) for header in headers.values() for key, entry in header.items()}
        self.rename = rename if rename is not None else {k: k for k in self.files}
        self.label = label
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    @classmethod
    def from_file(cls, path: Path, prefix: str = "", header: dict | None = None) -> "TensorSource":
        header = header if header is not None else safetensors_header(path)
        rename = {k[len(prefix) :]: k for k in header if k.startswith(prefix)}
        return cls({Path(path): header}, rename, label=str(path))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._shapes[stored] for k, stored in self.rename.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        """The safetensors dtype ("BF16", "F8_E4M3", ...) of each key, from the headers."""
        return {k: self._dtypes[stored] for k, stored in self.rename.items()}

    def get(self, key: str) -> torch.Tensor:
        stored = self.rename[key]
        path = self.files[stored]
        try:
            if path not in self._open:
                self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return self._open[path].get_tensor(stored)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # e.g. the file changed since its header was read
            raise CheckpointError(f"{path}: cannot read tensor {stored}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def close(self):
        self._stack.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# diffusers `transformer/` folders -> the official layout (SPEC.md §4), our own mapping.

_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
_DIFFUSERS_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.norm_q": ("x_block.attn.ln_q", None),
    "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None),
    "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn2.norm_q": ("x_block.attn2.ln_q", None),
    "attn2.norm_k": ("x_block.attn2.ln_k", None),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),  # halves swapped in the last block
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


class StateDictSource:
    """An in-memory state dict seen as a TensorSource (`shapes`, `get`, `label`, `close`)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state dict"):
        self.state_dict, self.label = state_dict, label

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.state_dict[key]

    def close(self):
        pass


class DiffusersTransformerSource:
    """A diffusers `SD3Transformer2DModel`'s tensors seen through the official key layout: q/k/v are concatenated into
    qkv and the (scale, shift) halves of the last context block and the final layer are swapped to (shift, scale).

    `raw` holds the diffusers-named tensors: a TensorSource over a diffusers folder (`from_folder`), a
    `StateDictSource` over a module's state dict (`from_state_dict`), or anything with `shapes`, `get` and `close`.
    `recipes` says which diffusers tensors make each official one; `unmapped` lists the diffusers keys that are not
    part of an SD3/SD3.5 transformer."""

    def __init__(self, raw, label: str | None = None):
        self.raw = raw
        self.label = label or raw.label
        raw_shapes = raw.shapes
        self.raw_shapes = raw_shapes
        blocks = [int(m.group(1)) for k in raw_shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
        last = max(blocks, default=-1)
        self.recipes: dict[str, list] = {}  # official key -> [(diffusers key, qkv part or None, swap)]
        self.unmapped = []
        for key in raw_shapes:
            official = self._map(key, last)
            if official is None:
                self.unmapped.append(key)
                continue
            target, part, swap = official
            self.recipes.setdefault(target, []).append((key, part, swap))
        for parts in self.recipes.values():
            parts.sort(key=lambda r: -1 if r[1] is None else r[1])

    @classmethod
    def from_folder(cls, folder: Path) -> "DiffusersTransformerSource":
        return cls(TensorSource(diffusers_weight_headers(folder), label=str(folder)), label=str(folder))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], label: str = "state dict") -> "DiffusersTransformerSource":
        """Over an in-memory diffusers state dict (e.g. `SD3Transformer2DModel.state_dict()`): no tensor is copied
        except where the layout needs it (qkv concatenation, swapped halves)."""
        return cls(StateDictSource(state_dict, label), label=label)

    def check_mapped(self):
        """CheckpointError unless every diffusers key belongs to an SD3/SD3.5 transformer."""
        if self.unmapped:
            raise CheckpointError(
                f"{self.label}: unexpected diffusers keys {', '.join(self.unmapped[:4])}"
                f"{' ...' if len(self.unmapped) > 4 else ''}: not an SD3/SD3.5 transformer"
            )

    @staticmethod
    def _map(key: str, last: int):
        stem, _, leaf = key.rpartition(".")
        if stem in _DIFFUSERS_TOP:
            return f"{_DIFFUSERS_TOP[stem]}.{leaf}", None, stem == "norm_out.linear"
        if key == "pos_embed.pos_embed":
            return "pos_embed", None, False
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", stem)
        if m and m.group(2) in _DIFFUSERS_BLOCK:
            i = int(m.group(1))
            target, part = _DIFFUSERS_BLOCK[m.group(2)]
            swap = m.group(2) == "norm1_context.linear" and i == last
            return f"joint_blocks.{i}.{target}.{leaf}", part, swap
        return None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for target, parts in self.recipes.items():
            first = self.raw_shapes[parts[0][0]]
            rows = sum(self.raw_shapes[k][0] for k, _, _ in parts)
            shapes[target] = (rows, *first[1:])
        return shapes

    def get(self, key: str) -> torch.Tensor:
        parts = self.recipes[key]
        tensors = [self.raw.get(k) for k, _, _ in parts]
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return _swap_halves(t) if parts[0][2] else t

    def close(self):
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def diffusers_weight_headers(folder: Path, stem: str = "diffusion_pytorch_model") -> dict[Path, dict]:
    """The safetensors headers of a diffusers model folder's weight files (one file, or shards with an index).
    `stem` is the weight file name without extension: diffusers models use the default, transformers models `model`."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if is_file(index):
        try:
            with open_regular(index, "shard index", CheckpointError) as f:
                weight_map = json.loads(f.read(_MAX_HEADER + 1))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors") and Path(v).name == v
            for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to .safetensors file names in this folder")
        shards = sorted({folder / name for name in weight_map.values()})
        for path in shards:
            if not is_file(path):
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
        return {path: safetensors_header(path) for path in shards}
    if is_file(single):
        return {single: safetensors_header(single)}
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights found ({', '.join(pickles)}); fastsd35 only reads .safetensors")
    raise CheckpointError(
        f"{folder}: no diffusers weights: expected {stem}.safetensors or a sharded {stem}.safetensors.index.json"
    )


def diffusers_component_folder(path: Path, component: str) -> Path:
    """The folder of diffusers component `component` ("transformer", "vae"): `path/component` when `path` is a pipeline
    folder, else `path` itself, which must then be a diffusers model folder (CheckpointError otherwise)."""
    folder = path / component if is_dir(path / component) else path
    if not is_file(folder / "config.json") and not any(folder.glob("diffusion_pytorch_model*")):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"{path}: not a diffusers model folder (expected {component}/ with diffusion_pytorch_model*.safetensors); "
            f"found: {found}. For official files, pass the .safetensors checkpoint itself"
        )
    return folder


# ----------------------------------------------------------------------------------------------------------------


def open_transformer(path) -> TensorSource | DiffusersTransformerSource:
    """The transformer tensors at `path`, in the official layout: an official single file (`model.diffusion_model.*`,
    other prefixes ignored), a bare transformer state dict file, a diffusers model folder or its `transformer/`."""
    path = Path(path)
    if is_dir(path):
        return DiffusersTransformerSource.from_folder(diffusers_component_folder(path, "transformer"))
    if not exists(path):
        raise CheckpointError(f"{path}: no such file or folder; expected an SD3/SD3.5 .safetensors checkpoint or a diffusers folder")
    keys = safetensors_header(path)
    if any(k.startswith(TRANSFORMER_PREFIX) for k in keys):
        return TensorSource.from_file(path, TRANSFORMER_PREFIX, keys)
    if "x_embedder.proj.weight" in keys:
        return TensorSource.from_file(path, "", keys)
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    raise CheckpointError(
        f"{path}: no transformer weights (expected keys '{TRANSFORMER_PREFIX}*'); found {len(keys)} tensors such as {sample}"
    )


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of a model lives: a checkpoint file or a diffusers folder."""

    transformer: Path
    vae: Path
    text_encoders: Path  # a checkpoint file (its text_encoders.* keys, then its folder) or a folder


def find_model_files(model, preset) -> ModelFiles:
    """Resolve `model` (an official single file, a folder laid out as the official release, or a diffusers
    folder) for `preset` (a presets.Preset): the official folder must hold one of the preset's checkpoint names."""
    path = Path(model)
    if is_file(path):
        return ModelFiles(path, path, path)
    if not is_dir(path):
        raise CheckpointError(
            f"{path}: no such file or folder; expected a folder with {' or '.join(preset.checkpoints) or 'the checkpoint'} "
            "(and clip_g.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors), a checkpoint file, or a diffusers folder"
        )
    if is_file(path / "model_index.json") or is_dir(path / "transformer"):
        return ModelFiles(path, path, path)
    for name in preset.checkpoints:
        if is_file(path / name):
            return ModelFiles(path / name, path / name, path / name)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(
        f"{path}: no checkpoint for preset '{preset.name}': expected {' or '.join(preset.checkpoints)}; "
        f"found {', '.join(found) if found else 'no .safetensors files'}"
    )


def transformer_config(path) -> MMDiTXConfig:
    """The transformer config at `path`, read from tensor shapes in the headers alone (no weights loaded)."""
    with open_transformer(path) as source:
        return _config_from_shapes(source)


def _config_from_shapes(source) -> MMDiTXConfig:
    """The config the shapes imply, refused unless the blocks it implies are exactly the blocks the header holds
    (so a crafted shape cannot imply a model far larger than the file)."""
    shapes = source.shapes
    try:
        config = MMDiTXConfig.from_shapes(shapes, source=source.label)
    except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source.label}: not an SD3 transformer: unexpected tensor shapes ({e})") from None
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if config.depth > MAX_DEPTH or blocks != set(range(config.depth)):
        raise CheckpointError(f"{source.label}: its shapes imply {config.depth} transformer blocks but it holds "
                              f"{len(blocks)}: not a consistent SD3 transformer")
    return config


def load_transformer(path, *, dtype=None, device=None, model_cls: type[MMDiTX] = MMDiTX) -> MMDiTX:
    """Load an SD3/SD3.5 transformer from an official single file, a bare transformer file or a diffusers folder.

    The config (depth, qk-norm, MMDiT-X layers, position table) is inferred from the tensors; `model.config.variant`
    names the model ("sd3_medium", "sd3.5_medium", "sd3.5_large" or "custom"). The model is allocated on `device`
    (default: CUDA when available) in `dtype` (default: bf16 on CUDA, fp32 on CPU) and filled one tensor at a time.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    with open_transformer(path) as source:
        if isinstance(source, DiffusersTransformerSource):
            source.check_mapped()
        config = _config_from_shapes(source)
        return load_module(model_cls, config, source, dtype=dtype, device=device)


__all__ = [
    "TRANSFORMER_PREFIX",
    "DiffusersTransformerSource",
    "StateDictSource",
    "ModelFiles",
    "find_model_files",
    "TensorSource",
    "diffusers_component_folder",
    "diffusers_weight_headers",
    "load_transformer",
    "open_transformer",
    "transformer_config",
    "safetensors_header",
]
