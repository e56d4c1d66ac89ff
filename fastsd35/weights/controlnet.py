"""Loading SD3.5 ControlNets: the released files (official keys, `control_type` tensor), diffusers SD3ControlNetModel
weight files and folders mapped to the official names by our own mapping; safetensors only, strict."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import CheckpointError
from ..files import exists, is_dir
from ..models.controlnet import CONTROL_TYPES, ControlNet, ControlNetConfig, control_type_id
from ..models.devices import default_device, default_dtype
from .checkpoints import TensorSource, diffusers_component_folder, diffusers_weight_headers, safetensors_header
from .loading import load_module

_DIFFUSERS_BLOCK = {  # diffusers SD3SingleTransformerBlock part -> (official part, position in qkv)
    "norm1.linear": ("adaLN_modulation.1", 0),
    "attn.to_q": ("attn.qkv", 0),
    "attn.to_k": ("attn.qkv", 1),
    "attn.to_v": ("attn.qkv", 2),
    "attn.to_out.0": ("attn.proj", 0),
    "ff.net.0.proj": ("mlp.fc1", 0),
    "ff.net.2": ("mlp.fc2", 0),
}
_DIFFUSERS_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")


def _official_name(key: str) -> tuple[str, int]:
    """(official name, position in a concatenation) of a diffusers SD3ControlNetModel key. The embedders,
    controlnet_blocks and pos_embed_input already have their official names in diffusers."""
    m = _DIFFUSERS_BLOCK_RE.fullmatch(key)
    if m and m[2] in _DIFFUSERS_BLOCK:
        part, position = _DIFFUSERS_BLOCK[m[2]]
        return f"transformer_blocks.{m[1]}.{part}.{m[3]}", position
    return key, 0


class DiffusersControlNetSource(TensorSource):
    """A diffusers SD3ControlNetModel's tensors under their official names: our own mapping, the inverse of diffusers'
    convert_sd3_controlnet_to_diffusers.py (to_q/to_k/to_v concatenated into qkv; block parts renamed). Keys it does not
    know keep their names, so the strict load reports them."""

    def __init__(self, headers: dict[Path, dict], label: str):
        super().__init__(headers, label=label)
        parts: dict[str, list[tuple[int, str]]] = {}
        for key in self.rename:
            name, position = _official_name(key)
            parts.setdefault(name, []).append((position, key))
        self.parts = {name: [key for _, key in sorted(p)] for name, p in parts.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        raw = super().shapes
        return {name: (sum(raw[k][0] for k in keys), *raw[keys[0]][1:]) for name, keys in self.parts.items()}

    def get(self, key: str) -> torch.Tensor:
        tensors = [TensorSource.get(self, k) for k in self.parts[key]]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def open_controlnet(path) -> TensorSource:
    """The ControlNet tensors at `path` in the official layout: a released file (keys without prefix), a diffusers
    SD3ControlNetModel weight file, or a diffusers folder (the model folder or a pipeline's `controlnet/`)."""
    path = Path(path)
    if is_dir(path):
        folder = diffusers_component_folder(path, "controlnet")
        return DiffusersControlNetSource(diffusers_weight_headers(folder), label=str(folder))
    if not exists(path):
        raise CheckpointError(
            f"{path}: no such file or folder; expected an SD3.5 ControlNet .safetensors file or a diffusers folder"
        )
    header = safetensors_header(path)
    if any(re.fullmatch(r"transformer_blocks\.\d+\.attn\.to_q\.weight", k) for k in header):
        return DiffusersControlNetSource({path: header}, label=str(path))
    if any(k.startswith(("transformer_blocks.", "controlnet_blocks.", "pos_embed_input.")) for k in header):
        return TensorSource.from_file(path, "", header)
    sample = ", ".join(sorted(header)[:3]) or "no tensors at all"
    raise CheckpointError(
        f"{path}: no ControlNet weights (expected keys 'transformer_blocks.*', 'controlnet_blocks.*', "
        f"'pos_embed_input.*'); found {len(header)} tensors such as {sample}"
    )


def _stored_control_type(source: TensorSource, shapes: dict, label: str) -> int | None:
    if "control_type" not in shapes:
        return None
    value = source.get("control_type").reshape(-1)
    if value.numel() != 1 or float(value[0]) not in CONTROL_TYPES:
        shown = value.tolist() if value.numel() < 5 else f"{value.numel()} values"
        raise CheckpointError(f"{label}: control_type holds {shown}; expected one of {CONTROL_TYPES} (id: type)")
    return int(value[0])


def load_controlnet(path, *, control_type: int | str | None = None, dtype=None, device=None) -> ControlNet:
    """Load an SD3.5 ControlNet from a released file, a diffusers weight file or a diffusers folder.

    The control type comes from the file's `control_type` tensor. diffusers folders have none: pass `control_type`
    ("blur", "canny", "depth" or 0, 1, 2); one that contradicts the file is an error. The model is allocated on
    `device` (default: CUDA when available) in `dtype` (default: bf16 on CUDA, fp32 on CPU). An 8B file's
    `pos_embed.proj.*`, if present, is ignored: the reference loads it into a patch embedding it never uses.
    Mismatches raise CheckpointError; pair it with a transformer through `check_compatible`."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    wanted = None if control_type is None else control_type_id(control_type)
    with open_controlnet(path) as source:
        shapes = dict(source.shapes)
        config = ControlNetConfig.from_shapes(shapes, source=source.label)
        stored = _stored_control_type(source, shapes, source.label)
        if stored is None and wanted is None:
            raise CheckpointError(
                f"{source.label}: does not record its control type (no 'control_type' tensor, as in diffusers folders): "
                f"pass control_type ({', '.join(CONTROL_TYPES.values())})"
            )
        if stored is not None and wanted is not None and stored != wanted:
            raise CheckpointError(
                f"{source.label}: holds a {CONTROL_TYPES[stored]} ControlNet, but control type "
                f"{CONTROL_TYPES[wanted]} was asked for"
            )
        kind = stored if stored is not None else wanted
        if config.is_8b:
            shapes = {k: s for k, s in shapes.items() if not k.startswith("pos_embed.proj.")}
        shapes["control_type"] = (1,)

        def get(key):
            return torch.tensor([kind], dtype=torch.int32) if key == "control_type" else source.get(key)

        model = load_module(ControlNet, config, SimpleNamespace(shapes=shapes, get=get, label=source.label),
                            dtype=dtype, device=device)
        model.source = source.label
    return model
