"""Text conditioning: parity with diffusers' SD3 `encode_prompt`, the reference's output and tokenization rules, the
shared T5 length, loading from the three layouts, and the errors users see. CPU, fp32, tiny components, offline."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5EncoderModel

from fastsd35.models.text_encoders import TextEncoders, clip_config_from_shapes, t5_config, t5_config_from_shapes
from fastsd35.weights.text_encoders import load_text_encoders
from helpers.diffusers_ref import require_diffusers
from fastsd35.tiny.family import tiny_text_encoders
from fastsd35.errors import CheckpointError, FastSD35Error
from fastsd35.tiny.family import randomize_
from fastsd35.models.tokenization import CLIP_REPO, T5_REPO, clip_chunk, prompt_words

PROMPTS = ["a photo of a cat wearing a red hat", "astronaut riding a horse on mars, oil painting"]
NEGATIVES = ["", "blurry"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Never touch the network or the user's Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="module")
def tiny() -> TextEncoders:
    return tiny_text_encoders(seed=0)


def quiet_encode(enc, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these prompts may be truncated
        return enc.encode(prompts)


# -- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("long_t5", [False, True])
def test_matches_diffusers_encode_prompt(tiny, long_t5):
    StableDiffusion3Pipeline = require_diffusers().StableDiffusion3Pipeline

    prompts = list(PROMPTS)
    if long_t5:  # capitalised words: 1 CLIP token each (CLIP lowercases), several T5 tokens: T5 length > 77
        prompts[1] = " ".join(["Cat Dog Horse Astronaut Riding"] * 6)
    context, pooled = quiet_encode(tiny, prompts + NEGATIVES)
    t5_len = context.shape[1] - 77
    assert (t5_len > 77) == long_t5
    # diffusers' CLIP tokenizers pad as the reference does (tokenizer: EOS; tokenizer_2: "!" = id 0), its CLIP-L pooled
    # vector is projected (identity in the tiny model), and its T5 is padded to max_sequence_length: our shared length.
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=tiny.clip_l, tokenizer=tiny.tokenizer_l, text_encoder_2=tiny.clip_g, tokenizer_2=tiny.tokenizer_g,
        text_encoder_3=tiny.t5, tokenizer_3=tiny.tokenizer_t5,
    )
    embeds, neg_embeds, pooled_d, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=NEGATIVES, device=torch.device("cpu"),
        do_classifier_free_guidance=True, max_sequence_length=t5_len,
    )
    torch.testing.assert_close(context, torch.cat([embeds, neg_embeds]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, torch.cat([pooled_d, neg_pooled]), atol=1e-5, rtol=1e-5)


# -- what is taken from each encoder -----------------------------------------------------------------------------


def _capture(module, store, name):
    def hook(_, __, out):
        store[name] = out[0] if isinstance(out, tuple) else out

    return module.register_forward_hook(hook)


def test_outputs_are_the_reference_ones():
    """Penultimate CLIP layer without final LN; pooled = final-LN'd state at the first EOS, unprojected for CLIP-L
    (its projection is made non-identity here) and projected for CLIP-G; T5 last layer with final norm, no mask; CLIP
    features zero-padded to a wider T5."""
    enc = tiny_text_encoders(seed=1)
    torch.nn.init.normal_(enc.clip_l.text_projection.weight)
    t5 = randomize_(T5EncoderModel(t5_config(len(enc.tokenizer_t5), 96, 64, heads=2, d_kv=48, layers=2)), 5).eval()
    enc = TextEncoders(enc.clip_l, enc.clip_g, t5, enc.tokenizer_l, enc.tokenizer_g, enc.tokenizer_t5)
    seen, hooks = {}, []
    for tag, clip in (("l", enc.clip_l), ("g", enc.clip_g)):
        hooks.append(_capture(clip.text_model.encoder.layers[-2], seen, f"{tag}_penultimate"))
        hooks.append(_capture(clip.text_model.final_layer_norm, seen, f"{tag}_final"))
    hooks.append(_capture(t5.encoder.final_layer_norm, seen, "t5"))
    prompts = ["a cat", "red dog on the moon"]
    context, pooled = quiet_encode(enc, prompts)
    for h in hooks:
        h.remove()
    tokens = enc.tokenize(prompts)
    eos = [(row == enc.tokenizer_l.eos_token_id).nonzero()[0].item() for row in tokens.l]
    assert eos[0] == 3 and eos[1] > 5  # different positions: the gather is per prompt
    rows = torch.arange(2)
    assert context.shape == (2, 154, 96) and pooled.shape == (2, 64)
    torch.testing.assert_close(context[:, :77, :32], seen["l_penultimate"])
    torch.testing.assert_close(context[:, :77, 32:64], seen["g_penultimate"])
    assert torch.all(context[:, :77, 64:] == 0)
    torch.testing.assert_close(context[:, 77:], seen["t5"])
    torch.testing.assert_close(pooled[:, :32], seen["l_final"][rows, eos])
    torch.testing.assert_close(pooled[:, 32:], enc.clip_g.text_projection(seen["g_final"][rows, eos]))
    # no T5 attention mask: the padding is attended to, so padding further changes the real tokens' embeddings
    short = quiet_encode(enc, prompts[:1])[0]
    longer = quiet_encode(enc, prompts[:1] + [" ".join(["Cat Dog Horse"] * 12)])[0]
    assert longer.shape[1] > short.shape[1]
    assert not torch.allclose(short[0, 77:80], longer[0, 77:80])


def test_released_configs_follow_from_weight_shapes():
    """The shapes of the real CLIP-L, CLIP-G and T5-v1.1-XXL (built on the meta device) give back their configs."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config

    def shapes(cls, config):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}

    released = {
        "clip_l": (768, 3072, 12, 12, "quick_gelu"),
        "clip_g": (1280, 5120, 32, 20, "gelu"),
    }
    for role, (hidden, mlp, layers, heads, act) in released.items():
        config = CLIPTextConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                num_attention_heads=heads, projection_dim=hidden, hidden_act=act)
        found = shapes(CLIPTextModelWithProjection, config)
        if role == "clip_l":
            del found["text_projection.weight"]  # as distributed
        got = clip_config_from_shapes(found, role)
        assert (got.vocab_size, got.max_position_embeddings, got.hidden_size, got.intermediate_size) == (49408, 77, hidden, mlp)
        assert (got.num_hidden_layers, got.num_attention_heads, got.hidden_act, got.eos_token_id) == (layers, heads, act, 49407)
    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    found = shapes(T5EncoderModel, config)
    del found["encoder.embed_tokens.weight"]
    got = t5_config_from_shapes(found)
    assert (got.vocab_size, got.d_model, got.d_kv, got.d_ff, got.num_layers, got.num_heads) == (32128, 4096, 64, 10240, 24, 64)
    assert (got.relative_attention_num_buckets, got.relative_attention_max_distance, got.dense_act_fn) == (32, 128, "gelu_new")
    assert got.is_gated_act and got.layer_norm_epsilon == 1e-6


