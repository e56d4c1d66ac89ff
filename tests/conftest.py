import os

import torch

# CPU-only machines run the Triton kernels in Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastsd35.models.mmditx import MMDiTXConfig# noqa: E402

# Tiny transformers that follow the released rule hidden = 64 * depth, heads = depth.
TINY_CONFIGS = {
    "sd3": MMDiTXConfig(depth=2, pos_embed_max_size=16, context_dim=48, adm_in_channels=40),
    "sd35_large": MMDiTXConfig(depth=2, pos_embed_max_size=16, context_dim=48, adm_in_channels=40, qk_norm="rms"),
    "sd35_medium": MMDiTXConfig(
        depth=3, pos_embed_max_size=24, context_dim=48, adm_in_channels=40, qk_norm="rms", x_block_self_attn_layers=(0, 1)
    ),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request) -> MMDiTXConfig:
    return TINY_CONFIGS[request.param]
