"""CUDA graphs for the denoiser passes (DESIGN.md "CUDA graphs").

`CUDAGraphPasses` wraps a transformer pass (`runner.TransformerPass`: v = model(x, t, y, context, ...)) and replays
one captured graph per (batch, latent h x w, context length, dtypes, skip-layer set, ControlNet on/off): the CFG pass
[cond, uncond], the cond-only pass (cfg <= 1) and the skip-layer pass each get their own. Inputs are copied into the
graph's static buffers and the output is copied out of its static buffer; everything the forward allocates (the
joint q/k/v/out workspaces included) comes from one memory pool shared by the graphs, allocated once per shape. The
sampler's arithmetic stays outside the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WARMUP_CALLS = 2  # eager calls on a side stream before capture: Triton autotuning and cuBLAS/allocator warm-up


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class CUDAGraphPasses:
    """Capture-once, replay-many wrapper of a transformer pass with the same call signature:
    `passes(x, sigma, y, context, skip_layers=(), control=None) -> v`."""

    def __init__(self, model_pass, device):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}: run the pass eagerly (--no-graphs)")
        self.model_pass, self.device = model_pass, device
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, x, sigma, y, context, *, skip_layers=(), control=None) -> torch.Tensor:
        inputs = {"x": x, "sigma": sigma, "y": y, "context": context}
        if control is not None:
            inputs["control_latent"], inputs["control_strength"] = control
        key = (tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items()), tuple(sorted(skip_layers)))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, tuple(skip_layers))
        for name, value in inputs.items():
            entry.inputs[name].copy_(value, non_blocking=True)
        entry.graph.replay()
        return entry.output.clone()  # the static output is overwritten by the next replay

    def _capture(self, inputs: dict[str, torch.Tensor], skip_layers: tuple) -> _Graph:
        static = {name: value.to(self.device, copy=True) for name, value in inputs.items()}
        control = (static["control_latent"], static["control_strength"]) if "control_latent" in static else None
        tensors = {name: static[name] for name in ("x", "sigma", "y", "context")}

        def run():
            return self.model_pass(**tensors, skip_layers=skip_layers, control=control)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = run()
        return _Graph(graph, static, output)

    def clear(self):
        """Drop every captured graph (and, with them, their memory)."""
        self.graphs.clear()
