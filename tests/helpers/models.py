"""Tiny transformers and VAEs with random weights, their inputs, and the same models built in diffusers with the
weights converted by diffusers' own converters (so the key layout is checked by code no one here wrote)."""

import torch

from fastsd35.models.mmditx import MMDiTX, MMDiTXConfig
from fastsd35.models.vae import LATENT_SCALE, LATENT_SHIFT, SDVAE, VAEConfig
from fastsd35.tiny.family import TINY_VAE_CONFIG, randomize_

from .diffusers_ref import require_diffusers

# Tiny transformers that follow the released rule hidden = 64 * depth, heads = depth.
TINY_CONFIGS = {
    "sd3": MMDiTXConfig(depth=2, pos_embed_max_size=16, context_dim=48, adm_in_channels=40),
    "sd35_large": MMDiTXConfig(depth=2, pos_embed_max_size=16, context_dim=48, adm_in_channels=40, qk_norm="rms"),
    "sd35_medium": MMDiTXConfig(
        depth=3, pos_embed_max_size=24, context_dim=48, adm_in_channels=40, qk_norm="rms", x_block_self_attn_layers=(0, 1)
    ),
}


def make_model(config, seed=0, cls=MMDiTX):
    return randomize_(cls(config), seed).eval()


def inputs(config, batch=2, h=16, w=12, n_ctx=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.tensor([980.0, 3.5, 500.0][:batch])
    y = torch.randn(batch, config.adm_in_channels, generator=g)
    ctx = torch.randn(batch, n_ctx, config.context_dim, generator=g)
    return x, t, y, ctx


def make_diffusers(model: MMDiTX):
    """diffusers' SD3Transformer2DModel with `model`'s weights (skips the test without diffusers)."""
    diffusers = require_diffusers()
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg = model.config
    ref = diffusers.SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=64,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_channels,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    return ref.eval()


def run_diffusers(ref, x, t, y, ctx, **kw):
    return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t, return_dict=False, **kw)[0]


def make_vae(config=TINY_VAE_CONFIG, seed=0) -> SDVAE:
    return randomize_(SDVAE(config), seed).eval()


def diffusers_vae_config(config: VAEConfig) -> dict:
    n = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        latent_channels=config.latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        block_out_channels=config.channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=config.num_res_blocks,
        norm_num_groups=config.norm_groups,
        scaling_factor=LATENT_SCALE,
        shift_factor=LATENT_SHIFT,
    )


def make_diffusers_vae(vae: SDVAE):
    """diffusers' AutoencoderKL with `vae`'s weights (skips the test without diffusers)."""
    diffusers = require_diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = diffusers_vae_config(vae.config)
    ref = diffusers.AutoencoderKL(**cfg)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    return ref.eval()
