"""SD3.5 ControlNets (SPEC.md §8): the reference's `ControlNetEmbedder` in the official key layout of the released
files, loading (official files, diffusers folders), the control image -> latent path of the reference, and
preprocessing for users who start from a photo.

Two kinds exist in the reference. The released "8B" ControlNets (for SD3.5 Large) take the raw pooled text and the
main transformer's patch embedding + position table, and chain their blocks. The "2B" code path (nothing released)
patch-embeds the latent itself, takes the pooled text through the transformer's y_embedder, and feeds the same
input to every block. The blocks are the transformer's single-stream adaLN-Zero blocks, run through the
transformer's op set: with a FastMMDiTX the ControlNet runs on the Triton kernels too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .checkpoints import (
    TensorSource,
    default_device,
    default_dtype,
    diffusers_component_folder,
    diffusers_weight_headers,
    safetensors_header,
)
from .errors import CheckpointError, FastSD35Error
from .model import FREQ_DIM, HEAD_DIM, DismantledBlock, MMDiTX, PatchEmbed
from .presets import CONTROL_TYPES
from .vae import SDVAE, process_in
from .weights import StrictLoading, load_module

CANNY = 1  # the control type whose 8B pixels are scaled a*255*0.5+0.5 instead of 2a-1


_REQUIRED = (  # keys every SD3.5 ControlNet has
    "pos_embed_input.proj.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.qkv.weight",
)


@dataclass(frozen=True)
class ControlNetConfig:
    num_layers: int
    hidden_size: int  # = the transformer's (64 * its depth)
    pooled_dim: int  # 2048 (the raw pooled text) for 8B; hidden_size (via the transformer's y_embedder) for 2B
    patch_size: int = 2
    in_channels: int = 16

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def is_8b(self) -> bool:
        """The reference tests `pooled width == 2048`; a 2B ControlNet's pooled input is the hidden size, so this is the
        same test for every real size and also holds for tiny models."""
        return self.pooled_dim != self.hidden_size

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "state dict") -> "ControlNetConfig":
        """Infer the config from official-layout tensor shapes. Raises CheckpointError."""
        for key in _REQUIRED:
            if key not in shapes:
                raise CheckpointError(f"{source}: not an SD3.5 ControlNet: key '{key}' is missing")
        if "context_embedder.weight" in shapes:
            raise CheckpointError(
                f"{source}: a ControlNet with its own text context (the InstantX SD3 kind); fastsd35 runs the SD3.5 "
                "ControlNets (blur, canny, depth)"
            )
        hidden, in_channels, patch, _ = shapes["pos_embed_input.proj.weight"]
        if hidden % HEAD_DIM:
            raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of {HEAD_DIM}")
        blocks = [int(m[1]) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
        return cls(
            num_layers=max(blocks) + 1,
            hidden_size=hidden,
            pooled_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            patch_size=patch,
            in_channels=in_channels,
        )


# The released ControlNets (blur, canny, depth), all for SD3.5 Large.
SD35_LARGE_CONTROLNET = ControlNetConfig(num_layers=19, hidden_size=2432, pooled_dim=2048)


class _Mlp(nn.Module):
    """Linear -> SiLU -> Linear under the names the ControlNet files use (linear_1, linear_2)."""

    def __init__(self, in_dim, hidden, **factory):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden, **factory)
        self.linear_2 = nn.Linear(hidden, hidden, **factory)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, hidden, pooled_dim, **factory):
        super().__init__()
        self.timestep_embedder = _Mlp(FREQ_DIM, hidden, **factory)
        self.text_embedder = _Mlp(pooled_dim, hidden, **factory)


class ControlNet(StrictLoading, nn.Module):
    """An SD3.5 ControlNet. State dict keys are those of the released files: `transformer_blocks.{i}.*`,
    `controlnet_blocks.{i}`, `pos_embed_input.proj`, `time_text_embed.{timestep,text}_embedder.linear_{1,2}`,
    `control_type` (int32: 0 blur, 1 canny, 2 depth) and, for the 2B kind only, `pos_embed.proj`."""

    def __init__(self, config: ControlNetConfig, *, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.source = "ControlNet"  # named in errors; load_controlnet sets the file
        f = dict(dtype=dtype, device=device)
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        self.transformer_blocks = nn.ModuleList(
            DismantledBlock(D, config.num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=None, **f)
            for _ in range(config.num_layers)
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D, **f) for _ in range(config.num_layers))
        self.pos_embed_input = PatchEmbed(C, D, p, **f)
        self.time_text_embed = _TimeTextEmbed(D, config.pooled_dim, **f)
        self.pos_embed = None if config.is_8b else PatchEmbed(C, D, p, **f)
        self.register_buffer("control_type", torch.zeros(1, dtype=torch.int32, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    @property
    def control_name(self) -> str:
        return CONTROL_TYPES[int(self.control_type[0])]

    def forward(self, transformer: MMDiTX, x, sigma, y, cond, scale: float = 1.0) -> list[torch.Tensor]:
        """The per-block residuals for `transformer(x, t, y, context, controlnet_hidden_states=...)`.

        transformer: the MMDiTX being controlled. Its op set runs the blocks; the 8B kind reads its patch embedding and
            position table, the 2B kind its y_embedder (as the reference's apply_model does), and both its sinusoid.
        x: (B, 16, h, w) latent, as the transformer gets it.
        sigma: (B,) or scalar sigma as the sampler feeds the model, i.e. fp16-rounded (`sampling.model_sigma`). As in
            the reference, the ControlNet's timestep is sigma.float() * 1000 computed in float32 (the reference's
            transformer instead gets that product computed in fp16, SPEC.md §5.4: the two can differ).
        y: (B, pooled) pooled text (B, 2048 for SD3.5), as the transformer gets it.
        cond: (1 or B, 16, h, w) control latent from `control_latent`; one latent serves the whole (CFG) batch.
        scale: the control strength, multiplying every residual (the reference always uses 1).
        Returns num_layers tensors (B, h*w/4, D) in the transformer's dtype.
        """
        check_compatible(self, transformer)
        B, hw = x.shape[0], x.shape[-2:]
        sigma = torch.as_tensor(sigma, device=x.device)
        t = (sigma.expand(B) if sigma.ndim == 0 else sigma).float() * 1000
        if cond.ndim != 4 or cond.shape[0] not in (1, B) or cond.shape[1:] != x.shape[1:]:
            shape = ", ".join(map(str, x.shape[1:]))
            raise ValueError(f"control latent must be (1 or {B}, {shape}) like x, got {tuple(cond.shape)}")
        if t.shape != (B,) or y is None or y.shape != (B, transformer.config.adm_in_channels):
            got, adm = None if y is None else tuple(y.shape), transformer.config.adm_in_channels
            raise ValueError(f"sigma must be ({B},) and y ({B}, {adm}), got {tuple(t.shape)} and {got}")
        ops, dtype = transformer.ops(x.device), self.dtype
        if self.config.is_8b:
            h = transformer.x_embedder(x.to(transformer.dtype)) + transformer.cropped_pos_embed(hw)
        else:
            h = self.pos_embed(x.to(dtype))
            y = transformer.y_embedder(y.to(transformer.dtype))
        h = h.to(dtype) + self.pos_embed_input(cond.to(x.device, dtype))  # a batch-1 cond broadcasts over B
        emb = self.time_text_embed
        c = emb.timestep_embedder(transformer.t_embedder.sinusoid(t).to(dtype)) + emb.text_embedder(y.to(dtype))
        silu_c = F.silu(c)

        ws = self._workspace(B, h.shape[1], x.device)
        out, residuals = h, []
        for block, linear in zip(self.transformer_blocks, self.controlnet_blocks):
            mods = block.adaLN_modulation[1](silu_c).view(B, 6, -1)  # (SiLU, Linear)(c), the SiLU shared
            out = block.single_stream(out if self.config.is_8b else h, mods, ops, ws)  # 8B chains, 2B runs in parallel
            residuals.append((linear(out) * scale).to(transformer.dtype))
        return residuals

    def _workspace(self, batch: int, n_x: int, device) -> SimpleNamespace:
        H, D = self.config.num_heads, self.config.hidden_size
        f = dict(dtype=self.dtype, device=device)
        q, k, v = (torch.empty(batch, H, n_x, D // H, **f) for _ in range(3))
        return SimpleNamespace(q=q, k=k, v=v, out_x=torch.empty(batch, n_x, D, **f))


def check_compatible(controlnet: ControlNet, transformer: MMDiTX):
    """Raise CheckpointError naming both models unless `controlnet` was built for a transformer like this one."""
    c, m = controlnet.config, transformer.config
    problem = None
    if (c.hidden_size, c.patch_size, c.in_channels) != (m.hidden_size, m.patch_size, m.in_channels):
        problem = f"it was made for a transformer of hidden size {c.hidden_size} ({c.num_heads} heads)"
    elif m.depth % c.num_layers:
        problem = f"its {c.num_layers} blocks cannot be spread evenly over {m.depth} (block i gets residual i // (N//n))"
    elif c.is_8b and c.pooled_dim != m.adm_in_channels:
        problem = f"it takes pooled text of width {c.pooled_dim}, the transformer {m.adm_in_channels}"
    elif not c.is_8b and m.adm_in_channels is None:
        problem = "this 2B-kind ControlNet needs the transformer's y_embedder, which this transformer lacks"
    if problem:
        raise CheckpointError(
            f"{controlnet.source} (a {c.num_layers}-block ControlNet, hidden size {c.hidden_size}) does not fit the "
            f"{m.variant} transformer (depth {m.depth}, hidden size {m.hidden_size}): {problem}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading

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
    if path.is_dir():
        folder = diffusers_component_folder(path, "controlnet")
        return DiffusersControlNetSource(diffusers_weight_headers(folder), label=str(folder))
    if not path.exists():
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


def control_type_id(control_type: int | str) -> int:
    """0, 1, 2 or "blur", "canny", "depth" -> 0, 1 or 2; FastSD35Error otherwise."""
    ids = {name: i for i, name in CONTROL_TYPES.items()}
    if control_type in CONTROL_TYPES and not isinstance(control_type, bool):
        return int(control_type)
    if control_type in ids:
        return ids[control_type]
    raise FastSD35Error(f"unknown control type {control_type!r}; choose one of: {', '.join(ids)}")


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


# ----------------------------------------------------------------------------------------------------------------
# Control image -> latent (SPEC.md §8.3)


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        return Image.open(image)
    except OSError as e:  # missing, unreadable or not an image
        raise FastSD35Error(f"{image}: cannot read the control image ({e})") from None


def control_pixels(image, width: int, height: int, control_type: int | str, is_8b: bool = True) -> torch.Tensor:
    """The reference's VAE input for a control image (a PIL image or a path): resized to width x height with LANCZOS,
    then RGB (in that order, as the reference), a = pixels / 255, then a*255*0.5 + 0.5 for an 8B canny ControlNet
    (the range [0.5, 128] it was trained on) and 2a - 1 otherwise. Returns (1, 3, height, width) float32."""
    image = _open(image).resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    if is_8b and control_type_id(control_type) == CANNY:
        return a * 255 * 0.5 + 0.5
    return 2.0 * a - 1.0


def control_latent(vae: SDVAE, image, width: int, height: int, control_type: int | str, is_8b: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Control image -> the ControlNet's `cond` (1, 16, height/8, width/8), float32 on the CPU: `control_pixels`, the
    VAE posterior sampled with `generator` (a seeded CPU generator; None gives the posterior mean), then process_in.
    Computed once per run: `ControlNet.forward` broadcasts it over the batch."""
    pixels = control_pixels(image, width, height, control_type, is_8b).to(vae.device, vae.dtype)
    return process_in(vae.encode(pixels, generator).float().cpu())


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing a photo into a control image


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _conv(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(H, W) image correlated with a 2D kernel, edges replicated."""
    kh, kw = kernel.shape
    padded = F.pad(img[None, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(padded, kernel[None, None])[0, 0]


# Neighbours along the gradient for its direction quantised to 0, 45, 90, 135 degrees (rows grow downwards).
_NMS_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))


def canny(image, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> Image.Image:
    """Canny edges of `image` as white (255) on black, RGB. Gaussian smoothing (std `sigma` px; 0 = none), 3x3 Sobel
    gradients of the 0..255 luma, non-maximum suppression across the edge, then hysteresis: pixels with gradient
    magnitude >= `high` are edges, and so are those >= `low` connected to them. The thresholds are in the units of
    OpenCV's cv2.Canny with L2gradient=True (3x3 Sobel of 0..255 values)."""
    if not 0 <= low <= high:
        raise FastSD35Error(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    if sigma < 0:
        raise FastSD35Error(f"canny sigma must be >= 0, got {sigma}")
    g = torch.from_numpy(np.asarray(_open(image).convert("L"), dtype=np.float32))
    if sigma > 0:
        k = _gaussian_kernel(sigma)
        g = _conv(_conv(g, k[None]), k[:, None])
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _conv(g, sobel), _conv(g, sobel.T)
    mag = torch.round(torch.hypot(gx, gy) * 16) / 16  # float noise would break the ties of symmetric edges at random

    sector = torch.remainder(torch.round(torch.rad2deg(torch.atan2(gy, gx)) / 45), 4).long()
    H, W = mag.shape
    padded = F.pad(mag, (1, 1, 1, 1))
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dy, dx) in enumerate(_NMS_OFFSETS):
        ahead = padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        behind = padded[1 - dy : 1 - dy + H, 1 - dx : 1 - dx + W]
        keep |= (sector == s) & (mag > behind) & (mag >= ahead)  # one strict side: a 2-px ridge keeps one pixel
    keep &= mag > 0

    weak = keep & (mag >= low)
    edges = keep & (mag >= high)
    while True:  # grow the strong edges along connected weak pixels (8-connectivity)
        grown = weak & (F.max_pool2d(edges[None].float(), 3, stride=1, padding=1)[0] > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return Image.fromarray(edges.to(torch.uint8).numpy() * 255).convert("RGB")


def blur(image, radius: float = 5.0) -> Image.Image:
    """A Gaussian blur of `image` (PIL's GaussianBlur, std `radius` px), RGB: the blur ControlNet's input."""
    if radius < 0:
        raise FastSD35Error(f"blur radius must be >= 0, got {radius}")
    return _open(image).convert("RGB").filter(ImageFilter.GaussianBlur(radius))


_PREPROCESSORS = {"canny": (canny, ("low", "high", "sigma")), "blur": (blur, ("radius",))}


def preprocess(image, kind: str, **options) -> Image.Image:
    """A control image made from a photo: kind "canny" (options low, high, sigma; see `canny`) or "blur" (option
    radius). Depth maps are not made here. The defaults are starting points: the reference ships no preprocessing."""
    if kind == "depth":
        raise FastSD35Error(
            "the depth ControlNet needs a depth map as the control image, which fastsd35 does not compute: make one "
            "with a depth model (the model card uses DepthFM), near = dark, far = bright"
        )
    if kind not in _PREPROCESSORS:
        raise FastSD35Error(f"unknown control preprocessing {kind!r}; choose canny or blur (depth maps must be supplied)")
    make, allowed = _PREPROCESSORS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FastSD35Error(f"{kind} preprocessing has no option {', '.join(unknown)}; its options: {', '.join(allowed)}")
    return make(image, **options)


__all__ = [
    "SD35_LARGE_CONTROLNET",
    "ControlNet",
    "ControlNetConfig",
    "DiffusersControlNetSource",
    "blur",
    "canny",
    "check_compatible",
    "control_latent",
    "control_pixels",
    "control_type_id",
    "load_controlnet",
    "open_controlnet",
    "preprocess",
]
