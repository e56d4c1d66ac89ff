"""Models by Hugging Face Hub name: `--model ORG/NAME[@REVISION]` and `Pipeline.from_pretrained("ORG/NAME")`.

A repository is read in one of two layouts: the official single-file release (`sd3.5_large.safetensors` beside
`text_encoders/clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`, with `tokenizer*/`), preferred
when the repository holds the preset's checkpoint, or the diffusers layout (`model_index.json`, `transformer/`,
`vae/`, `text_encoder*/`, `tokenizer*/`). Only the files the preset, dtype and `--no-t5` need are downloaded
(never a pickle: the selection lists safetensors, JSON and tokenizer files by name), through huggingface_hub into
the standard cache (resumable, with its progress bars). The download then resolves to a local path that
`checkpoints.find_model_files` and `conditioning.load_text_encoders` read like any other.

Offline (`HF_HUB_OFFLINE=1`) a cached snapshot is used without any request; when the Hub cannot be reached, the
cached snapshot is used too. Every failure is one FastSD35Error line saying what to do.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastSD35Error
from ..files import exists, is_dir, is_file
from ..models.tokenization import hf_cache_dir, hf_offline
from .presets import PRESETS, Preset

# The released repositories, by the preset they are made for (the preset is then named, never guessed).
KNOWN_REPOS = {
    "stabilityai/stable-diffusion-3-medium": "sd3_medium",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3_medium",
    "stabilityai/stable-diffusion-3.5-medium": "medium",
    "stabilityai/stable-diffusion-3.5-large": "large",
    "stabilityai/stable-diffusion-3.5-large-turbo": "large_turbo",
}

_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "spiece.model")


def _diffusers_model(folder: str, stem: str) -> tuple[str, ...]:
    return (f"{folder}/config.json", f"{folder}/{stem}.safetensors", f"{folder}/{stem}.safetensors.index.json",
            f"{folder}/{stem}-*-of-*.safetensors")


def _tokenizer(folder: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{name}" for name in _TOKENIZER)


# What each layout needs, by component: (glob patterns, required). A required component with no matching file (no
# .safetensors file, for weights) means the layout is not there. "t5xxl" and "tokenizer_3" are left out under --no-t5.
DIFFUSERS_FILES = {
    "index": (("model_index.json",), True),
    "transformer": (_diffusers_model("transformer", "diffusion_pytorch_model"), True),
    "vae": (_diffusers_model("vae", "diffusion_pytorch_model"), True),
    "clip_l": (_diffusers_model("text_encoder", "model"), True),
    "clip_g": (_diffusers_model("text_encoder_2", "model"), True),
    "t5xxl": (_diffusers_model("text_encoder_3", "model"), True),
    "tokenizer": (_tokenizer("tokenizer"), False),  # without them, the tokenizers come from their own repositories
    "tokenizer_2": (_tokenizer("tokenizer_2"), False),
    "tokenizer_3": (_tokenizer("tokenizer_3"), False),
}
OFFICIAL_FILES = {  # the checkpoint itself comes from Preset.checkpoints; the text encoders sit in text_encoders/
    "clip_l": (("text_encoders/clip_l.safetensors",), True),
    "clip_g": (("text_encoders/clip_g.safetensors",), True),
    "tokenizer": (_tokenizer("tokenizer"), False),
    "tokenizer_2": (_tokenizer("tokenizer_2"), False),
    "tokenizer_3": (_tokenizer("tokenizer_3"), False),
}
# The T5-XXL file of the official layout, by dtype, best first: the FP8 file suffices when the transformer runs in FP8.
T5_FILES = {
    "fp8": ("text_encoders/t5xxl_fp8_e4m3fn.safetensors", "text_encoders/t5xxl_fp16.safetensors"),
    None: ("text_encoders/t5xxl_fp16.safetensors", "text_encoders/t5xxl.safetensors"),
}
_T5_PARTS = ("t5xxl", "tokenizer_3")

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_NAME = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9._/-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_LOCAL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")


def parse_hub_name(model) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `model` names a Hub repository; None when it is (or is meant as) a local path:
    an existing path always wins, and so does anything that looks like a file name or has more than one '/'."""
    if model is None:
        return None
    text = str(model)
    m = _HUB_NAME.fullmatch(text)
    if not m or exists(Path(text).expanduser()) or "--" in m["repo"] or ".." in text:
        return None
    if text.lower().endswith(_LOCAL_SUFFIXES):
        return None  # a checkpoint file that is missing: the local-path error says what was expected
    return m["repo"], m["revision"]


