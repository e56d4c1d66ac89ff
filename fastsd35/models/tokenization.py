"""Prompt → token ids for CLIP-L, CLIP-G and T5-XXL, as the reference tokenizes them (SPEC.md §6.2), and where the
tokenizers come from.

What the reference does, and so do we:

* Prompt-weight syntax is parsed and the weights thrown away: unescaped `(text)` and `(text:1.3)` groups lose their
  parentheses and `:number`; `\\(` and `\\)` stay as literal parentheses. Newlines become spaces.
* The text is split on spaces and **each word is tokenized on its own** (its BOS/EOS dropped). For plain text this
  gives exactly the ids of tokenizing the whole string: both tokenizers split on whitespace before their subword model
  (CLIP's regex pre-tokenizer never matches across whitespace; T5's pre-tokenizer is WhitespaceSplit + Metaspace).
  We checked this on 3,000 random and hand-picked prompts (punctuation, accents, CJK, emoji, tabs, non-breaking and
  repeated spaces) with the real CLIP BPE and a 32k SentencePiece unigram model run through transformers' T5
  converter: no differences. Word-by-word matters in two places, so it is kept: a weight group inside a word splits
  it (`(red)car` is `red` + `car`, not `redcar`), and CLIP's 77-token chunking never splits a word of fewer than 8
  tokens (it moves whole to the next chunk).
* CLIP: [BOS] + up to 75 tokens + [EOS], padded to 77; CLIP-L pads with EOS, CLIP-G with id 0 ("!"). Only the first
  77-token chunk is encoded; we warn when tokens are dropped (the reference drops them silently).
* T5: the words' tokens + EOS (id 1), padded with 0, no BOS.

This module's ids were compared with the reference's own `SDTokenizer` (CLIP-L, CLIP-G and T5 settings) on 6,000
prompts mixing weight groups, escapes, unbalanced parentheses, newlines and prompts of 20-120 words: identical.

Deliberate departures (DESIGN.md "Sampling and presets"):

* The reference cuts the T5 text at 226 characters; we do not.
* The reference pads each prompt's T5 ids to max(77, n + 1) on its own, so a prompt of more than 76 T5 tokens cannot
  be paired with its negative and crashes. Here all prompts tokenized together share one T5 length,
  max(77, longest + 1), and a prompt longer than `t5_tokens` (default 256, at most 512) is an error that says so.
* The reference uses transformers' slow `CLIPTokenizer` (ftfy/BasicTokenizer clean-up); we use the fast tokenizer
  (NFC, whitespace clean-up, lowercase). They can differ on unusual Unicode, not on ordinary prompts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import FastSD35Error
from ..files import is_dir, is_file

CLIP_LENGTH = 77  # CLIP's positions: BOS + 75 tokens + EOS
T5_MIN_LENGTH = 77
T5_MAX_TOKENS = 512
CLIP_G_PAD = 0  # "!" in the CLIP vocabulary
T5_PAD = 0
LONG_WORD = 8  # CLIP words of at least this many tokens may be split across chunks
CLIP_REPO = "openai/clip-vit-large-patch14"
T5_REPO = "google/t5-v1_1-xxl"

# -- prompt-weight syntax ----------------------------------------------------------------------------------------

_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


def _top_level(text: str) -> list[str]:
    """Split into plain runs and parenthesised groups. A group closes when the depth returns to 0; unbalanced
    parentheses stay in the text (a stray `)` makes the depth negative, as in the reference)."""
    items, current, depth = [], "", 0
    for ch in text:
        if ch == "(" and depth == 0 and current:
            items.append(current)
            current = ""
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        current += ch
        if ch == ")" and depth == 0:
            items.append(current)
            current = ""
    if current:
        items.append(current)
    return items


def _unweighted(text: str) -> list[str]:
    """The text's segments with weight groups opened (recursively) and their `:number` removed."""
    segments = []
    for item in _top_level(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner = item[1:-1]
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            segments += _unweighted(inner)
        else:
            segments.append(item)
    return segments


def prompt_words(text: str) -> list[str]:
    """The words the reference tokenizes one by one: weight syntax stripped, escapes honoured, split on spaces."""
    for escape, placeholder in _ESCAPES:
        text = text.replace(escape, placeholder)
    words = []
    for segment in _unweighted(text):
        for escape, placeholder in _ESCAPES:
            segment = segment.replace(placeholder, escape[1])
        words += [w for w in segment.replace("\n", " ").split(" ") if w]
    return words


# -- ids ---------------------------------------------------------------------------------------------------------


def special_ids(tokenizer, kind: str) -> tuple[int | None, int]:
    """(BOS, EOS) as the tokenizer adds them to an empty string (BOS is None for T5)."""
    ids = tokenizer("")["input_ids"]
    want = 2 if kind == "clip" else 1
    if len(ids) != want:
        raise FastSD35Error(f"the {kind.upper()} tokenizer {type(tokenizer).__name__} is not a {kind.upper()} tokenizer "
                            f"(it turns an empty prompt into {ids})")
    return (ids[0], ids[1]) if kind == "clip" else (None, ids[0])


def word_ids(tokenizer, words: Sequence[str], has_bos: bool) -> list[list[int]]:
    """Each word's token ids without the special tokens the tokenizer adds."""
    if not words:
        return []
    start = 1 if has_bos else 0
    return [ids[start:-1] for ids in tokenizer(list(words))["input_ids"]]


def clip_chunk(groups: Sequence[Sequence[int]], bos: int, eos: int, pad: int) -> tuple[list[int], int]:
    """The first 77-token CLIP chunk of the word groups and how many tokens did not fit in it. A word that does not
    fit ends the chunk; it is split only if it has at least 8 tokens (the reference's chunking rule)."""
    room = CLIP_LENGTH - 2
    body: list[int] = []
    for group in groups:
        if len(body) + len(group) <= room:
            body += group
            continue
        if len(group) >= LONG_WORD:
            body += group[: room - len(body)]
        break
    dropped = sum(len(g) for g in groups) - len(body)
    return [bos, *body, eos] + [pad] * (room - len(body)), dropped


@dataclass
class Tokens:
    l: torch.Tensor  # (B, 77) CLIP-L ids
    g: torch.Tensor  # (B, 77) CLIP-G ids
    t5: torch.Tensor | None  # (B, L) T5 ids, L = max(77, longest + 1); None without T5
    clip_dropped: list[int]  # CLIP tokens beyond the first chunk, per prompt


def _excerpt(prompt: str, n: int = 40) -> str:
    text = " ".join(prompt.split())
    return repr(text if len(text) <= n else text[:n] + "…")


def check_t5_tokens(t5_tokens: int) -> int:
    if not isinstance(t5_tokens, int) or not T5_MIN_LENGTH <= t5_tokens <= T5_MAX_TOKENS:
        raise FastSD35Error(f"--t5-tokens must be an integer from {T5_MIN_LENGTH} to {T5_MAX_TOKENS}, got {t5_tokens!r}")
    return t5_tokens


def tokenize(prompts: Sequence[str], tokenizer_l, tokenizer_g, tokenizer_t5=None, t5_tokens: int = 256) -> Tokens:
    """Token ids for a batch of prompts (see the module docstring). Warns once per prompt whose CLIP tokens do not fit
    in 77; raises FastSD35Error for a prompt of more than `t5_tokens` T5 tokens (end token included)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    words = [prompt_words(p) for p in prompts]
    rows, dropped = {}, []
    for name, tokenizer, pad in (("l", tokenizer_l, None), ("g", tokenizer_g, CLIP_G_PAD)):
        bos, eos = special_ids(tokenizer, "clip")
        groups = [word_ids(tokenizer, w, True) for w in words]
        chunks = [clip_chunk(g, bos, eos, eos if pad is None else pad) for g in groups]
        rows[name] = torch.tensor([ids for ids, _ in chunks], dtype=torch.long).reshape(len(prompts), CLIP_LENGTH)
        if name == "l":
            dropped = [(n, sum(map(len, g))) for (_, n), g in zip(chunks, groups)]
    t5 = None
    if tokenizer_t5 is not None:
        _, eos = special_ids(tokenizer_t5, "t5")
        seqs = [[t for group in word_ids(tokenizer_t5, w, False) for t in group] + [eos] for w in words]
        for prompt, seq in zip(prompts, seqs):
            if len(seq) > t5_tokens:
                raise FastSD35Error(
                    f"the prompt {_excerpt(prompt)} is {len(seq)} T5 tokens long (end token included), more than the "
                    f"limit of {t5_tokens}: shorten it or raise --t5-tokens (at most {T5_MAX_TOKENS})"
                )
        length = max([T5_MIN_LENGTH] + [len(s) for s in seqs])
        t5 = torch.tensor([s + [T5_PAD] * (length - len(s)) for s in seqs], dtype=torch.long).reshape(len(prompts), length)
    for prompt, (n, total) in zip(prompts, dropped):
        if n:
            rest = " (T5 reads the whole prompt)" if tokenizer_t5 is not None else ""
            warnings.warn(f"CLIP reads 75 tokens: {n} of the {total} CLIP tokens of the prompt {_excerpt(prompt)} were "
                          f"dropped{rest}", stacklevel=2)
    return Tokens(rows["l"], rows["g"], t5, [n for n, _ in dropped])


# -- finding tokenizers ------------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


_TOKENIZER_FILES = {"clip": (("tokenizer.json",), ("vocab.json", "merges.txt")), "t5": (("tokenizer.json",), ("spiece.model",))}
_HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "spiece.model"]


def _has_files(folder: Path, kind: str) -> bool:
    return any(all(is_file(folder / f) for f in files) for files in _TOKENIZER_FILES[kind])


def find_tokenizer(kind: str, folders: Sequence[Path]):
    """A CLIP or T5 tokenizer from the first of: `folders` (in order), the local Hugging Face cache, the Hub (unless
    offline). Raises FastSD35Error listing every place tried and why it failed. (Folders are checked for tokenizer
    files first: transformers quietly builds an empty tokenizer from a folder or repo that has none.)"""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from transformers import CLIPTokenizerFast, T5TokenizerFast

    cls, repo = (CLIPTokenizerFast, CLIP_REPO) if kind == "clip" else (T5TokenizerFast, T5_REPO)
    files = " or ".join("+".join(group) for group in _TOKENIZER_FILES[kind])
    tried = []

    def load(folder: Path, where: str):
        if not _has_files(folder, kind):
            tried.append(f"{where} (no {files})")
            return None
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, ... for broken files
            tried.append(f"{where} (unreadable: {_first_line(e)})")
            return None

    for folder in folders:
        if not is_dir(folder):
            tried.append(f"{folder} (no such folder)")
        elif (tok := load(folder, str(folder))) is not None:
            return tok
    cache = hf_cache_dir()
    cached = [try_to_load_from_cache(repo, f, cache_dir=str(cache)) for group in _TOKENIZER_FILES[kind] for f in group]
    snapshot = next((Path(c).parent for c in cached if isinstance(c, str)), None)
    if snapshot is None:
        tried.append(f"the Hugging Face cache {cache} (no {repo})")
    elif (tok := load(snapshot, f"the Hugging Face cache {snapshot}")) is not None:
        return tok
    if hf_offline():
        tried.append("the Hugging Face Hub (not tried: HF_HUB_OFFLINE is set)")
    else:
        try:
            snapshot = Path(snapshot_download(repo, allow_patterns=_HUB_FILES, cache_dir=str(cache)))
        except Exception as e:  # no network, no such repo, ...
            tried.append(f"the Hugging Face Hub ({_first_line(e)})")
        else:
            if (tok := load(snapshot, f"the Hugging Face Hub download {snapshot}")) is not None:
                return tok
    raise FastSD35Error(
        f"no {kind.upper()} tokenizer found; looked in: {'; '.join(tried)}. Put its files ({files}) in "
        f"{folders[0] if folders else 'a tokenizer folder beside the model'}, or run once online to cache {repo}"
    )


# -- tiny tokenizers, built in code ------------------------------------------------------------------------------

_TINY_WORDS = (
    "a an the of on in with and photo portrait painting cat dog horse astronaut riding red blue green small large "
    "city street night sky mars moon style oil wearing hat"
).split()


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet in id order: printable bytes as themselves, the rest shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) for b in keep] + [chr(next(shifted)) for b in range(256) if b not in keep]


def tiny_clip_tokenizer(pad: str):
    """A CLIP-structured BPE (same normalizer, pre-tokenizer and post-processor as CLIP's) over the 512 byte symbols
    and merges spelling a few words; BOS/EOS are the two last ids, as in CLIP. `pad`: "eos" (CLIP-L) or "!"."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import CLIPTokenizerFast

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        for part in parts[1:]:
            if (parts[0], part) not in merges:
                merges.append((parts[0], part))
            parts[0] += part
            vocab.setdefault(parts[0], len(vocab))
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=eos))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return CLIPTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos,
                             pad_token=eos if pad == "eos" else pad, model_max_length=CLIP_LENGTH)


def tiny_t5_tokenizer():
    """A T5-structured unigram tokenizer (pad 0, EOS 1, unk 2, "▁" word prefix) over a few words and characters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _TINY_WORDS] + [(s, -4.0) for s in ("s", "ing", "ed", "er")]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"()-/"
    pieces += [(c, -6.0) for c in chars]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


__all__ = [
    "CLIP_LENGTH",
    "T5_MAX_TOKENS",
    "T5_MIN_LENGTH",
    "Tokens",
    "clip_chunk",
    "find_tokenizer",
    "prompt_words",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tokenize",
]
