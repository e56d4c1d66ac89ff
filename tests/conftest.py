import os

import torch

# CPU-only machines run the Triton kernels in Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastsd35.models.mmditx import MMDiTXConfig  # noqa: E402

from helpers.models import TINY_CONFIGS  # noqa: E402


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
