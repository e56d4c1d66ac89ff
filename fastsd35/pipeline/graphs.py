"""CUDA graphs for the denoiser passes (DESIGN.md "CUDA graphs").

`CUDAGraphPasses` wraps a transformer pass (`runner.TransformerPass`: v = model(x, t, y, context, ...)) and replays
one captured graph per `graph_key`: (batch, latent h x w, context length, dtypes, skip-layer set, ControlNet on/off).
The CFG pass [cond, uncond], the cond-only pass (cfg <= 1) and the skip-layer pass each get their own; with the step
cache (fastsd35.pipeline.caching), so do each pass's head, tail and reuse stages. Inputs are
copied into the graph's static buffers (`refresh`) and the output is copied out of its static buffer; everything the
forward allocates (the joint q/k/v/out workspaces included) comes from one memory pool shared by the graphs,
allocated once per shape. The sampler's arithmetic stays outside the graphs.

The cache logic (keys, static buffers, refresh, dropping a failed capture, out-of-memory) is plain Python over a
`capturer`; `CUDACapturer` is the only part that talks to CUDA. Everything it does (warm-up stream, capture stream,
memory pool, the synchronisation `torch.cuda.graph` does on entry) happens under `torch.cuda.device(device)`, so a
model on `cuda:1` captures and replays on cuda:1 whatever the current device is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

import torch

# Eager calls on a side stream before capture. One suffices: the first call JIT-compiles and autotunes the Triton
# kernels (the autotuner times its candidates then, and must not run inside a capture), creates the cuBLAS handle and
# workspace, and fills the model's per-device caches (timestep frequencies); the forward allocates nothing else
# lazily (its workspaces are allocated on every call), so a second eager call would find nothing left to initialise.
# The GPU test that replays against eager at real size fails if that stops being true.
WARMUP_CALLS = 1

PASS_INPUTS = ("x", "sigma", "y", "context")
CONTROL_INPUTS = ("control_latent", "control_strength")


def pass_inputs(x, sigma, y, context, control=None) -> dict[str, torch.Tensor]:
    """A pass's tensors by name (the ControlNet's latent and strength only when given)."""
    inputs = dict(zip(PASS_INPUTS, (x, sigma, y, context)))
    if control is not None:
        inputs.update(zip(CONTROL_INPUTS, control))
    return inputs


def graph_key(inputs: dict[str, torch.Tensor], skip_layers=()) -> tuple:
    """What one captured graph is valid for: every input's name, shape and dtype (so the ControlNet's presence too),
    and the set of skipped layers. Values are not part of it: they are copied in before each replay."""
    return tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items()), tuple(sorted(set(skip_layers)))


def static_copies(inputs: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The graph's own input buffers on `device`, holding the values of `inputs`."""
    return {name: value.to(device, copy=True) for name, value in inputs.items()}


