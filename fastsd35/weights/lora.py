"""LoRA files fused into the transformer's weights, once, at load: W += scale * (alpha / rank) * up @ down.

Two layouts are read (safetensors only):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` (down), `.lora_B.weight` (up), optional `.alpha`;
  the diffusers module names are mapped to the official layout by `checkpoints.DiffusersTransformerSource` (q/k/v go
  into their rows of qkv; the (scale, shift) halves of the last context block and of the final layer are swapped).
- kohya / ComfyUI: `lora_unet_<official module, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (e.g. `lora_unet_joint_blocks_3_x_block_attn_qkv`).
Text-encoder LoRA weights (`lora_te*`, `text_encoder*`) are refused with a clear error: fastsd35 applies transformer
LoRAs only. The sum is done in fp32 and rounded once into the weight's dtype; fuse before any quantization (FP8).

Fusing is all or nothing. Each file is read once, whole (so what is hashed is what is fused), and everything is
checked before any weight changes: keys, pairs and shapes, a rank of at least 1, finite numbers in the file, and an
update that leaves every weight finite. Only then are the weights changed; with `atomic` the changed weights are
copied first (on the CPU) and put back if anything still fails (out of memory, an interrupt), so a refused or failed
call leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from ..errors import FastSD35Error
from ..files import exists, read_user_file
from .checkpoints import DiffusersTransformerSource, header_from_bytes, safetensors_header

MAX_LORA_BYTES = 4 << 30  # a LoRA file is read whole; released LoRAs are megabytes to a few hundred

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
    if exists(text) or ":" not in text:
        return Path(text), 1.0
    path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FastSD35Error(f"--lora {_short(text)}: the scale must be a finite number, got {_short(repr(scale))}")
    return Path(path), value


def check_scale(scale, what: str = "LoRA") -> float:
    """A LoRA scale in Python: an int or float (not a string, not a bool) that is finite as a float."""
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    try:
        ok = ok and math.isfinite(float(scale))
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        raise FastSD35Error(f"{what}: the scale must be a finite number, got {_short(repr(scale))}")
    return float(scale)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


def lora_layers(path, depth: int | None = None, header: dict | None = None) -> list[LoraLayer]:
    """The layers of a LoRA file, read from its header alone (no tensor loaded; `header` if already parsed). `depth`
    (the transformer's) is needed for the diffusers layout's swapped last block; None only checks the keys.
    FastSD35Error for a missing or non-safetensors file, a file with no LoRA keys, text-encoder keys, keys that match
    nothing, incomplete pairs."""
    path = Path(path)
    header = header if header is not None else safetensors_header(path, "LoRA file")
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
        _check_pair(path, layers[-1], header)
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


@dataclass(frozen=True)
class Fused:
    """A LoRA as fused: the file, its scale and the SHA-256 of the bytes that were read."""

    path: Path
    scale: float
    sha256: str
    layers: int  # layers fused


@dataclass
class _Plan:
    fused: Fused
    updates: list[tuple[LoraLayer, torch.Tensor, torch.Tensor, float]]  # layer, down, up, alpha


def _plan(model, path, scale, expected_sha256: str | None, params) -> _Plan:
    """Read one LoRA file whole and check everything that could refuse it, changing nothing."""
    path = Path(path)
    scale = check_scale(scale, f"LoRA {path}")
    data = read_user_file(path, "LoRA file", MAX_LORA_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise FastSD35Error(f"LoRA file {path} is not the file the PNG was made with (its SHA-256 differs): pass "
                            "--lora to use it anyway")
    header = header_from_bytes(data, path)
    layers = lora_layers(path, model.depth, header)
    for layer in layers:
        if layer.target not in params:
            raise FastSD35Error(f"{path}: LoRA key {layer.down} matches no weight of this transformer "
                                f"({layer.target} does not exist here)")
        _check_shapes(path, layer, header, tuple(params[layer.target].shape))
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise FastSD35Error(f"{path}: cannot read the LoRA's tensors: {str(e).splitlines()[0] if str(e) else e!r}") from None
    updates = []
    for layer in layers:
        down, up = tensors[layer.down], tensors[layer.up]
        alpha = float(tensors[layer.alpha].float().reshape(-1)[0]) if layer.alpha else float(down.shape[0])
        if not math.isfinite(alpha):
            raise FastSD35Error(f"{path}: {layer.alpha} is {alpha}, not a finite number")
        for name, t in ((layer.down, down), (layer.up, up)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise FastSD35Error(f"{path}: {name} holds {'non-float' if not t.is_floating_point() else 'NaN or infinite'} values")
        weight = params[layer.target].data
        if not bool(torch.isfinite(_rows(weight, layer, _delta(weight, layer, down, up, alpha, scale))).all()):
            raise FastSD35Error(f"{path}: {layer.key} at scale {scale:g} would make {layer.target} overflow to "
                                "infinity: the LoRA's values are out of range")
        updates.append((layer, down, up, alpha))
    return _Plan(Fused(path, scale, digest, len(updates)), updates)


def _delta(weight, layer: LoraLayer, down, up, alpha: float, scale: float) -> torch.Tensor:
    """scale * (alpha / rank) * up @ down in fp32, in the weight's layout (qkv part, swapped halves)."""
    rank = down.shape[0]
    delta = up.flatten(1).to(weight.device, torch.float32) @ down.flatten(1).to(weight.device, torch.float32)
    delta = (delta * (scale * alpha / rank)).reshape(-1, *weight.shape[1:])
    return torch.cat(delta.chunk(2)[::-1]) if layer.swap else delta


def _rows(weight, layer: LoraLayer, delta) -> torch.Tensor:
    """The updated rows the delta gives, in fp32 (not written)."""
    rows = weight if layer.part is None else weight.narrow(0, layer.part * delta.shape[0], delta.shape[0])
    return rows.float() + delta


def fuse_loras(model, loras, *, atomic: bool = True) -> list[Fused]:
    """Fuse LoRA files into `model` (an MMDiTX, in place), in order: `loras` holds (path, scale) or (path, scale,
    expected SHA-256) items. Every file is read and checked before any weight changes (FastSD35Error for every
    problem with a file); with `atomic` the weights are also restored if applying fails (see the module's docstring).
    Returns what was fused, with each file's SHA-256."""
    params = model.state_dict(keep_vars=True)
    plans = [_plan(model, item[0], item[1], item[2] if len(item) > 2 else None, params) for item in loras]
    targets = sorted({layer.target for plan in plans for layer, *_ in plan.updates})
    backup = {t: params[t].data.detach().to("cpu", copy=True) for t in targets} if atomic else {}
    try:
        with torch.no_grad():
            for plan in plans:
                for layer, down, up, alpha in plan.updates:
                    weight = params[layer.target].data
                    delta = _delta(weight, layer, down, up, alpha, plan.fused.scale)
                    rows = weight if layer.part is None else weight.narrow(0, layer.part * delta.shape[0], delta.shape[0])
                    rows.copy_(rows.float() + delta)  # in place: the adaLN weights are views of one fused matrix
    except BaseException:
        with torch.no_grad():
            for target, original in backup.items():
                params[target].data.copy_(original)
        raise
    return [plan.fused for plan in plans]


def fuse_lora(model, path, scale: float = 1.0) -> int:
    """Fuse the LoRA file at `path` into `model` (an MMDiTX, in place): W += scale * (alpha / rank) * up @ down,
    computed in fp32 and rounded once to W's dtype. All or nothing (`fuse_loras`). Returns the number of layers
    fused. FastSD35Error for every problem with the file."""
    return fuse_loras(model, [(path, scale)])[0].layers


def _check_pair(path: Path, layer: LoraLayer, header: dict):
    """The layer's tensors form a low-rank update of rank >= 1 (from the header: no model needed)."""
    down, up = (tuple(header[name]["shape"]) for name in (layer.down, layer.up))
    if layer.alpha and tuple(header[layer.alpha]["shape"]) not in ((), (1,)):
        raise FastSD35Error(f"{path}: {layer.alpha} must be a single number, has shape {header[layer.alpha]['shape']}")
    rank = down[0] if down else 0
    if len(down) < 2 or len(up) < 2 or up[1] != rank or any(n != 1 for n in up[2:]):
        raise FastSD35Error(f"{path}: {layer.key}: lora down {down} and up {up} are not a low-rank pair")
    if rank < 1 or 0 in down or 0 in up:
        raise FastSD35Error(f"{path}: {layer.key}: lora down {down} and up {up} have rank {rank} or an empty side: "
                            "a LoRA layer needs rank >= 1")


def _check_shapes(path: Path, layer: LoraLayer, header: dict, weight_shape: tuple):
    down, up = (tuple(header[name]["shape"]) for name in (layer.down, layer.up))
    expected = weight_shape if layer.part is None else (weight_shape[0] // 3, *weight_shape[1:])
    found = (up[0], *down[1:]) if len(down) == len(weight_shape) else (up[0], math.prod(down[1:]))
    if found != expected:
        raise FastSD35Error(f"{path}: a LoRA for another model: {layer.down} changes a {found} weight, but "
                            f"{layer.target} here is {expected}")


__all__ = ["Fused", "LoraLayer", "MAX_LORA_BYTES", "check_scale", "fuse_lora", "fuse_loras", "lora_layers", "parse_lora_arg"]
