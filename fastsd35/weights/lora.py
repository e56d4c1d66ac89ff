"""LoRA files fused into the transformer's weights, once, at load: W += scale * (alpha / rank) * up @ down.

Two layouts are read (safetensors only):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` (down), `.lora_B.weight` (up), optional `.alpha`;
  the diffusers module names are mapped to the official layout by `checkpoints.DiffusersTransformerSource` (q/k/v go
  into their rows of qkv; the (scale, shift) halves of the last context block and of the final layer are swapped).
- kohya / ComfyUI: `lora_unet_<official module, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (e.g. `lora_unet_joint_blocks_3_x_block_attn_qkv`).
Text-encoder LoRA weights (`lora_te*`, `text_encoder*`) are refused with a clear error: fastsd35 applies transformer
LoRAs only. The whole file is checked (keys, pairs, shapes) before any weight changes, so a bad LoRA leaves the model
as it was. The sum is done in fp32 and rounded once into the weight's dtype; fuse before any quantization (FP8).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import FastSD35Error
from .checkpoints import DiffusersTransformerSource, safetensors_header

_PAIR = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
_DOWN, _UP = ("lora_A", "lora_down"), ("lora_B", "lora_up")
_TEXT_ENCODER = ("lora_te", "text_encoder")
# Official module names that hold underscores, protected while the kohya name's underscores become dots.
_OFFICIAL_WORDS = ("joint_blocks", "context_block", "x_block", "adaLN_modulation", "final_layer", "x_embedder",
                   "context_embedder", "t_embedder", "y_embedder")  # fmt: skip


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` (scale default 1.0) -> (path, scale). A path that exists as given is taken whole (it may hold
    a colon); otherwise the part after the last colon is the scale, which must be a finite number."""
    if Path(text).exists() or ":" not in text:
        return Path(text), 1.0
    path, _, scale = text.rpartition(":")
    return Path(path), check_scale(scale, f"--lora {text}")