# -- tokenization ------------------------------------------------------------------------------------------------


def test_token_layout(tiny):
    tokens = tiny.tokenize(["a cat", ""])
    bos, eos = tiny.tokenizer_l.bos_token_id, tiny.tokenizer_l.eos_token_id
    a, cat = tiny.tokenizer_l.convert_tokens_to_ids(["a</w>", "cat</w>"])
    assert tokens.l[0, :5].tolist() == [bos, a, cat, eos, eos] and torch.all(tokens.l[0, 3:] == eos)
    assert tokens.g[0, :5].tolist() == [bos, a, cat, eos, 0] and torch.all(tokens.g[0, 4:] == 0)
    assert tokens.l[1, :2].tolist() == [bos, eos] and tokens.g[1, :3].tolist() == [bos, eos, 0]
    t5_a, t5_cat = tiny.tokenizer_t5.convert_tokens_to_ids(["▁a", "▁cat"])
    assert tokens.t5.shape == (2, 77)
    assert tokens.t5[0, :4].tolist() == [t5_a, t5_cat, 1, 0] and torch.all(tokens.t5[0, 3:] == 0)
    assert tokens.t5[1, :2].tolist() == [1, 0]


def test_shared_t5_length_grows_with_the_longest_prompt(tiny):
    long_prompt = " ".join(["Cat Dog Horse"] * 10)
    n = tiny.tokenize([long_prompt]).t5.shape[1]  # its tokens + EOS
    assert n > 77
    assert quiet_encode(tiny, ["a cat", ""])[0].shape == (2, 154, 64)
    context, pooled = quiet_encode(tiny, ["a cat", long_prompt, ""])
    assert context.shape == (3, 77 + n, 64) and pooled.shape == (3, 64)
    assert context.dtype == pooled.dtype == torch.float32


