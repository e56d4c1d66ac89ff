"""Text conditioning: CLIP-L, CLIP-G and T5-XXL (transformers models) turn prompts into the SD3 context and pooled
vectors, as the reference's `get_cond` does (SPEC.md §6):

* CLIP-L and CLIP-G: the hidden state after the penultimate layer (no final LayerNorm) for the context; for the pooled
  vector, the final-LayerNorm'd last-layer state at the first EOS, **unprojected** for CLIP-L and projected by
  `text_projection` for CLIP-G.
* T5-XXL v1.1 encoder: the last layer with its final norm, with no attention mask (padding is attended to).
* context = cat(pad(cat(l, g) to the T5 width), t5) along the sequence: (B, 77 + L_t5, W); pooled = cat(l, g).

Departures from the reference (DESIGN.md): all prompts of one `encode` call share one T5 length (see
`fastsd35.models.tokenization`), the T5 text is not cut at 226 characters, CLIP truncation warns, and a no-T5 mode puts zeros
(B, 77, W) where T5's output would be, as diffusers does without `text_encoder_3`.

Loading them from files is fastsd35.weights.text_encoders. Encoder configs are built in code: the released CLIP-L (12 layers, 768, quick_gelu), CLIP-G (32 layers, 1280, gelu,
projection 1280) and T5-v1.1-XXL (24 layers, 4096, gated-gelu) all follow from their weight shapes, with two rules
that shapes cannot tell: CLIP heads are 64 wide (16 wide when the width is not a multiple of 64, as in the tiny test
models) and T5's relative-position buckets reach 128 tokens.
"""

from __future__ import annotations

import gc
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, FastSD35Error
from .tokenization import T5_MIN_LENGTH, Tokens, check_t5_tokens, special_ids, tokenize

ENCODERS = ("clip_l", "clip_g", "t5xxl")
LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tensor under two names; files hold either


# -- configs -----------------------------------------------------------------------------------------------------


def clip_config(vocab: int, hidden: int, intermediate: int, layers: int, positions: int, projection: int, role: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // (64 if hidden % 64 == 0 else 16), max_position_embeddings=positions,
        hidden_act="quick_gelu" if role == "clip_l" else "gelu", layer_norm_eps=1e-5, projection_dim=projection,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,  # CLIP's BOS/EOS are its last ids
    )


def t5_config(vocab: int, d_model: int, d_ff: int, heads: int, d_kv: int, layers: int, buckets: int = 32):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=d_kv, num_layers=layers,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _need(shapes: Mapping[str, tuple], key: str, what: str, source: str) -> tuple:
    if key not in shapes:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors at all"
        raise CheckpointError(f"{source}: not a {what} text encoder: key '{key}' is missing (found {len(shapes)} tensors "
                              f"such as {sample})")
    return tuple(shapes[key])


def _layers(shapes: Mapping[str, tuple], pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in shapes if (m := re.match(pattern, k))), default=-1)


