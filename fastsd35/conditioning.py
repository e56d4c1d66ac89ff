"""Text conditioning: CLIP-L, CLIP-G and T5-XXL (transformers models) turn prompts into the SD3 context and pooled
vectors, as the reference's `get_cond` does (SPEC.md §6):

* CLIP-L and CLIP-G: the hidden state after the penultimate layer (no final LayerNorm) for the context; for the pooled
  vector, the final-LayerNorm'd last-layer state at the first EOS, **unprojected** for CLIP-L and projected by
  `text_projection` for CLIP-G.
* T5-XXL v1.1 encoder: the last layer with its final norm, with no attention mask (padding is attended to).
* context = cat(pad(cat(l, g) to the T5 width), t5) along the sequence: (B, 77 + L_t5, W); pooled = cat(l, g).

Departures from the reference (DESIGN.md): all prompts of one `encode` call share one T5 length (see
`fastsd35.tokenization`), the T5 text is not cut at 226 characters, CLIP truncation warns, and a no-T5 mode puts zeros
(B, 77, W) where T5's output would be, as diffusers does without `text_encoder_3`.

Encoder configs are built in code: the released CLIP-L (12 layers, 768, quick_gelu), CLIP-G (32 layers, 1280, gelu,
projection 1280) and T5-v1.1-XXL (24 layers, 4096, gated-gelu) all follow from their weight shapes, with two rules
that shapes cannot tell: CLIP heads are 64 wide (16 wide when the width is not a multiple of 64, as in the tiny test
models) and T5's relative-position buckets reach 128 tokens.
"""

from __future__ import annotations

import gc
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .checkpoints import TensorSource, diffusers_weight_headers, default_device, default_dtype, safetensors_header
from .errors import CheckpointError, FastSD35Error
from .fp8_checkpoints import FP8Reader
from .weights import check_keys_and_shapes
from .tiny import randomize_
from .tokenization import (
    CLIP_LENGTH,
    T5_MIN_LENGTH,
    Tokens,
    check_t5_tokens,
    find_tokenizer,
    special_ids,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
    tokenize,
)

ENCODERS = ("clip_l", "clip_g", "t5xxl")
LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
OFFICIAL_FILES = {"clip_l": ("clip_l.safetensors",), "clip_g": ("clip_g.safetensors",),
                  "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl.safetensors")}  # then any other t5xxl*.safetensors