def refresh(static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    """Copy this call's inputs into the graph's static buffers (the sampler's CPU sigmas included)."""
    for name, value in inputs.items():
        static[name].copy_(value, non_blocking=True)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is, or was raised while handling, an out-of-memory. During a capture an allocation failure
    raises OutOfMemoryError inside `torch.cuda.graph`, whose exit then fails to end the invalidated capture: what
    reaches the caller is a RuntimeError whose __context__ is the OutOfMemoryError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        text = str(error)
        if "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


class Capturer(Protocol):
    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm `run` up, capture it; return (replay, static output). On failure, leave nothing captured behind."""


class CUDACapturer:
    """Captures on `device` (not the current one): side stream, capture stream and memory pool all belong to it."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}: run the pass eagerly (--no-graphs)")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self.pool = torch.cuda.graph_pool_handle()  # shared by every graph of these passes
            # Our own capture stream: torch.cuda.graph's default one is created once per process on whichever device
            # was current then, and would capture cuda:1's work on a cuda:0 stream.
            self.stream = torch.cuda.Stream(self.device)

    def capture(self, run):
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    run()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    output = run()
            except BaseException:
                # torch.cuda.graph's exit leaves the capture stream current when ending the capture fails: restore
                # the caller's, and drop the half-captured graph (the capture's own error is the one to report).
                torch.cuda.set_stream(current)
                with contextlib.suppress(RuntimeError):
                    graph.reset()
                raise
            return partial(self._replay, graph), output

    def _replay(self, graph: torch.cuda.CUDAGraph):
        with torch.cuda.device(self.device):  # on the current stream of the graph's device
            graph.replay()


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def _cloned(output):
    """A copy of a graph's static output (a tensor, a tuple or a dict of them): the next replay overwrites it."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, dict):
        return {k: v.clone() for k, v in output.items()}
    return tuple(v.clone() for v in output)


class CUDAGraphPasses:
    """Capture-once, replay-many wrapper of a transformer pass with the same call signature:
    `passes(x, sigma, y, context, skip_layers=(), control=None) -> v`, and the staged pass of the step cache
    (`head`, `tail`, `reuse`: runner.TransformerPass), each stage a graph of its own, so that the host decides
    between the tail and the reuse after the head. `capturer` defaults to `CUDACapturer(device)` (tests hand in
    another to run the cache logic on the CPU)."""

    def __init__(self, model_pass, device, *, capturer: Capturer | None = None):
        self.model_pass, self.device = model_pass, torch.device(device)
        self.capturer = capturer or CUDACapturer(self.device)
        self.graphs: dict[tuple, _Graph] = {}

    def __call__(self, x, sigma, y, context, *, skip_layers=(), control=None) -> torch.Tensor:
        inputs = pass_inputs(x, sigma, y, context, control)
        key = graph_key(inputs, skip_layers)

        def run(static):
            control = tuple(static[n] for n in CONTROL_INPUTS) if CONTROL_INPUTS[0] in static else None
            return self.model_pass(*(static[n] for n in PASS_INPUTS), skip_layers=key[1], control=control)

        return self._replay(key, inputs, run)

    def head(self, x, sigma, y, context, *, blocks: int, control=None) -> dict[str, torch.Tensor]:
        inputs = pass_inputs(x, sigma, y, context, control)

        def run(static):
            control = tuple(static[n] for n in CONTROL_INPUTS) if CONTROL_INPUTS[0] in static else None
            return self.model_pass.head(*(static[n] for n in PASS_INPUTS), blocks=blocks, control=control)

        return self._replay(("head", graph_key(inputs), blocks), inputs, run)

    def tail(self, head: dict[str, torch.Tensor], *, blocks: int, hw) -> tuple[torch.Tensor, torch.Tensor]:
        return self._replay(("tail", graph_key(head), blocks, tuple(hw)), head,
                            lambda static: self.model_pass.tail(static, blocks=blocks, hw=hw))  # fmt: skip

    def reuse(self, head: dict[str, torch.Tensor], tail_residual: torch.Tensor, *, hw) -> torch.Tensor:
        inputs = {**head, "tail_residual": tail_residual}
        return self._replay(("reuse", graph_key(inputs), tuple(hw)), inputs,
                            lambda static: self.model_pass.reuse(static, static["tail_residual"], hw=hw))  # fmt: skip

    def _replay(self, key, inputs: dict[str, torch.Tensor], run):
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, run)  # not cached when the capture fails
        else:
            refresh(entry.inputs, inputs)
        entry.replay()
        return _cloned(entry.output)  # the static output is overwritten by the next replay

    def _capture(self, inputs: dict[str, torch.Tensor], run) -> _Graph:
        static = static_copies(inputs, self.device)
        try:
            replay, output = self.capturer.capture(lambda: run(static))
        except Exception as e:
            if is_out_of_memory(e) and not isinstance(e, torch.cuda.OutOfMemoryError):
                raise torch.cuda.OutOfMemoryError(f"out of memory while capturing a CUDA graph: {e}") from e
            raise
        return _Graph(replay, static, output)

    def clear(self):
        """Drop every captured graph (and, with them, their memory)."""
        self.graphs.clear()
