"""Reading checkpoints: official single files and diffusers folders, safetensors only.

Every problem a user can cause (a missing, truncated or non-safetensors file, weights of another model) raises
`CheckpointError` with one line naming the file, what was expected and what was found. Tensors are read one at a
time and copied straight into the model, which is allocated on the target device in the target dtype, so no second
full copy of the weights is ever held.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .model import MMDiTX, MMDiTXConfig
from .weights import load_module

TRANSFORMER_PREFIX = "model.diffusion_model."
_MAX_HEADER = 100 * 1024 * 1024


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (DESIGN.md "Precision and memory")."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking that the file is safetensors and complete.
    Nothing here unpickles or executes anything from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: this is a PyTorch pickle checkpoint (.ckpt/.pt/.bin); fastsd35 only reads .safetensors files"
            )
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= n <= _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (no valid header); fastsd35 only reads .safetensors")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header alone needs {8 + n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header); fastsd35 only reads .safetensors") from None
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: its header describes {8 + n + data_end} bytes but the file has {size} "
            "(an interrupted download? fetch it again)"
        )
    return tensors


class TensorSource:
    """Named tensors from one or more safetensors files: `shapes` from the headers, `get(key)` reads one tensor."""

    def __init__(self, headers: dict[Path, dict], rename: dict[str, str] | None = None, label: str | None = None):
        # headers: file -> its safetensors header; rename: exposed key -> stored key (default: every stored key)
        self.files = {key: path for path, header in headers.items() for key in header}
        self._shapes = {key: tuple(entry["shape"]) for header in headers.values() for key, entry in header.items()}
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

    def get(self, key: str) -> torch.Tensor:
        stored = self.rename[key]
        path = self.files[stored]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return self._open[path].get_tensor(stored)

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
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        shards = sorted({folder / name for name in weight_map.values()})
        for path in shards:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
        return {path: safetensors_header(path) for path in shards}
    if single.is_file():
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
    folder = path / component if (path / component).is_dir() else path
    if not (folder / "config.json").is_file() and not any(folder.glob("diffusion_pytorch_model*")):
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
    if path.is_dir():
        return DiffusersTransformerSource.from_folder(diffusers_component_folder(path, "transformer"))
    if not path.exists():
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
    if path.is_file():
        return ModelFiles(path, path, path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such file or folder; expected a folder with {' or '.join(preset.checkpoints) or 'the checkpoint'} "
            "(and clip_g.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors), a checkpoint file, or a diffusers folder"
        )
    if (path / "model_index.json").is_file() or (path / "transformer").is_dir():
        return ModelFiles(path, path, path)
    for name in preset.checkpoints:
        if (path / name).is_file():
            return ModelFiles(path / name, path / name, path / name)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(
        f"{path}: no checkpoint for preset '{preset.name}': expected {' or '.join(preset.checkpoints)}; "
        f"found {', '.join(found) if found else 'no .safetensors files'}"
    )


def transformer_config(path) -> MMDiTXConfig:
    """The transformer config at `path`, read from tensor shapes in the headers alone (no weights loaded)."""
    with open_transformer(path) as source:
        return MMDiTXConfig.from_shapes(source.shapes, source=source.label)


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
        config = MMDiTXConfig.from_shapes(source.shapes, source=source.label)
        return load_module(model_cls, config, source, dtype=dtype, device=device)


__all__ = [
    "TRANSFORMER_PREFIX",
    "DiffusersTransformerSource",
    "StateDictSource",
    "ModelFiles",
    "find_model_files",
    "TensorSource",
    "default_device",
    "default_dtype",
    "diffusers_component_folder",
    "diffusers_weight_headers",
    "load_transformer",
    "open_transformer",
    "transformer_config",
    "safetensors_header",
]