def test_too_long_prompt_is_one_clear_error(tiny):
    long_prompt = " ".join(["Cat Dog Horse"] * 10)
    n = tiny.tokenize([long_prompt]).t5.shape[1]
    limited = copy.copy(tiny)
    limited.t5_tokens = n - 1
    with pytest.raises(FastSD35Error) as e:
        limited.encode(["a cat", long_prompt])
    msg = str(e.value)
    assert "\n" not in msg and f"{n} T5 tokens" in msg and f"limit of {n - 1}" in msg and "--t5-tokens" in msg
    limited.t5_tokens = n
    assert limited.encode([long_prompt])[0].shape[1] == 77 + n
    for bad in (76, 513):
        with pytest.raises(FastSD35Error, match="--t5-tokens must be an integer from 77 to 512"):
            tiny_text_encoders(t5_tokens=bad)


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("(red:1.3) cat", ["red", "cat"]),
        ("a (b (c:1.5) d) e", ["a", "b", "c", "d", "e"]),
        ("(red)car", ["red", "car"]),
        ("\\(not a weight\\) x", ["(not", "a", "weight)", "x"]),
        ("line\nbreak  double", ["line", "break", "double"]),
        ("(a:b)", ["a:b"]),  # not a number: kept
        ("(:1.5)", [":1.5"]),  # a colon at the start is not a weight
        ("a)b(c", ["a)b(c"]),  # unbalanced: literal
        ("((a)", ["(a"]),  # the reference's quirk: the outer "(" and ")" pair up, the inner "(" stays
        ("(x:1.2", ["(x:1.2"]),
    ],
)
def test_prompt_weight_syntax_is_stripped(prompt, words):
    assert prompt_words(prompt) == words


def test_weights_are_ignored_and_words_tokenized_separately(tiny):
    same = quiet_encode(tiny, ["(red:1.3) cat, ((oil)) painting", "red cat, oil painting"])[0]
    torch.testing.assert_close(same[0], same[1])
    split = tiny.tokenize(["(red)hat", "redhat"]).l[:, :4]  # a group splits a word: red + hat, not redhat
    assert split[0].tolist() != split[1].tolist()
    assert split[0, 1:3].tolist() == tiny.tokenizer_l.convert_tokens_to_ids(["red</w>", "hat</w>"])


def test_clip_chunking_rule():
    bos, eos, pad = 100, 101, 0
    ids, dropped = clip_chunk([[5]] * 75, bos, eos, pad)
    assert ids == [bos] + [5] * 75 + [eos] and dropped == 0
    ids, dropped = clip_chunk([[5]] * 74 + [[6, 7], [8]], bos, eos, pad)  # a short word that does not fit moves on
    assert ids == [bos] + [5] * 74 + [eos, pad] and dropped == 3
    ids, dropped = clip_chunk([[5]] * 70 + [[9] * 8], bos, eos, pad)  # a word of 8+ tokens is split
    assert ids == [bos] + [5] * 70 + [9] * 5 + [eos] and dropped == 3


def test_clip_truncation_warns(tiny):
    with pytest.warns(UserWarning, match=r"CLIP reads 75 tokens: 5 of the 80 CLIP tokens .* were dropped"):
        context, _ = tiny.encode([" ".join(["cat"] * 80)])
    assert context.shape == (1, 77 + 81, 64)  # T5 reads all 80 words


