"""Random-weight models built in code from a fixed seed: for self-tests, parity tests and `--preset tiny`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

_WEIGHTED = (nn.Linear, nn.Conv2d, nn.Embedding)


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
