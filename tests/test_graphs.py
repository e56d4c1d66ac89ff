"""CUDA graphs of the denoiser passes: replay equals eager bit for bit (GPU), and a clear refusal on the CPU."""

import numpy as np
import pytest
import torch

from fastsd35 import FastSD35Error
from fastsd35.graphs import CUDAGraphPasses
from fastsd35.runner import Pipeline, TransformerPass
from fastsd35.tiny import TINY_MMDITX_CONFIG, tiny_components


def test_graphs_refuse_the_cpu():
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device, not cpu: run the pass eagerly \(--no-graphs\)"):
        CUDAGraphPasses(lambda *a, **k: None, "cpu")


def test_cpu_pipeline_runs_eagerly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pipe = Pipeline.from_preset("tiny", device="cpu")
    assert type(pipe.model_pass) is TransformerPass
    with pytest.raises(FastSD35Error, match="CUDA graphs need a CUDA device; the transformer is on cpu"):
        Pipeline.from_preset("tiny", device="cpu", graphs=True)


# -- GPU --------------------------------------------------------------------------------------------------------


def pass_inputs(batch, h, w, n_ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_MMDITX_CONFIG
    return dict(
        x=torch.randn(batch, 16, h, w, generator=g).cuda(),
        sigma=torch.full((batch,), 0.85791015625),  # the sampler hands over CPU sigmas
        y=torch.randn(batch, cfg.adm_in_channels, generator=g).cuda().bfloat16(),
        context=torch.randn(batch, n_ctx, cfg.context_dim, generator=g).cuda().bfloat16(),
    )


@pytest.mark.gpu
@torch.inference_mode()
def test_replay_equals_eager_for_every_pass_and_shape():
    transformer, _, _ = tiny_components(device="cuda", dtype=torch.bfloat16)
    eager = TransformerPass(transformer)
    graphed = CUDAGraphPasses(TransformerPass(transformer), "cuda")
    cases = [
        (pass_inputs(2, 32, 32, 154), ()),  # CFG pass [cond, uncond]
        (pass_inputs(1, 32, 32, 154), ()),  # cond only (cfg <= 1)
        (pass_inputs(1, 32, 32, 154), (0,)),  # skip-layer pass
        (pass_inputs(2, 24, 40, 333), ()),  # another latent size and context length
    ]
    for inputs, skip in cases:
        for seed in (0, 1):  # the second call replays with new inputs copied into the static buffers
            inputs = {k: v if k == "sigma" else v + seed for k, v in inputs.items()}
            expected = eager(**inputs, skip_layers=skip)
            got = graphed(**inputs, skip_layers=skip)
            assert torch.equal(got, expected), (inputs["x"].shape, skip, (got - expected).abs().max())
    assert len(graphed.graphs) == 4


@pytest.mark.gpu
def test_pipeline_with_graphs_gives_the_eager_images():
    kw = dict(steps=4, width=128, height=96, progress=False, batch_size=2)
    graphed = Pipeline.from_preset("tiny", device="cuda")
    eager = Pipeline.from_preset("tiny", device="cuda", graphs=False)
    assert isinstance(graphed.model_pass, CUDAGraphPasses) and type(eager.model_pass) is TransformerPass
    a = np.stack([np.asarray(im) for im in graphed("a red cube", **kw)])
    b = np.stack([np.asarray(im) for im in eager("a red cube", **kw)])
    np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@torch.inference_mode()
def test_replay_with_controlnet_inputs_equals_eager(tmp_path):
    """The control latent and strength are graph inputs: new values replay correctly, no stale capture."""
    from fastsd35.controlnet import load_controlnet
    from fastsd35.tiny import write_tiny_controlnet

    controlnet = load_controlnet(write_tiny_controlnet(tmp_path / "cn.safetensors"), device="cuda", dtype=torch.bfloat16)
    transformer, _, _ = tiny_components(device="cuda", dtype=torch.bfloat16)
    eager = TransformerPass(transformer, controlnet)
    graphed = CUDAGraphPasses(TransformerPass(transformer, controlnet), "cuda")
    inputs = pass_inputs(2, 32, 32, 154)
    for seed, strength in ((0, 1.0), (1, 0.5)):
        latent = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        control = (latent, torch.tensor(strength, device="cuda"))
        assert torch.equal(graphed(**inputs, control=control), eager(**inputs, control=control))
    assert len(graphed.graphs) == 1
