"""Speed up a diffusers SD3 / SD3.5 pipeline in one line: `fastsd35.diffusers.accelerate(pipe)`.

`pipe.transformer` (a diffusers `SD3Transformer2DModel`) is replaced in place by `FastSD3Transformer`: a module with
the same forward signature, return values and the config/attributes the SD3 pipelines read, running `FastMMDiTX`
(Triton kernels on CUDA, reference ops elsewhere) on the same weights. The weights are moved, not copied: each
diffusers tensor is taken into the new module (as is, or concatenated into qkv) and released from the old one as it
goes, so the original transformer ends up empty and no second full copy is ever held (the one transient extra is the
fused adaLN matrix while it is filled). The key mapping is `checkpoints.DiffusersTransformerSource`'s.

diffusers is only imported when `accelerate` is called; importing this module does not need it.
"""

from __future__ import annotations

import importlib
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import CheckpointError
from .models.mmditx import FastMMDiTX, MMDiTXConfig
from .models.strict import check_keys_and_shapes
from .weights.checkpoints import DiffusersTransformerSource

SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3ControlNetPipeline")
SUPPORTED_PROCESSORS = ("JointAttnProcessor2_0",)  # diffusers' default SD3 processor, the math FastMMDiTX runs
WARMUP_CALLS = 2  # eager calls on a side stream before a CUDA graph capture


def _diffusers():
    """The diffusers package (never this module, whatever sys.path holds)."""
    module = importlib.import_module("diffusers")
    if module.__name__ == __name__ or not hasattr(module, "SD3Transformer2DModel"):
        raise ImportError("fastsd35.diffusers needs the diffusers package (pip install diffusers)")
    return module


def accelerate(pipe, *, graphs: bool = False):
    """Replace `pipe.transformer` of a diffusers `StableDiffusion3Pipeline`, `StableDiffusion3Img2ImgPipeline` or
    `StableDiffusion3ControlNetPipeline` in place with a `FastSD3Transformer` on the same weights (moved, not
    copied: the original transformer is left empty) and return `pipe`. `graphs=True` replays the transformer from
    CUDA graphs (CUDA only). Raises ValueError (one line) for anything that is not an SD3/SD3.5 pipeline or transformer
    or that the fast transformer cannot honour (LoRA layers not fused, a custom attention processor, hooks)."""
    if not isinstance(graphs, bool):
        raise ValueError(f"graphs must be True or False, got {graphs!r}")
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"accelerate() takes a diffusers {', '.join(SUPPORTED_PIPELINES)}, not a {name}")
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, FastSD3Transformer):
        raise ValueError(f"this {name} is already accelerated")
    pipe.transformer = FastSD3Transformer.from_diffusers(transformer, graphs=graphs)
    return pipe


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class FastSD3Transformer(nn.Module):
    """`FastMMDiTX` behind diffusers' `SD3Transformer2DModel` interface: `forward(hidden_states,
    encoder_hidden_states, pooled_projections, timestep, block_controlnet_hidden_states=None,
    joint_attention_kwargs=None, return_dict=True, skip_layers=None)`, `config` (diffusers' own), `dtype`, `device`.
    `model` is the FastMMDiTX (official key layout)."""

    def __init__(self, model: FastMMDiTX, config, *, graphs: bool = False):
        super().__init__()
        self.model, self.config = model, config
        if graphs and self.device.type != "cuda":
            raise ValueError(f"graphs=True needs the transformer on CUDA; it is on {self.device}")
        self.graphs = graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    @classmethod
    def from_diffusers(cls, transformer, *, graphs: bool = False) -> "FastSD3Transformer":
        """Move the weights of a diffusers `SD3Transformer2DModel` into a FastMMDiTX (see the module docstring). Every
        refusal comes before anything moves: a refused call leaves `transformer` as it was."""
        _check_transformer(transformer)
        if graphs and transformer.device.type != "cuda":
            raise ValueError(f"graphs=True needs the transformer on CUDA; it is on {transformer.device}")
        model = _move_weights(transformer)
        return cls(model, transformer.config, graphs=graphs)

    # -- what the pipelines read -------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.model.out_channels

    @property
    def inner_dim(self) -> int:
        return self.model.config.hidden_size

    def set_attn_processor(self, processor):
        raise ValueError("the fastsd35 transformer runs its own attention kernels: attention processors cannot be set")

    def _apply(self, fn, recurse=True):
        self._graphs.clear()  # captured graphs hold the old tensors
        return super()._apply(fn, recurse)

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        block_controlnet_hidden_states: list = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ):
        _check_joint_attention_kwargs(joint_attention_kwargs)
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ValueError("encoder_hidden_states, pooled_projections and timestep are required")
        # diffusers embeds the timestep from `timestep.float()` and casts the embedding to the model's dtype: feeding
        # FastMMDiTX an fp32 t does the same (a half-precision t would be rounded through its dtype first).
        t = torch.as_tensor(timestep, device=hidden_states.device).float().reshape(-1)
        t = t.expand(hidden_states.shape[0]) if t.numel() == 1 else t
        skip = tuple(sorted(set(skip_layers or ())))
        bad = [i for i in skip if not 0 <= i < self.model.depth]
        if bad:
            raise ValueError(f"skip_layers {bad} are not blocks of this {self.model.depth}-block transformer")
        states = list(block_controlnet_hidden_states or ())
        inputs = [hidden_states, encoder_hidden_states, pooled_projections, t, *states]
        device = self.device  # Triton launches on the current CUDA device: make it the model's
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            if self.graphs:
                out = self._replay(inputs, len(states), skip)
            else:
                out = self._run(inputs, len(states), skip)
        if not return_dict:
            return (out,)
        return _diffusers().models.modeling_outputs.Transformer2DModelOutput(sample=out)

    def _run(self, inputs, n_states, skip):
        x, context, pooled, t, *states = inputs
        residuals = per_block_residuals(states, self.model.depth, skip) if n_states else None
        return self.model(x, t, pooled, context, controlnet_hidden_states=residuals, skip_layers=skip)

    def _replay(self, inputs, n_states, skip):
        key = (tuple((tuple(v.shape), v.dtype) for v in inputs), skip)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs, n_states, skip)
        for static, value in zip(entry.inputs, inputs):
            static.copy_(value, non_blocking=True)
        entry.graph.replay()
        return entry.output.clone()  # the static output is overwritten by the next replay

    def _capture(self, inputs, n_states, skip) -> _Graph:
        device = self.device
        static = [v.to(device, copy=True) for v in inputs]
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._run(static, n_states, skip)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._run(static, n_states, skip)
        return _Graph(graph, static, output)


