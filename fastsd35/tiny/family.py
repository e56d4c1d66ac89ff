"""The tiny SD3 family: random-weight models built in code from a fixed seed (for self-tests, parity tests and
`--preset tiny_random`), the configs of the family that `fastsd35.tiny.train` trains on `fastsd35.tiny.scenes`, the
shipped trained copy (`--preset tiny`), and writers that lay any of them out as the official release does."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FastSD35Error
from ..files import is_file
from ..models.controlnet import ControlNet, ControlNetConfig, control_type_id
from ..models.mmditx import FastMMDiTX, MMDiTXConfig
from ..models.text_encoders import TextEncoders, clip_config, t5_config
from ..models.tokenization import CLIP_LENGTH, tiny_clip_tokenizer, tiny_t5_tokenizer
from ..models.vae import SDVAE, VAEConfig

_WEIGHTED = (nn.Linear, nn.Conv2d, nn.Embedding)

# depth 2 (hidden 128, 2 heads), up to 1024 px, with qk-norm and one MMDiT-X block so every op runs.
TINY_MMDITX_CONFIG = MMDiTXConfig(
    depth=2, pos_embed_max_size=64, context_dim=64, adm_in_channels=64, qk_norm="rms", x_block_self_attn_layers=(0,)
)

# The family `fastsd35.tiny.train` trains (version 2), sized to train within an hour on 2 CPU cores and to have blocks
# worth testing across: 4 joint blocks, which the official layout makes 256 wide with 4 heads of 64 (hidden = 64 x
# depth, SPEC.md 3.1), qk-norm, and the second, x-only attention in block 0 as SD3.5 Medium has it; an MLP ratio of 1,
# not 4 (the loaders read it from the fc1 shape), which saves 5 MB and a third of the compute; 1x1 patches (the 8x8
# latent of a 64x64 image as 64 tokens: with 2x2 patches, 16 tokens, the shapes came out as blocks of 16 pixels and
# learned slower for the same compute) on a 16x16 position table (up to 128 px; trained at 64x64). The VAE has 64
# channels at every level (two per norm group, as the constructed encoder of `fastsd35.tiny.autoencoder` needs) and one
# block per encoder level, still 16 latent channels and a factor-8 downsampling like the real one.
TRAINED_MMDITX_CONFIG = MMDiTXConfig(depth=4, patch_size=1, pos_embed_max_size=16, context_dim=64, adm_in_channels=64,
                                     qk_norm="rms", x_block_self_attn_layers=(0,), mlp_ratio=1.0)
TRAINED_VAE_CONFIG = VAEConfig(ch=64, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
TRAINED_CONTROLNET_LAYERS = 2  # a ControlNet for it: block i gets residual i // (4 // 2), as 38 blocks over 19
TINY_VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))  # still 3 downsamplings: factor 8, like the real one
# Where the package keeps the trained family (`python -m fastsd35.tiny.train --out fastsd35/tiny/trained` rewrites it).
TRAINED_MODEL_DIR = Path(__file__).resolve().parent / "trained"


def trained_model_dir() -> Path:
    """The shipped model folder of the `tiny` preset; FastSD35Error when this installation lacks it."""
    if not is_file(TRAINED_MODEL_DIR / "tiny.safetensors"):
        raise FastSD35Error(f"the tiny model is missing from this installation ({TRAINED_MODEL_DIR}): reinstall "
                            f"fastsd35, or rebuild it with python -m fastsd35.tiny.train --out {TRAINED_MODEL_DIR}")
    return TRAINED_MODEL_DIR


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every floating-point parameter and buffer in place with seeded values that keep activations of order 1:
    Linear/Conv/Embedding weights N(0, 1/fan_in), other weights (norms) 1 + N(0, 0.1), biases N(0, 0.1), anything
    else (e.g. position tables) N(0, 0.5). Deterministic for a given module structure and seed."""
    g = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name == "weight" and isinstance(mod, _WEIGHTED):
                r /= math.sqrt(t[0].numel())
            elif name == "weight":
                r = 1 + 0.1 * r
            elif name == "bias":
                r *= 0.1
            else:
                r *= 0.5
            t.copy_(r)
    return module


