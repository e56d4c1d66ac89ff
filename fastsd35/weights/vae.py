"""Loading the SD3 VAE: an official single file (`first_stage_model.*`), a separate VAE file with or without that
prefix, or a diffusers `AutoencoderKL` folder mapped to the official names by our own mapping; safetensors only,
strict."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError
from ..files import exists, is_dir
from ..models.devices import default_device, default_dtype
from ..models.vae import SDVAE, VAEConfig
from .checkpoints import TensorSource, diffusers_component_folder, diffusers_weight_headers, safetensors_header
from .loading import load_module

VAE_PREFIX = "first_stage_model."

_DIFFUSERS_SEGMENTS = {  # diffusers AutoencoderKL name part -> official name part (whole dotted segments)
    "down_blocks": "down",
    "resnets": "block",
    "conv_shortcut": "nin_shortcut",
    "downsamplers.0": "downsample",
    "upsamplers.0": "upsample",
    "mid_block.resnets.0": "mid.block_1",
    "mid_block.resnets.1": "mid.block_2",
    "mid_block.attentions.0": "mid.attn_1",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "conv_norm_out": "norm_out",
}
_SEGMENT_RE = re.compile(
    r"(?<![^.])(" + "|".join(re.escape(s) for s in sorted(_DIFFUSERS_SEGMENTS, key=len, reverse=True)) + r")(?![^.])"
)


def _official_name(key: str, n_up: int) -> str:
    """The official name of a diffusers AutoencoderKL key; its decoder up blocks run in the opposite order."""
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.", key)
    return _SEGMENT_RE.sub(lambda m: _DIFFUSERS_SEGMENTS[m[1]], key)


def _linear_attention(key: str, shape: Sequence[int]) -> bool:
    return len(shape) == 2 and re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) is not None


class DiffusersVAESource(TensorSource):
    """A diffusers AutoencoderKL's tensors under their official names: our own mapping, the inverse of diffusers'
    `convert_ldm_vae_checkpoint` (up blocks reversed; attention Linear weights (C, C) read as 1x1 convs (C, C, 1, 1)).
    Keys it does not know keep their names, so the strict load reports them."""

    def __init__(self, headers: dict[Path, dict], label: str):
        stored = [key for header in headers.values() for key in header]
        ups = [int(m[1]) for key in stored if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))]
        n_up = max(ups, default=-1) + 1
        super().__init__(headers, {_official_name(key, n_up): key for key in stored}, label)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (*s, 1, 1) if _linear_attention(k, s) else s for k, s in super().shapes.items()}

    def get(self, key: str) -> torch.Tensor:
        t = super().get(key)
        return t[:, :, None, None] if _linear_attention(key, t.shape) else t


def open_vae(path) -> TensorSource:
    """The VAE tensors at `path`, in the official layout without `first_stage_model.`: an official single file
    (`first_stage_model.*`; other prefixes ignored), a separate VAE file with or without that prefix (training-only
    `loss.*` tensors ignored, as the reference does), a diffusers-layout VAE file, or a diffusers folder or its `vae/`."""
    path = Path(path)
    if is_dir(path):
        folder = diffusers_component_folder(path, "vae")
        return DiffusersVAESource(diffusers_weight_headers(folder), label=str(folder))
    if not exists(path):
        raise CheckpointError(
            f"{path}: no such file or folder; expected an SD3/SD3.5 .safetensors checkpoint, a VAE .safetensors file "
            "or a diffusers folder"
        )
    header = safetensors_header(path)
    if any(k.startswith(VAE_PREFIX) for k in header):
        return TensorSource.from_file(path, VAE_PREFIX, header)
    if any(k.startswith(("encoder.mid_block.", "decoder.mid_block.")) for k in header):
        return DiffusersVAESource({path: header}, label=str(path))
    if any(k.startswith(("encoder.", "decoder.")) for k in header):
        return TensorSource({path: header}, {k: k for k in header if not k.startswith("loss.")}, label=str(path))
    sample = ", ".join(sorted(header)[:3]) or "no tensors at all"
    raise CheckpointError(
        f"{path}: no VAE weights (expected keys '{VAE_PREFIX}*', or 'encoder.*' and 'decoder.*' in a separate VAE file); "
        f"found {len(header)} tensors such as {sample}"
    )


def load_vae(path, *, dtype=None, device=None) -> SDVAE:
    """Load the SD3 VAE from an official single file, a separate VAE file or a diffusers folder (see `open_vae`).

    The config is inferred from the tensor shapes. The VAE is allocated on `device` (default: CUDA when available) in
    `dtype` (default: bf16 on CUDA, fp32 on CPU) and filled one tensor at a time; mismatches raise CheckpointError."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    with open_vae(path) as source:
        return load_module(SDVAE, VAEConfig.from_shapes(source.shapes, source=source.label), source, dtype=dtype, device=device)