def per_block_residuals(states, depth: int, skip=()) -> list[torch.Tensor]:
    """diffusers' ControlNet residual schedule as one state per block, for FastMMDiTX (which adds
    `controlnet_hidden_states[i]` after block i when given `depth` states). diffusers adds
    `states[int(i / (depth / n))]` after every block i but the last (context_pre_only), skipped blocks included;
    FastMMDiTX drops a skipped block's residual, so it is added after the block that ran before it instead (the same
    sum: nothing runs in between)."""
    n = len(states)
    if not 0 < n <= depth:
        raise ValueError(f"{n} ControlNet residuals cannot be spread over {depth} blocks")
    interval = depth / n
    zero = torch.zeros_like(states[0])
    per_block = [zero] * depth  # the last block (and any skipped one) adds nothing
    last_run = None
    for i in range(depth - 1):
        state = states[int(i / interval)]
        if i not in skip:
            per_block[i], last_run = state, i
        elif last_run is None:
            raise ValueError(f"skip_layers {sorted(skip)} skip block {i} before any block ran: its ControlNet residual "
                             "would go before the first block, which the fastsd35 transformer does not support")
        else:
            per_block[last_run] = per_block[last_run] + state
    return per_block


def _check_joint_attention_kwargs(kwargs):
    """`scale` is the LoRA scale of unfused PEFT layers; after `accelerate` there are none (they must be fused
    first), so, as in diffusers with fused LoRA, it changes nothing. Anything else is for a custom attention
    processor, which the fast transformer does not run."""
    if not kwargs:
        return
    other = sorted(k for k in kwargs if k != "scale")
    if other:
        raise ValueError(f"joint_attention_kwargs {other} are not supported by the fastsd35 transformer "
                         "(only 'scale' is accepted)")
    scale = kwargs["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"joint_attention_kwargs['scale'] must be a finite number, got {scale!r}")


def _check_transformer(transformer):
    """One-line ValueError unless `transformer` is a plain SD3/SD3.5 SD3Transformer2DModel we can run."""
    diffusers = _diffusers()
    if not isinstance(transformer, diffusers.SD3Transformer2DModel):
        raise ValueError(f"pipe.transformer is a {type(transformer).__name__}, not a diffusers SD3Transformer2DModel")
    cfg = transformer.config
    depth = cfg.num_layers
    problems = []
    if cfg.attention_head_dim != 64 or cfg.num_attention_heads != depth:
        problems.append(f"{cfg.num_attention_heads} heads of {cfg.attention_head_dim} for {depth} layers "
                        f"(SD3 has {depth} heads of 64)")
    if cfg.caption_projection_dim != 64 * depth:
        problems.append(f"caption_projection_dim {cfg.caption_projection_dim} != hidden size {64 * depth}")
    if cfg.qk_norm not in (None, "rms_norm"):
        problems.append(f"qk_norm {cfg.qk_norm!r}")
    if cfg.pos_embed_max_size is None:
        problems.append("no pos_embed_max_size")
    if problems:
        raise ValueError(f"pipe.transformer is not an SD3/SD3.5 transformer: {'; '.join(problems)}")
    if hasattr(transformer, "_hf_hook") or getattr(transformer, "_diffusers_hook", None) is not None:
        raise ValueError("pipe.transformer has offloading/casting hooks: call accelerate(pipe) before enabling them")
    peft = sorted({n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if ".lora_" in n})
    if peft or any(".base_layer." in n for n, _ in transformer.named_parameters()):
        raise ValueError(f"pipe.transformer has diffusers LoRA layers ({', '.join(peft[:2]) or 'PEFT'}...): run "
                         "pipe.fuse_lora() and pipe.unload_lora_weights() before accelerate(pipe)")
    for name, processor in transformer.attn_processors.items():
        if type(processor).__name__ not in SUPPORTED_PROCESSORS:
            raise ValueError(f"pipe.transformer.{name} is a {type(processor).__name__}: the fastsd35 transformer only "
                             f"runs diffusers' default {', '.join(SUPPORTED_PROCESSORS)}")


def _adaln_names(depth: int) -> list[str]:
    """The official names of the adaLN Linears in `MMDiTX._adaln_linears()` order."""
    names = []
    for i in range(depth):
        names += [f"joint_blocks.{i}.context_block.adaLN_modulation.1", f"joint_blocks.{i}.x_block.adaLN_modulation.1"]
    return names + ["final_layer.adaLN_modulation.1"]


def _move_weights(transformer) -> FastMMDiTX:
    """A FastMMDiTX holding `transformer`'s weights, taken one tensor at a time and released from `transformer` as
    they are taken: 1:1 tensors are shared as they are (same dtype and device), qkv is concatenated, adaLN weights
    are copied into the fused matrix. `transformer` is left with empty tensors."""
    dtype, device = transformer.dtype, transformer.device
    state = dict(transformer.state_dict(keep_vars=True))  # references only
    source = DiffusersTransformerSource.from_state_dict(state, label="pipe.transformer")
    try:
        source.check_mapped()
        shapes = source.shapes
        config = MMDiTXConfig.from_shapes(shapes, source="pipe.transformer")
        with torch.device("meta"):
            model = FastMMDiTX(config, dtype=dtype)
        check_keys_and_shapes(model, shapes, "pipe.transformer")
    except CheckpointError as e:
        raise ValueError(str(e)) from None

    def take(key: str) -> torch.Tensor:
        tensor = source.get(key).detach().to(device, dtype)
        for raw_key, _, _ in source.recipes[key]:
            _release(transformer, raw_key, state.pop(raw_key))
        return tensor

    with torch.no_grad():
        # The adaLN Linears are slices of one matrix (MMDiTX.modulations): fill it, then point them at it.
        lins = model._adaln_linears()
        names = _adaln_names(config.depth)
        rows = sum(lin.out_features for lin in lins)
        w = torch.empty(rows, config.hidden_size, dtype=dtype, device=device)
        b = torch.empty(rows, dtype=dtype, device=device)
        row = 0
        for lin, name in zip(lins, names):
            n = lin.out_features
            w[row : row + n].copy_(take(f"{name}.weight"))
            b[row : row + n].copy_(take(f"{name}.bias"))
            lin.weight, lin.bias = nn.Parameter(w[:0], requires_grad=False), nn.Parameter(b[:0], requires_grad=False)
            row += n
        model._point_adaln_at(w, b)
        adaln = {f"{name}.{leaf}" for name in names for leaf in ("weight", "bias")}
        for key in model.state_dict(keep_vars=True):
            if key in adaln:
                continue
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            tensor = take(key)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[leaf] = tensor
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:  # an internal error: every tensor must have been filled
        raise RuntimeError(f"FastSD3Transformer: weights not moved: {left[:4]}")
    return model.eval()


def _release(transformer: nn.Module, key: str, tensor: torch.Tensor):
    """Replace the tensor `key` of `transformer` by an empty one, so its storage goes once nothing else holds it."""
    owner, _, leaf = key.rpartition(".")
    module = transformer.get_submodule(owner) if owner else transformer
    empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
    else:
        module._buffers[leaf] = empty


__all__ = ["FastSD3Transformer", "accelerate", "per_block_residuals"]