def tiny_components(seed: int = 0, *, device="cpu", dtype=torch.float32, t5: bool = True, t5_tokens: int = 256):
    """The `tiny` preset's transformer, VAE and text encoders: every stage of the real pipeline, random weights,
    seconds on a CPU, no files. Context width 64 and pooled width 64 match the tiny text encoders."""
    transformer = randomize_(FastMMDiTX(TINY_MMDITX_CONFIG), seed)
    vae = randomize_(SDVAE(TINY_VAE_CONFIG), seed + 1)
    text = tiny_text_encoders(seed + 2, t5_tokens=t5_tokens)
    if not t5:
        text = TextEncoders(text.clip_l, text.clip_g, None, text.tokenizer_l, text.tokenizer_g, t5_tokens=t5_tokens,
                            t5_width=TINY_MMDITX_CONFIG.context_dim)
    transformer = transformer.to(device, dtype).eval().requires_grad_(False)
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    return transformer, vae, text.to(device)


def write_tiny_model(folder, seed: int = 0) -> Path:
    """Write the random-weight tiny model (`tiny_components(seed)`) as a model folder (see `save_model_folder`).
    Loading it back (`--preset tiny --model folder`) runs the real loading path end to end."""
    return save_model_folder(folder, *tiny_components(seed))


def save_model_folder(folder, transformer, vae, text, dtype: torch.dtype | None = None) -> Path:
    """Write a model as the official release lays out a model folder: `tiny.safetensors` (transformer under
    `model.diffusion_model.`, VAE under `first_stage_model.`), `clip_l.safetensors`, `clip_g.safetensors`,
    `t5xxl_fp16.safetensors`, and tokenizer/, tokenizer_2/, tokenizer_3/. `dtype`: store the floating-point tensors
    in it (the releases store fp16); default as they are."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def tensors(module, prefix=""):  # contiguous copies: safetensors refuses shared or strided storage
        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)  # noqa: E731
        return {prefix + k: cast(v.detach()).clone().contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(transformer, "model.diffusion_model.") | tensors(vae, "first_stage_model."), str(folder / "tiny.safetensors"))
    save_file(tensors(text.clip_l), str(folder / "clip_l.safetensors"))
    save_file(tensors(text.clip_g), str(folder / "clip_g.safetensors"))
    save_file(tensors(text.t5), str(folder / "t5xxl_fp16.safetensors"))
    for name, tokenizer in (("tokenizer", text.tokenizer_l), ("tokenizer_2", text.tokenizer_g), ("tokenizer_3", text.tokenizer_t5)):
        tokenizer.save_pretrained(folder / name)
    return folder


def write_tiny_controlnet(path, control_type: str = "canny", seed: int = 0, *, trained: bool = False) -> Path:
    """A random-weight ControlNet (the 8B kind: raw pooled text, chained blocks), written in the released files'
    layout with its `control_type`: one block for the random-weight tiny transformer, or with `trained` for the
    trained one (`TRAINED_CONTROLNET_LAYERS` blocks spread over its 4, as the released ControlNets' 19 over 38)."""
    from safetensors.torch import save_file

    transformer = TRAINED_MMDITX_CONFIG if trained else TINY_MMDITX_CONFIG
    config = ControlNetConfig(num_layers=TRAINED_CONTROLNET_LAYERS if trained else 1,
                              hidden_size=transformer.hidden_size, pooled_dim=transformer.adm_in_channels,
                              patch_size=transformer.patch_size)
    controlnet = randomize_(ControlNet(config), seed)
    controlnet.control_type.fill_(control_type_id(control_type))
    path = Path(path)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(path))
    return path


def tiny_text_encoders(seed: int = 0, *, t5_tokens: int = 256) -> TextEncoders:
    """Random-weight CLIP-L (width 32, 3 layers, identity projection), CLIP-G (width 32, 4 layers, projection 32) and
    T5 (width 64, 2 layers) with tokenizers built in code: context width 64, pooled width 64. No files, no network.
    The identity CLIP-L projection makes diffusers' projected CLIP-L pooled vector equal to ours (unprojected)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer_l, tokenizer_g, tokenizer_t5 = tiny_clip_tokenizer("eos"), tiny_clip_tokenizer("!"), tiny_t5_tokenizer()
    vocab = len(tokenizer_l)
    clip_l = CLIPTextModelWithProjection(clip_config(vocab, 32, 64, 3, CLIP_LENGTH, 32, "clip_l"))
    clip_g = CLIPTextModelWithProjection(clip_config(vocab, 32, 64, 4, CLIP_LENGTH, 32, "clip_g"))
    t5 = T5EncoderModel(t5_config(len(tokenizer_t5), 64, 96, heads=4, d_kv=16, layers=2))
    for i, model in enumerate((clip_l, clip_g, t5)):
        randomize_(model, seed + i).eval().requires_grad_(False)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    return TextEncoders(clip_l, clip_g, t5, tokenizer_l, tokenizer_g, tokenizer_t5, t5_tokens=t5_tokens)
