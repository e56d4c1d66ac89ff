"""Modules filled strictly from named tensors: the key set and every shape must match before a tensor is copied,
and any mismatch is one CheckpointError naming the source. The networks mix in `StrictLoading`; where the tensors
come from (files, FP8 layouts) is the weights layer's business (fastsd35.weights.loading)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError


class StrictLoading:
    """For nn.Modules built as `cls(config, dtype=..., device=...)`."""

    @classmethod
    def empty(cls, config, *, dtype=None, device=None):
        """A module with uninitialised weights allocated directly on `device` (for loading a checkpoint into)."""
        with torch.device("meta"):
            module = cls(config, dtype=dtype)
        return module.to_empty(device=device or "cpu")

    def load_weights(self, shapes: Mapping[str, Sequence[int]], get: Callable[[str], torch.Tensor], source="state dict"):
        """Strict load: `shapes` must list exactly this module's keys with matching shapes (else CheckpointError
        naming `source`); each tensor is fetched with `get(key)` and copied in place, one at a time."""
        check_keys_and_shapes(self, shapes, source)
        with torch.no_grad():
            for key, tensor in self.state_dict(keep_vars=True).items():
                tensor.data.copy_(get(key))
        return self


def check_keys_and_shapes(module: nn.Module, shapes: Mapping[str, Sequence[int]], source: str):
    """Raise CheckpointError naming `source` unless `shapes` has exactly the module's keys with matching shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {tuple(shapes[k])} (expected {expected[k]})" for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        config = getattr(module, "config", None)
        name = getattr(config, "variant", None)  # our transformer configs name the released model they describe
        what = f" (expected {name if name != 'custom' else config})" if name else ""
        raise CheckpointError(f"{source}: weights do not match the model{what}: " + "; ".join(problems))