def clip_config_from_shapes(shapes: Mapping[str, tuple], role: str, source: str = "state dict"):
    vocab, hidden = _need(shapes, "text_model.embeddings.token_embedding.weight", LABELS[role], source)
    positions = _need(shapes, "text_model.embeddings.position_embedding.weight", LABELS[role], source)[0]
    intermediate = _need(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", LABELS[role], source)[0]
    if role == "clip_g":  # CLIP-G's pooled vector is projected: its file must have the projection
        _need(shapes, "text_projection.weight", LABELS[role], source)
    projection = shapes.get("text_projection.weight", (hidden,))[0]
    layers = _layers(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
    return clip_config(vocab, hidden, intermediate, layers, positions, projection, role)


def t5_config_from_shapes(shapes: Mapping[str, tuple], source: str = "state dict"):
    embed = shapes.get(T5_EMBEDDINGS[0]) or _need(shapes, T5_EMBEDDINGS[1], "T5", source)
    inner = _need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5", source)[0]
    buckets, heads = _need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5", source)
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise CheckpointError(f"{source}: a T5 v1.0 encoder (ReLU feed-forward); SD3 needs the T5 v1.1 XXL encoder")
    d_ff = _need(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5 v1.1", source)[0]
    layers = _layers(shapes, r"encoder\.block\.(\d+)\.")
    return t5_config(embed[0], embed[1], d_ff, heads, inner // heads, layers, buckets)


# -- building --------------------------------------------------------------------------------------------------


def allocate(cls, config, device, dtype) -> torch.nn.Module:
    """`cls(config)` with uninitialised weights, allocated once on `device` in `dtype` (no CPU copy first)."""
    with torch.device("meta"):
        model = cls(config)
    persistent = set(model.state_dict())
    model.to(dtype=dtype)
    if dtype == torch.float16:  # as transformers' from_pretrained does: T5's `wo` stays fp32 so fp16 cannot overflow
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, module in model.named_modules():
            if name.split(".")[-1] in keep:
                module.float()
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in persistent:
                continue
            if not name.endswith("position_ids"):
                raise RuntimeError(f"internal: no rule to initialise the buffer {name} of {cls.__name__}")
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
    if hasattr(model, "shared"):  # T5: to_empty unties the input embedding from `shared`
        model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


# -- the encoders ------------------------------------------------------------------------------------------------


class TextEncoders:
    """CLIP-L, CLIP-G and (optionally) T5-XXL with their tokenizers. `encode(prompts)` gives the SD3 context and pooled
    vectors; prompts encoded in one call share one T5 length, so pass cond and negative prompts together.

    Without T5 (`t5=None`), `t5_width` (the transformer's context width, 4096 for SD3/3.5) must be given and zeros of
    shape (B, 77, t5_width) stand in for T5's output."""

    def __init__(self, clip_l, clip_g, t5, tokenizer_l, tokenizer_g, tokenizer_t5=None, *, t5_tokens: int = 256,
                 t5_width: int | None = None):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        self.t5_tokens = check_t5_tokens(t5_tokens)
        if t5 is not None:
            if tokenizer_t5 is None:
                raise ValueError("a T5 model needs its tokenizer")
            if t5_width is not None and t5_width != t5.config.d_model:
                raise FastSD35Error(f"t5_width={t5_width} but the T5 encoder is {t5.config.d_model} wide")
            t5_width = t5.config.d_model
        elif t5_width is None:
            raise ValueError("without T5, t5_width (the transformer's context width, 4096 for SD3/3.5) must be given")
        self.context_width = t5_width
        self.pooled_width = clip_l.config.hidden_size + clip_g.config.projection_dim
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_width > t5_width:
            raise FastSD35Error(f"CLIP-L + CLIP-G features ({clip_l.config.hidden_size} + {clip_g.config.hidden_size}) "
                                f"are wider than the context ({t5_width}): these text encoders do not belong together")
        pairs = [("CLIP-L", tokenizer_l, clip_l), ("CLIP-G", tokenizer_g, clip_g), ("T5-XXL", tokenizer_t5, t5)]
        for label, tokenizer, model in pairs:
            if model is not None and len(tokenizer) > model.config.vocab_size:
                raise FastSD35Error(f"the {label} tokenizer has {len(tokenizer)} tokens but the {label} encoder only "
                                    f"{model.config.vocab_size}: the tokenizer belongs to another model")

    @property
    def device(self) -> torch.device:
        return next(self.clip_l.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip_l.parameters()).dtype

    def tokenize(self, prompts: Sequence[str]) -> Tokens:
        t5_tokenizer = self.tokenizer_t5 if self.t5 is not None else None
        return tokenize(prompts, self.tokenizer_l, self.tokenizer_g, t5_tokenizer, self.t5_tokens)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77 + L_t5, W), pooled (B, l + g)) in float32 on the encoders' device; L_t5 = max(77, longest
        prompt's T5 tokens + 1), or 77 without T5."""
        if self.clip_l is None:
            raise RuntimeError("these text encoders were released")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        tokens = self.tokenize(prompts)
        device = self.device
        l_hidden, l_pooled = _clip_forward(self.clip_l, tokens.l.to(device), special_ids(self.tokenizer_l, "clip")[1])
        g_hidden, g_pooled = _clip_forward(self.clip_g, tokens.g.to(device), special_ids(self.tokenizer_g, "clip")[1])
        g_pooled = self.clip_g.text_projection(g_pooled)
        clip = torch.cat([l_hidden, g_hidden], dim=-1).float()
        clip = F.pad(clip, (0, self.context_width - clip.shape[-1]))
        if self.t5 is not None:
            t5 = self.t5(input_ids=tokens.t5.to(device)).last_hidden_state.float()
        else:
            t5 = clip.new_zeros(len(prompts), T5_MIN_LENGTH, self.context_width)
        return torch.cat([clip, t5], dim=1), torch.cat([l_pooled, g_pooled], dim=-1).float()

    def to(self, device) -> "TextEncoders":
        for model in (self.clip_l, self.clip_g, self.t5):
            if model is not None:
                model.to(device)
        return self

    def release(self):
        """Drop the models (tokenizers stay) and return their memory; `encode` raises afterwards."""
        on_cuda = self.clip_l is not None and self.device.type == "cuda"
        self.clip_l = self.clip_g = self.t5 = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def _clip_forward(model, ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate layer's hidden state, final-LayerNorm'd last state at the first EOS) of a CLIP text model."""
    out = model.text_model(input_ids=ids, output_hidden_states=True)
    first_eos = (ids == eos).int().argmax(dim=-1)
    return out.hidden_states[-2], out.last_hidden_state[torch.arange(len(ids), device=ids.device), first_eos]