def check_scale(scale, what: str = "LoRA") -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, bool) or not math.isfinite(value):
        raise FastSD35Error(f"{what}: the scale must be a finite number, got {scale!r}")
    return value


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: which official weight it changes, and where."""

    key: str  # the file's module name, for messages
    down: str  # tensor names in the file
    up: str
    alpha: str | None
    target: str  # official weight key, e.g. joint_blocks.0.x_block.attn.qkv.weight
    part: int | None  # q/k/v third of a qkv weight (diffusers layout), else None
    swap: bool  # (scale, shift) halves swapped (diffusers layout)


def lora_layers(path, depth: int | None = None) -> list[LoraLayer]:
    """The layers of a LoRA file, read from its header alone (no tensor loaded). `depth` (the transformer's) is needed
    for the diffusers layout's swapped last block; None only checks the keys. FastSD35Error for a missing or
    non-safetensors file, a file with no LoRA keys, text-encoder keys, keys that match nothing, incomplete pairs."""
    path = Path(path)
    header = safetensors_header(path)
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for name in header:
        if m := _PAIR.fullmatch(name):
            kind = "down" if m["kind"] in _DOWN else "up"
            modules.setdefault(m["module"], {})[kind] = name
        elif m := _ALPHA.fullmatch(name):
            modules.setdefault(m["module"], {})["alpha"] = name
        else:
            unknown.append(name)
    pairs = {k: v for k, v in modules.items() if "down" in v or "up" in v}
    if not pairs:
        found = ", ".join(sorted(header)[:3]) or "no tensors"
        raise FastSD35Error(f"{path}: no LoRA weights (expected *.lora_A/lora_B.weight or *.lora_down/lora_up.weight "
                            f"keys); found {found}")
    text = sorted(k for k in pairs if k.startswith(_TEXT_ENCODER))
    if text:
        raise FastSD35Error(f"{path}: has {len(text)} text-encoder LoRA layers (e.g. {text[0]}): fastsd35 applies "
                            "transformer LoRAs only; use a transformer-only LoRA file")
    if unknown:
        raise FastSD35Error(f"{path}: key {sorted(unknown)[0]} is not a LoRA weight (lora_A/lora_B, lora_down/lora_up "
                            "or alpha): unsupported LoRA variant")
    layers = []
    for module in sorted(modules):
        names = modules[module]
        if "down" not in names or "up" not in names:
            missing = "lora_down/lora_A" if "down" not in names else "lora_up/lora_B"
            raise FastSD35Error(f"{path}: LoRA layer {module} has no {missing} weight")
        target = _official_target(module, depth)
        if target is None:
            raise FastSD35Error(f"{path}: LoRA key {names['down']} matches no SD3/SD3.5 transformer weight")
        layers.append(LoraLayer(module, names["down"], names["up"], names.get("alpha"), *target))
    return layers


def _official_target(module: str, depth: int | None):
    """(official weight key, qkv part, swap) for a LoRA module name in either layout, or None."""
    if module.startswith("lora_unet_"):
        name = module[len("lora_unet_") :]
        for i, word in enumerate(_OFFICIAL_WORDS):
            name = name.replace(word, f"\0{i}\0")
        name = name.replace("_", ".")
        for i, word in enumerate(_OFFICIAL_WORDS):
            name = name.replace(f"\0{i}\0", word)
        return f"{name}.weight", None, False
    name = module.removeprefix("transformer.")
    last = depth - 1 if depth is not None else -1
    return DiffusersTransformerSource._map(f"{name}.weight", last)


def fuse_lora(model, path, scale: float = 1.0) -> int:
    """Fuse the LoRA file at `path` into `model` (an MMDiTX, in place): W += scale * (alpha / rank) * up @ down,
    computed in fp32 and rounded once to W's dtype. Every layer is checked against the model's weights before any
    changes. Returns the number of layers fused. FastSD35Error for every problem with the file."""
    path = Path(path)
    scale = check_scale(scale, f"LoRA {path}")
    layers = lora_layers(path, model.depth)
    params = model.state_dict(keep_vars=True)
    header = safetensors_header(path)
    for layer in layers:  # everything is checked before any weight changes
        if layer.target not in params:
            raise FastSD35Error(f"{path}: LoRA key {layer.down} matches no weight of this transformer "
                                f"({layer.target} does not exist here)")
        _check_shapes(path, layer, header, tuple(params[layer.target].shape))
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        for layer in layers:
            down, up = f.get_tensor(layer.down), f.get_tensor(layer.up)
            rank = down.shape[0]
            alpha = float(f.get_tensor(layer.alpha)) if layer.alpha else rank
            weight = params[layer.target].data
            delta = up.flatten(1).to(weight.device, torch.float32) @ down.flatten(1).to(weight.device, torch.float32)
            delta = (delta * (scale * alpha / rank)).reshape(-1, *weight.shape[1:])
            if layer.swap:
                delta = torch.cat(delta.chunk(2)[::-1])
            rows = weight if layer.part is None else weight.narrow(0, layer.part * delta.shape[0], delta.shape[0])
            rows.copy_(rows.float() + delta)  # in place: the adaLN weights are views of one fused matrix
    return len(layers)


def _check_shapes(path: Path, layer: LoraLayer, header: dict, weight_shape: tuple):
    down, up = (tuple(header[name]["shape"]) for name in (layer.down, layer.up))
    if layer.alpha and tuple(header[layer.alpha]["shape"]) not in ((), (1,)):
        raise FastSD35Error(f"{path}: {layer.alpha} must be a single number, has shape {header[layer.alpha]['shape']}")
    rank = down[0] if down else 0
    if len(down) < 2 or len(up) < 2 or up[1] != rank or any(n != 1 for n in up[2:]):
        raise FastSD35Error(f"{path}: {layer.key}: lora down {down} and up {up} are not a low-rank pair")
    expected = weight_shape if layer.part is None else (weight_shape[0] // 3, *weight_shape[1:])
    found = (up[0], *down[1:]) if len(down) == len(weight_shape) else (up[0], math.prod(down[1:]))
    if found != expected:
        raise FastSD35Error(f"{path}: a LoRA for another model: {layer.down} changes a {found} weight, but "
                            f"{layer.target} here is {expected}")


__all__ = ["LoraLayer", "check_scale", "fuse_lora", "lora_layers", "parse_lora_arg"]
