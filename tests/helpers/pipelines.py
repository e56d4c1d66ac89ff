"""Pipelines as the tests use them: small generation settings, pixels as integers, and diffusers'
StableDiffusion3Pipeline built from a fastsd35 pipeline's own components."""

import numpy as np

from .diffusers_ref import require_diffusers
from .models import make_diffusers, make_diffusers_vae

SMALL = dict(steps=4, width=64, height=48, progress=False)


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def diffusers_pipeline(pipe):
    """diffusers' StableDiffusion3Pipeline with `pipe`'s transformer, VAE and text encoders (skips without diffusers)."""
    diffusers = require_diffusers()
    text = pipe.text_encoders
    return diffusers.StableDiffusion3Pipeline(
        transformer=make_diffusers(pipe.transformer),
        vae=make_diffusers_vae(pipe.vae),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.preset.shift),
        text_encoder=text.clip_l, tokenizer=text.tokenizer_l,
        text_encoder_2=text.clip_g, tokenizer_2=text.tokenizer_g,
        text_encoder_3=text.t5, tokenizer_3=text.tokenizer_t5,
    )  # fmt: skip
