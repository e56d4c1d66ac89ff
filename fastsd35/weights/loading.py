"""Networks allocated on their device without initialisation and filled from checkpoint tensors, one at a time: no
second copy of the weights is ever held, and any mismatch is one CheckpointError naming the source."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.devices import default_dtype
from ..models.fp8 import empty_fp8, fp8_layer_names, is_fp8
from ..models.strict import check_keys_and_shapes
from .fp8 import FP8Reader


def load_module(cls, config, source, *, dtype, device) -> nn.Module:
    """`cls.empty(config)` on `device` in `dtype`, filled from `source` (a checkpoints.TensorSource-like object with
    `shapes`, `get` and `label`), ready for inference. FP8 files are read through weights.fp8.FP8Reader; with
    `dtype="fp8"` the FP8 layers (fastsd35.models.fp8) are FP8Linear and the rest is in the device's default dtype."""
    source = FP8Reader(source, device)
    with torch.device("meta"):  # the key set and shapes are checked before any memory is allocated
        check_keys_and_shapes(cls(config, dtype=default_dtype(device) if is_fp8(dtype) else dtype), source.shapes, source.label)
    if is_fp8(dtype):
        module = empty_fp8(cls, config, dtype=default_dtype(device), device=device,
                           fp8_matmul=not source.full_precision_matmul)
        source.hold_fp8(f"{name}.weight" for name in fp8_layer_names(module))
    else:
        module = cls.empty(config, dtype=dtype, device=device)
    module.load_weights(source.shapes, source.get, source=source.label)
    return module.eval().requires_grad_(False)