@dataclass(frozen=True)
class HubFile:
    path: str  # path in the repository
    size: int | None  # bytes, as the Hub reports it (None when only the cache was read)
    cached: bool  # already in the local snapshot


@dataclass(frozen=True)
class HubPlan:
    """What `download` will fetch: the repository, its commit, the layout and the files the preset needs."""

    repo: str
    revision: str
    commit: str
    preset: Preset
    layout: str  # "official" or "diffusers"
    checkpoint: str | None  # the official checkpoint file (official layout)
    files: tuple[HubFile, ...]
    snapshot: Path  # the cache folder the files are (or will be) in
    source: str  # "hub", or why only the cache was read

    @property
    def model_path(self) -> Path:
        """The local path to load once downloaded: the official checkpoint, or the diffusers snapshot folder."""
        return self.snapshot / self.checkpoint if self.checkpoint else self.snapshot

    @property
    def download_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.cached)

    @property
    def name(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision != "main" else self.repo


# -- the repository's files --------------------------------------------------------------------------------------


def storage_folder(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def _cached_commit(repo: str, revision: str) -> str | None:
    if _COMMIT.fullmatch(revision):
        return revision
    ref = storage_folder(repo) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _cached_files(snapshot: Path) -> dict[str, int | None]:
    """The complete files of a snapshot folder (a link whose blob is missing or unfinished does not count)."""
    if not is_dir(snapshot):
        return {}
    return {p.relative_to(snapshot).as_posix(): None for p in snapshot.rglob("*") if is_file(p)}


def _broken_entries(snapshot: Path) -> list[str]:
    """The snapshot's entries that are neither folders nor readable regular files, each named with what it is (a link
    to a missing blob, a FIFO, ...)."""
    broken = []
    for p in sorted(snapshot.rglob("*")) if is_dir(snapshot) else []:
        if is_dir(p) or is_file(p):
            continue
        name = p.relative_to(snapshot).as_posix()
        try:
            mode = os.lstat(p).st_mode
        except OSError:
            continue
        kind = ("a link to a missing or unreadable blob" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "not a regular file")
        broken.append(f"{name} is {kind}")
    return broken


def _hub_listing(repo: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """(commit, {path: size}) from the Hub: one metadata request, no download. Errors propagate to `_explain`."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    return info.sha, {s.rfilename: s.size for s in info.siblings or ()}


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP library huggingface_hub uses (httpx2, httpx or requests)."""
    errors = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout")), ("urllib3.exceptions", ("HTTPError",))):
        mod = sys.modules.get(module)
        errors += [getattr(mod, n) for n in names if mod is not None and isinstance(getattr(mod, n, None), type)]
    return tuple(errors)


def _explain(e: BaseException, repo: str, revision: str, during: str) -> FastSD35Error | None:
    """huggingface_hub's failures as one line that says what to do (None for an unexpected error: it propagates)."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return FastSD35Error(f"{repo} is gated: accept the license at https://huggingface.co/{repo} and log in with "
                             f"`{login_command()}` or set HF_TOKEN")
    if isinstance(e, RevisionNotFoundError):
        return FastSD35Error(f"{repo} has no revision {revision!r}: use a branch, tag or commit of the repository "
                             f"(see https://huggingface.co/{repo}/tree/main)")
    if isinstance(e, RepositoryNotFoundError):
        return FastSD35Error(f"{repo}: no such model on the Hugging Face Hub, and no local file or folder of that name "
                             f"(a private repository needs `{login_command()}` or HF_TOKEN)")
    if isinstance(e, LocalEntryNotFoundError) or isinstance(e, _network_errors()):
        if during == "download":
            return FastSD35Error(f"the download of {repo} was interrupted ({_first_line(e)}): run the same command "
                                 "again to resume it (finished files are kept; unfinished ones are never loaded)")
        return FastSD35Error(f"cannot reach the Hugging Face Hub ({_first_line(e)}) and {repo} is not in the cache "
                             f"{hf_cache_dir()}: connect to the network, or pass a local --model path")
    if isinstance(e, HfHubHTTPError):  # the Hub is down, rate-limits, ...
        return FastSD35Error(f"the Hugging Face Hub failed on {repo} ({_first_line(e)}): try again later"
                             + (" (the download resumes where it stopped)" if during == "download" else ""))
    return None


def _unusable(e: BaseException, repo: str) -> str:
    """Why the Hub's listing could not be used, for the line that says the cache is used instead."""
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError

    if isinstance(e, LocalEntryNotFoundError) or isinstance(e, _network_errors()):
        return "cannot reach the Hugging Face Hub"
    if isinstance(e, GatedRepoError):
        return f"the Hugging Face Hub refuses access to {repo} (gated: log in with `{login_command()}` or set HF_TOKEN)"
    return f"the Hugging Face Hub failed on {repo}"


def login_command() -> str:
    """The login command of the installed huggingface_hub (1.0 replaced `huggingface-cli` with `hf`)."""
    import huggingface_hub

    major = huggingface_hub.__version__.split(".")[0]
    return "huggingface-cli login" if major.isdigit() and int(major) < 1 else "hf auth login"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:120]}" if lines else type(e).__name__


# -- choosing the files ------------------------------------------------------------------------------------------


def preset_for(repo: str, listing: dict[str, int | None] | None = None) -> Preset:
    """The preset a repository is made for: the released repositories by name, others by the one preset whose
    official checkpoint file the repository holds."""
    if repo in KNOWN_REPOS:
        return PRESETS[KNOWN_REPOS[repo]]
    found = [p for p in PRESETS.values() if any(c in (listing or {}) for c in p.checkpoints)]
    if len({p.checkpoints for p in found}) != 1:
        raise FastSD35Error(f"{repo}: cannot tell which model it holds: pass --preset ({', '.join(PRESETS)})")
    return found[0]  # presets that share their files (tiny, tiny_random): the first, the trained tiny


def preset_of(repo: str, revision: str | None = None) -> Preset:
    """The preset for a Hub repository: a released one by name (no request), else from its file list."""
    if repo in KNOWN_REPOS:
        return PRESETS[KNOWN_REPOS[repo]]
    return plan(repo, revision, None).preset


def select_files(listing, preset: Preset, *, t5: bool = True, dtype: str | None = None) -> tuple[str, str | None, list[str]]:
    """(layout, official checkpoint or None, files to download) for `preset` from a repository's file names."""
    names = sorted(listing)

    def pick(table) -> list[str] | None:
        chosen = []
        for part, (patterns, required) in table.items():
            if not t5 and part in _T5_PARTS:
                continue
            matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            weights = any(p.endswith(".safetensors") for p in patterns)
            if required and not any(n.endswith(".safetensors") or not weights for n in matched):
                return None
            chosen += matched
        return chosen

    checkpoint = next((c for c in preset.checkpoints if c in listing), None)
    lacks_t5 = False
    if checkpoint and (chosen := pick(OFFICIAL_FILES)) is not None:
        t5_files = T5_FILES.get(dtype, T5_FILES[None])
        t5_file = next((f for f in t5_files if f in listing), None)
        if not t5 or t5_file:
            return "official", checkpoint, [checkpoint] + chosen + ([t5_file] if t5 else [])
        lacks_t5 = True
    if (chosen := pick(DIFFUSERS_FILES)) is not None:
        return "diffusers", None, chosen
    if lacks_t5:
        raise FastSD35Error(f"{checkpoint} is there but no T5-XXL file ({' or '.join(t5_files)}): pass --no-t5 to run "
                            "without T5 (weaker prompt following)")
    shown = ", ".join(n for n in names if "/" not in n) or "no files"
    raise FastSD35Error(
        f"no {preset.name} model in either layout: expected {' or '.join(preset.checkpoints)} with text_encoders/, or "
        f"a diffusers model_index.json with transformer/, vae/, text_encoder*/ (top-level files: {shown})"
    )


# -- plan and download -------------------------------------------------------------------------------------------


def plan(repo: str, revision: str | None, preset: Preset | None, *, t5: bool = True, dtype: str | None = None) -> HubPlan:
    """Which files of `repo` at `revision` the preset needs and which are already cached: one metadata request to the
    Hub, none when offline (HF_HUB_OFFLINE) or when the revision is a commit whose files are all cached. When the Hub
    cannot be reached (or refuses), a cached snapshot is used."""
    revision = revision or "main"
    commit = _cached_commit(repo, revision)
    cached = _cached_files(storage_folder(repo) / "snapshots" / commit) if commit else {}
    listing, source = None, None
    if hf_offline():
        source = "cache (HF_HUB_OFFLINE is set)"
    elif commit == revision and preset is not None and _complete(cached, preset, t5, dtype):
        source = "cache (this commit is fully cached)"
    else:
        try:
            commit, listing = _hub_listing(repo, revision)
        except Exception as e:  # noqa: BLE001  (sorted out by _explain; unknown errors keep their traceback)
            problem = _explain(e, repo, revision, "listing")
            if problem is None:
                raise
            if not cached or _does_not_exist(e):
                raise problem from None
            source = f"cache (the Hub failed: {_first_line(e)})"
            print(f"fastsd35: {_unusable(e, repo)} ({_first_line(e)}): using {repo} from the Hugging Face cache "
                  f"(commit {commit[:12]})", file=sys.stderr)
    if listing is None and not cached:
        raise FastSD35Error(f"{repo}{'' if revision == 'main' else '@' + revision} is not in the Hugging Face cache "
                            f"{hf_cache_dir()} and HF_HUB_OFFLINE is set (nor is it a local file or folder): run once online to "
                            "download it, or pass a local --model path")
    snapshot = storage_folder(repo) / "snapshots" / commit
    cached = _cached_files(snapshot)
    listing = cached if listing is None else listing
    try:
        preset = preset or preset_for(repo, listing)
        layout, checkpoint, names = select_files(listing, preset, t5=t5, dtype=dtype)
    except FastSD35Error as e:
        if source:
            broken = _broken_entries(snapshot)
            if broken:  # what the cache holds but cannot be read says more than what seems to be missing
                raise FastSD35Error(f"{repo} in the cache {snapshot}: {', '.join(broken[:3])}"
                                    f"{' ...' if len(broken) > 3 else ''}: delete the broken entries and run once "
                                    "online to fetch them again") from None
            raise FastSD35Error(f"{repo} in the cache {snapshot}: {e}: run once online to download the rest") from None
        raise FastSD35Error(f"{repo} on the Hub: {e}") from None
    files = tuple(HubFile(n, listing.get(n), n in cached) for n in names)
    return HubPlan(repo, revision, commit, preset, layout, checkpoint, files, snapshot, source or "hub")


def _does_not_exist(e: BaseException) -> bool:
    """The Hub says the repository or revision does not exist: a cached snapshot must not hide that."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(e, RevisionNotFoundError) or (isinstance(e, RepositoryNotFoundError) and not isinstance(e, GatedRepoError))


def _complete(cached, preset, t5, dtype) -> bool:
    try:
        return all(n in cached for n in select_files(cached, preset, t5=t5, dtype=dtype)[2])
    except FastSD35Error:
        return False


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or would, once created)."""
    folder = Path(folder)
    while not exists(folder) and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def download(p: HubPlan) -> Path:
    """Fetch the plan's missing files into the Hugging Face cache and return the local path to load. Checks the disk
    space first; afterwards checks every file is complete, so nothing half-written is ever loaded."""
    missing = [f for f in p.files if not f.cached]
    if missing:
        if p.source != "hub":  # offline or unreachable: only complete cached snapshots can be used
            names = ", ".join(f.path for f in missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise FastSD35Error(f"{p.name}: the cached snapshot {p.snapshot} lacks {names} for preset "
                                f"{p.preset.name} and the Hub cannot be used ({p.source}): run once online to complete it")
        need, free = p.download_bytes, free_bytes(hf_cache_dir())
        if need > free:
            raise FastSD35Error(f"not enough disk space for {p.name}: its files need {need / 1e9:.1f} GB but "
                                f"{hf_cache_dir()} has {free / 1e9:.1f} GB free: free some space or set HF_HOME to a "
                                "disk with room")
        from huggingface_hub import snapshot_download

        try:
            snapshot = Path(snapshot_download(p.repo, revision=p.commit, cache_dir=str(hf_cache_dir()),
                                              allow_patterns=[glob.escape(f.path) for f in p.files]))
        except Exception as e:  # noqa: BLE001
            problem = _explain(e, p.repo, p.revision, "download") or (
                FastSD35Error(f"the download of {p.name} failed ({_first_line(e)}): run the same command again to "
                              "resume it") if isinstance(e, OSError) else None)
            if problem is None:
                raise
            raise problem from None
        except KeyboardInterrupt:
            print(f"fastsd35: the download of {p.name} stopped; run the same command again to resume it", file=sys.stderr)
            raise
    else:
        snapshot = p.snapshot
    for f in p.files:  # the cache only links finished files, but a file may be gone or cut short since
        path = snapshot / f.path
        size = path.stat().st_size if is_file(path) else None
        if size is None or (f.size is not None and size != f.size):
            found = f"{size} bytes, expected {f.size}" if size is not None else (
                "missing" if not os.path.lexists(path) else "a link to a missing blob" if path.is_symlink()
                else "not a regular file")
            raise FastSD35Error(f"{p.name}: {path} in the Hugging Face cache is incomplete ({found}): delete it and "
                                "run the same command again online to fetch it")
    return snapshot / p.checkpoint if p.checkpoint else snapshot


__all__ = ["HubFile", "HubPlan", "KNOWN_REPOS", "download", "parse_hub_name", "plan", "preset_for", "preset_of",
           "select_files"]