def test_no_t5_mode(tiny):
    enc = TextEncoders(tiny.clip_l, tiny.clip_g, None, tiny.tokenizer_l, tiny.tokenizer_g, t5_width=64)
    long_prompt = " ".join(["Cat Dog Horse"] * 30)  # no T5, no T5 limit
    with pytest.warns(UserWarning, match="CLIP reads 75 tokens"):
        context, pooled = enc.encode(["a cat", long_prompt])
    ref_context, ref_pooled = quiet_encode(tiny, ["a cat"])
    assert context.shape == (2, 154, 64) and torch.all(context[:, 77:] == 0)
    torch.testing.assert_close(context[:1, :77], ref_context[:, :77])
    torch.testing.assert_close(pooled[:1], ref_pooled)
    with pytest.raises(ValueError, match="t5_width"):
        TextEncoders(tiny.clip_l, tiny.clip_g, None, tiny.tokenizer_l, tiny.tokenizer_g)


def test_release(tiny):
    enc = copy.copy(tiny)
    enc.release()
    assert enc.clip_l is None and enc.t5 is None and tiny.clip_l is not None
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a cat"])


# -- loading -----------------------------------------------------------------------------------------------------


def _state(model, drop=()):
    """A state dict safe to save (tied tensors cloned) without the keys in `drop`."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}


def _write_tokenizers(enc, folder, names=("tokenizer", "tokenizer_2", "tokenizer_3")):
    for name, tok in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), (enc.tokenizer_l, enc.tokenizer_g, enc.tokenizer_t5)):
        if name in names:
            tok.save_pretrained(folder / name)


def write_official(enc, folder, *, skip=(), t5_name="t5xxl_fp16.safetensors", tokenizers=True):
    """The official layout: CLIP-L without text_projection (as distributed), CLIP-G with it, T5 with `shared.weight`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "clip_l.safetensors": _state(enc.clip_l, drop={"text_projection.weight"}),
        "clip_g.safetensors": _state(enc.clip_g),
        t5_name: _state(enc.t5, drop={"encoder.embed_tokens.weight"}),
    }
    for name, tensors in files.items():
        if name not in skip:
            save_file(tensors, str(folder / name))
    if tokenizers:
        _write_tokenizers(enc, folder)
    return folder


def assert_same_encoding(loaded, enc, atol=1e-6):
    a, b = quiet_encode(loaded, PROMPTS + NEGATIVES), quiet_encode(enc, PROMPTS + NEGATIVES)
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=atol)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=atol)


