"""Pipelines as the tests use them: small generation settings, pixels as integers, and diffusers'
StableDiffusion3Pipeline built from a fastsd35 pipeline's own components; fixtures for running pipelines as a user's
CPU does (import them into a test module to use them)."""

import numpy as np
import pytest

from .diffusers_ref import require_diffusers
from .models import make_diffusers, make_diffusers_vae

SMALL = dict(steps=4, width=64, height=48, progress=False)


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    """The reference ops, as on a user's CPU (the kernels are tested on their own), and no network or HF cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module", autouse=True)
def reference_ops():
    """The reference ops, as on a user's CPU, for the module-scoped fixtures' generations too (a test may turn the
    interpreter back on for itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        yield


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
