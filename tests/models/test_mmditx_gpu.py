"""The production configuration on a GPU (all `gpu`-marked): full-size SD3.5 Large and Medium transformers with random
weights in bf16, FastMMDiTX (the Triton kernels) against MMDiTX (the reference ops), both measured against the same
model in fp32; and CUDA-graph replay against eager at the real size (1024x1024, CFG batch 2), bit for bit."""

import pytest
import torch

from fastsd35.benchmarks.cases import random_weights_
from fastsd35.pipeline.graphs import CUDAGraphPasses
from fastsd35.models.mmditx import CONFIGS, FastMMDiTX, MMDiTX
from fastsd35.pipeline.runner import TransformerPass

pytestmark = pytest.mark.gpu
MODELS = ["sd3.5_large", "sd3.5_medium"]


def step_inputs(config, batch, latent, n_ctx=154, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    return dict(x=randn(batch, config.in_channels, latent, latent), sigma=torch.full((batch,), 0.75),
                y=randn(batch, config.adm_in_channels), context=randn(batch, n_ctx, config.context_dim))


def relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("name", MODELS)
@torch.inference_mode()
def test_full_size_bf16_fast_model_is_as_close_to_fp32_as_the_reference(name, monkeypatch):
    """At 512x512 (1,024 + 154 tokens; every block, every weight at full size): FastMMDiTX in bf16 is no further from
    the fp32 model than MMDiTX in bf16 is (x1.5 + 1e-3), and close to it outright."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true fp32 reference (patch-embedding conv)
    config = CONFIGS[name]
    fast = random_weights_(FastMMDiTX.empty(config, dtype=torch.bfloat16, device="cuda"))
    weights = fast.state_dict()
    inputs = step_inputs(config, batch=2, latent=64)

    def run(model):
        out = TransformerPass(model)(**inputs)
        assert torch.isfinite(out).all(), type(model).__name__
        return out

    exact = MMDiTX.from_state_dict(weights, dtype=torch.float32, device="cuda")
    expected = run(exact)
    del exact
    reference = run(MMDiTX.from_state_dict(weights, dtype=torch.bfloat16, device="cuda"))
    got = run(fast)
    floor, err = relative_error(reference, expected), relative_error(got, expected)
    assert err <= 1.5 * floor + 1e-3, (name, err, floor)
    assert relative_error(got, reference) < 0.05, name


@pytest.mark.parametrize("name", MODELS)
@torch.inference_mode()
def test_graph_replay_equals_eager_at_real_size(name):
    """1024x1024, 154 context tokens: the CFG pass (batch 2) and the cond-only skip-layer pass (batch 1), each
    captured, then replayed with new inputs; every output equals the eager pass bit for bit."""
    config = CONFIGS[name]
    model = random_weights_(FastMMDiTX.empty(config, dtype=torch.bfloat16, device="cuda"))
    eager, graphed = TransformerPass(model), CUDAGraphPasses(TransformerPass(model), "cuda")
    for batch, skip in ((2, ()), (1, (7, 8, 9))):
        for seed in (0, 1):
            inputs = step_inputs(config, batch, latent=128, seed=seed)
            expected = eager(**inputs, skip_layers=skip)
            got = graphed(**inputs, skip_layers=skip)
            assert torch.isfinite(expected).all() and torch.equal(got, expected), (name, batch, seed)
    assert len(graphed.graphs) == 2
    graphed.clear()