def test_load_official_folder(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models")
    loaded = load_text_encoders(folder, device="cpu", dtype=torch.float32)
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert torch.equal(loaded.clip_l.text_projection.weight, torch.eye(32))  # absent in the file: identity
    assert loaded.t5.encoder.embed_tokens.weight is loaded.t5.shared.weight
    assert_same_encoding(loaded, tiny)


def test_load_official_variants(tiny, tmp_path):
    """Another t5xxl*.safetensors name, fp16 weights holding only `encoder.embed_tokens.weight`, a CLIP file with the
    position_ids buffer, and a bf16 load: all load; outputs stay float32."""
    folder = tmp_path / "m"
    folder.mkdir()
    _write_tokenizers(tiny, folder)
    save_file(dict(_state(tiny.clip_l), **{"text_model.embeddings.position_ids": torch.arange(77)[None]}),
              str(folder / "clip_l.safetensors"))
    save_file(_state(tiny.clip_g), str(folder / "clip_g.safetensors"))
    t5 = {k: v.half() for k, v in _state(tiny.t5, drop={"shared.weight"}).items()}
    save_file(t5, str(folder / "t5xxl_encoder_only.safetensors"))
    reference = quiet_encode(tiny, PROMPTS)[0]
    for dtype, tolerance in ((torch.float32, 3e-3), (torch.bfloat16, 3e-2)):  # fp16 T5 weights: not exact
        loaded = load_text_encoders(folder, device="cpu", dtype=dtype)
        context, pooled = quiet_encode(loaded, PROMPTS)
        assert loaded.dtype == dtype and context.dtype == pooled.dtype == torch.float32
        assert (context - reference).norm() / reference.norm() < tolerance


def test_load_single_checkpoint_file(tiny, tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    tensors = {"model.diffusion_model.x_embedder.proj.bias": torch.zeros(4)}
    for name, model in (("clip_l", tiny.clip_l), ("clip_g", tiny.clip_g), ("t5xxl", tiny.t5)):
        drop = {"encoder.embed_tokens.weight"}
        tensors.update({f"text_encoders.{name}.transformer.{k}": v for k, v in _state(model, drop).items()})
    checkpoint = folder / "sd3_tiny_incl_clips.safetensors"
    save_file(tensors, str(checkpoint))
    _write_tokenizers(tiny, folder)
    assert_same_encoding(load_text_encoders(checkpoint, device="cpu", dtype=torch.float32), tiny)
    assert_same_encoding(load_text_encoders(folder, device="cpu", dtype=torch.float32), tiny)


def test_load_diffusers_folder(tiny, tmp_path):
    folder = tmp_path / "diffusers"
    for sub, model in (("text_encoder", tiny.clip_l), ("text_encoder_2", tiny.clip_g), ("text_encoder_3", tiny.t5)):
        model.save_pretrained(folder / sub, max_shard_size="100KB")
    assert (folder / "text_encoder_3" / "model.safetensors.index.json").is_file()  # sharded
    _write_tokenizers(tiny, folder)
    assert_same_encoding(load_text_encoders(folder, device="cpu", dtype=torch.float32), tiny)


def test_tokenizers_from_the_hugging_face_cache(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models", tokenizers=False)
    for repo, tok in ((CLIP_REPO, tiny.tokenizer_l), (T5_REPO, tiny.tokenizer_t5)):
        base = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
        tok.save_pretrained(base / "snapshots" / "0123abcd")
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text("0123abcd")
    assert_same_encoding(load_text_encoders(folder, device="cpu", dtype=torch.float32), tiny)


# -- errors ------------------------------------------------------------------------------------------------------


def test_missing_clip_g(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models", skip={"clip_g.safetensors"})
    with pytest.raises(CheckpointError) as e:
        load_text_encoders(folder, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "CLIP-G (clip_g.safetensors)" in msg and str(folder) in msg
    assert "text_encoder_2/" in msg and "text_encoders." in msg and "--no-t5" not in msg


def test_missing_t5_suggests_no_t5(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models", skip={"t5xxl_fp16.safetensors"})
    with pytest.raises(CheckpointError) as e:
        load_text_encoders(folder, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "T5-XXL (t5xxl_fp16.safetensors or t5xxl.safetensors)" in msg and "--no-t5" in msg
    # without T5 neither its weights nor its tokenizer are needed
    (folder / "tokenizer_3" / "tokenizer.json").unlink()
    enc = load_text_encoders(folder, device="cpu", t5=False, t5_width=64)
    context, _ = quiet_encode(enc, PROMPTS)
    assert context.shape == (2, 154, 64) and torch.all(context[:, 77:] == 0)


def test_missing_tokenizer_lists_where_it_looked(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models", tokenizers=False)
    with pytest.raises(FastSD35Error) as e:
        load_text_encoders(folder, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "no CLIP tokenizer found" in msg
    assert str(folder / "tokenizer") in msg and str(tmp_path / "hf" / "hub") in msg and "HF_HUB_OFFLINE" in msg
    _write_tokenizers(tiny, folder, names=("tokenizer",))  # CLIP found; T5's tokenizer still missing
    with pytest.raises(FastSD35Error, match=r"no T5 tokenizer found; looked in: .*tokenizer_3 \(no such folder\)"):
        load_text_encoders(folder, device="cpu")


def test_broken_weights_name_the_file_and_key(tiny, tmp_path):
    folder = write_official(tiny, tmp_path / "models", skip={"t5xxl_fp16.safetensors"})
    wo = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    save_file(_state(tiny.t5, drop={"encoder.embed_tokens.weight", wo}), str(folder / "t5xxl.safetensors"))
    with pytest.raises(CheckpointError, match=rf"t5xxl\.safetensors \(T5-XXL\): weights do not match .*missing: {wo}"):
        load_text_encoders(folder, device="cpu")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_text_encoders(tmp_path / "nowhere", device="cpu")