DIFFUSERS_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"}
SINGLE_FILE_PREFIX = "text_encoders.{}.transformer."
_CLIP_EXTRA_KEYS = ("text_model.embeddings.position_ids", "logit_scale")  # carried by some CLIP files; not weights
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tensor under two names; files hold either


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
    embed = shapes.get(_T5_EMBEDDINGS[0]) or _need(shapes, _T5_EMBEDDINGS[1], "T5", source)
    inner = _need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5", source)[0]
    buckets, heads = _need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5", source)
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise CheckpointError(f"{source}: a T5 v1.0 encoder (ReLU feed-forward); SD3 needs the T5 v1.1 XXL encoder")
    d_ff = _need(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5 v1.1", source)[0]
    layers = _layers(shapes, r"encoder\.block\.(\d+)\.")
    return t5_config(embed[0], embed[1], d_ff, heads, inner // heads, layers, buckets)


# -- building and loading ----------------------------------------------------------------------------------------


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


def load_weights(model: torch.nn.Module, source, label: str, *, defaults: Mapping[str, Callable] = {},
                 aliases: Mapping[str, str] = {}, ignore: Sequence[str] = ()):
    """Strict load, one tensor at a time. `defaults`: model key -> factory for a tensor the file may lack; `aliases`:
    model key -> another file key holding the same tensor; `ignore`: file keys that are not weights."""
    stored = source.shapes
    where = {k: k for k in stored if k not in ignore}
    where.update({k: alt for k, alt in aliases.items() if k not in where and alt in stored})
    expected = model.state_dict()
    where.update({k: None for k in defaults if k not in where and k in expected})
    shapes = {k: (stored[f] if f else tuple(expected[k].shape)) for k, f in where.items()}
    check_keys_and_shapes(model, shapes, label)
    done = set()
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in done:  # tied weights appear under two names
                done.add(id(tensor))
                tensor.copy_(source.get(where[key]) if where[key] else defaults[key]())


def load_clip(source, role: str, *, device, dtype):
    from transformers import CLIPTextModelWithProjection

    label = f"{source.label} ({LABELS[role]})"
    config = clip_config_from_shapes(source.shapes, role, label)
    model = allocate(CLIPTextModelWithProjection, config, device, dtype)
    eye = lambda: torch.eye(config.hidden_size)  # noqa: E731  the reference's default: CLIP-L files may lack it
    load_weights(model, source, label, defaults={"text_projection.weight": eye} if role == "clip_l" else {},
                 ignore=_CLIP_EXTRA_KEYS)
    return model


def load_t5(source, *, device, dtype):
    from transformers import T5EncoderModel

    label = f"{source.label} (T5-XXL)"
    model = allocate(T5EncoderModel, t5_config_from_shapes(source.shapes, label), device, dtype)
    a, b = _T5_EMBEDDINGS
    load_weights(model, source, label, aliases={a: b, b: a})
    return model


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


# -- finding the weights -----------------------------------------------------------------------------------------


def _official_files(folder: Path, name: str) -> list[Path]:
    files = [folder / f for f in OFFICIAL_FILES[name]]
    if name == "t5xxl":
        files += [p for p in sorted(folder.glob("t5xxl*.safetensors")) if p not in files]
    return [p for p in files if p.is_file()]


def find_text_encoder_weights(model_path, names: Sequence[str] = ENCODERS) -> tuple[dict[str, object], Path]:
    """Tensor sources for the named encoders and the folder to look for tokenizers in. Per encoder, the first of:
    `text_encoders.<name>.transformer.*` keys in `model_path` (when it is a file); a diffusers `text_encoder*/`
    folder; the official file (clip_l.safetensors, clip_g.safetensors, t5xxl_fp16/t5xxl/t5xxl*.safetensors) in the
    folder; `text_encoders.*` keys in another .safetensors file of the folder. Raises one CheckpointError naming all
    that is missing and where it looked."""
    path = Path(model_path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected a model folder or an SD3 .safetensors checkpoint")
    folder = path if path.is_dir() else path.parent
    singles = [path] if path.is_file() else []
    headers: dict[Path, dict] = {}

    def single_source(name):
        for file in singles + [p for p in sorted(folder.glob("*.safetensors")) if p not in singles]:
            if file not in headers:
                headers[file] = safetensors_header(file) if file in singles else _try_header(file)
            prefix = SINGLE_FILE_PREFIX.format(name)
            if any(k.startswith(prefix) for k in headers[file]):
                return TensorSource.from_file(file, prefix, headers[file])
        return None

    sources, missing = {}, []
    for name in names:
        diffusers = folder / DIFFUSERS_FOLDERS[name]
        official = _official_files(folder, name)
        if singles and (source := single_source(name)) is not None:
            sources[name] = source
        elif diffusers.is_dir():
            sources[name] = TensorSource(diffusers_weight_headers(diffusers, "model"), label=str(diffusers))
        elif official:
            sources[name] = TensorSource.from_file(official[0])
        elif (source := single_source(name)) is not None:
            sources[name] = source
        else:
            missing.append(name)
    if missing:
        what = " and ".join(f"{LABELS[n]} ({' or '.join(OFFICIAL_FILES[n])})" for n in missing)
        looked = (f"looked in {folder} for those files, for {'/, '.join(DIFFUSERS_FOLDERS[n] for n in missing)}/ "
                  f"and for 'text_encoders.<name>.transformer.*' keys in its .safetensors files")
        hint = "; or pass --no-t5 to run without T5 (weaker prompt following)" if missing == ["t5xxl"] else ""
        raise CheckpointError(f"text encoder weights not found: {what}; {looked}{hint}")
    return sources, folder


def _try_header(path: Path) -> dict:
    try:
        return safetensors_header(path)
    except CheckpointError:  # a broken file that is not the one asked for: not a text-encoder source
        return {}


def load_text_encoders(model_path, *, device=None, dtype=None, t5: bool = True, t5_tokens: int = 256,
                       t5_width: int = 4096) -> TextEncoders:
    """Load CLIP-L, CLIP-G and T5-XXL (unless `t5=False`) and their tokenizers for the model at `model_path` (a
    folder with the official files, a diffusers folder, or a checkpoint with `text_encoders.*` keys; see
    `find_text_encoder_weights`). Tokenizers come from the folder's tokenizer/, tokenizer_2/, tokenizer_3/, else the
    local Hugging Face cache, else a download. Weights are read from safetensors one tensor at a time into models
    allocated on `device` (default CUDA when available) in `dtype` (default bf16 on CUDA, fp32 on CPU).
    `t5_width` is the context width used in place of T5's when `t5=False`."""
    check_t5_tokens(t5_tokens)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    names = ENCODERS if t5 else ENCODERS[:2]
    sources, folder = find_text_encoder_weights(model_path, names)
    # FP8 files (t5xxl_fp8_e4m3fn*.safetensors) are dequantized into `dtype` one tensor at a time.
    sources = {name: FP8Reader(source, device) for name, source in sources.items()}
    with ExitStack() as stack:
        for source in sources.values():
            stack.enter_context(source)
        tokenizer_l = find_tokenizer("clip", [folder / TOKENIZER_FOLDERS["clip_l"]])
        folder_g = folder / TOKENIZER_FOLDERS["clip_g"]
        tokenizer_g = find_tokenizer("clip", [folder_g]) if folder_g.is_dir() else tokenizer_l
        tokenizer_t5 = find_tokenizer("t5", [folder / TOKENIZER_FOLDERS["t5xxl"]]) if t5 else None
        clip_l = load_clip(sources["clip_l"], "clip_l", device=device, dtype=dtype)
        clip_g = load_clip(sources["clip_g"], "clip_g", device=device, dtype=dtype)
        t5_model = load_t5(sources["t5xxl"], device=device, dtype=dtype) if t5 else None
    return TextEncoders(clip_l, clip_g, t5_model, tokenizer_l, tokenizer_g, tokenizer_t5, t5_tokens=t5_tokens,
                        t5_width=None if t5 else t5_width)


# -- tiny --------------------------------------------------------------------------------------------------------


def tiny_text_encoders(seed: int = 0, *, t5_tokens: int = 256) -> TextEncoders:
    """Random-weight CLIP-L (width 32, 3 layers, identity projection), CLIP-G (width 32, 4 layers, projection 32) and
    T5 (width 64, 2 layers) with tokenizers built in code: context width 64, pooled width 64. No files, no network.
    The identity CLIP-L projection makes diffusers' projected CLIP-L pooled vector equal to ours (unprojected)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer_l, tokenizer_g, tokenizer_t5 = tiny_clip_tokenizer("eos"), tiny_clip_tokenizer("!"), tiny_t5_tokenizer()
    vocab = len(tokenizer_l)
    clip_l = CLIPTextModelWithProjection(clip_config(vocab, 32, 64, 3, CLIP_LENGTH, 32, "clip_l"))
    clip_g = CLIPTextModelWithProjection(clip_config(vocab, 32, 64, 4, CLIP_LENGTH, 32, "clip_g"))
    t5 = T5EncoderModel(t5_config(len(tokenizer_t5), 64, 96, heads=4, d_kv=16, layers=2))
    for i, model in enumerate((clip_l, clip_g, t5)):
        randomize_(model, seed + i).eval().requires_grad_(False)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    return TextEncoders(clip_l, clip_g, t5, tokenizer_l, tokenizer_g, tokenizer_t5, t5_tokens=t5_tokens)


__all__ = [
    "TextEncoders",
    "find_text_encoder_weights",
    "load_text_encoders",
    "tiny_text_encoders",
]
