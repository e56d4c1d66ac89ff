"""Hub names (fastsd35.pipeline.hub): resolution against a Hugging Face cache laid out here (models--ORG--NAME/blobs, snapshots,
refs), both layouts, revisions, the file selection, local-path precedence; every failure with huggingface_hub's own
exception types raised where its network calls would be. No test makes a network request: HF_HUB_OFFLINE is set and
the two calls that would reach the Hub (HfApi.model_info, snapshot_download) fail the test unless a test replaces them."""

import hashlib
import importlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image

from fastsd35.app import cli
from fastsd35.errors import FastSD35Error
from fastsd35.pipeline import hub
from fastsd35.pipeline.presets import PRESETS
from fastsd35.weights.checkpoints import find_model_files

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
FAST = ["--steps", "2", "--width", "64", "--height", "48"]

OFFICIAL = {  # the file names of stabilityai/stable-diffusion-3.5-large-turbo (both layouts), and a pickle
    "sd3.5_large_turbo.safetensors": 900,
    "text_encoders/clip_l.safetensors": 20,
    "text_encoders/clip_g.safetensors": 70,
    "text_encoders/t5xxl_fp16.safetensors": 400,
    "text_encoders/t5xxl_fp8_e4m3fn.safetensors": 200,
    "tokenizer/vocab.json": 3, "tokenizer/merges.txt": 3, "tokenizer/tokenizer_config.json": 1,
    "tokenizer_2/vocab.json": 3, "tokenizer_2/merges.txt": 3,
    "tokenizer_3/spiece.model": 3, "tokenizer_3/tokenizer.json": 3,
    "model_index.json": 1,
    "transformer/config.json": 1, "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 500,
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 400,
    "transformer/diffusion_pytorch_model.safetensors.index.json": 2,
    "vae/config.json": 1, "vae/diffusion_pytorch_model.safetensors": 10,
    "text_encoder/config.json": 1, "text_encoder/model.safetensors": 20, "text_encoder/pytorch_model.bin": 20,
    "text_encoder_2/config.json": 1, "text_encoder_2/model.safetensors": 70,
    "text_encoder_3/config.json": 1, "text_encoder_3/model-00001-of-00002.safetensors": 200,
    "text_encoder_3/model-00002-of-00002.safetensors": 200, "text_encoder_3/model.safetensors.index.json": 2,
    "text_encoder_3/model.fp16.safetensors": 400,
    "scheduler/scheduler_config.json": 1, "README.md": 5, "LICENSE.md": 5, "sd3.5_large_turbo_demo.png": 50,
}
DIFFUSERS = {k: v for k, v in OFFICIAL.items() if not k.startswith(("sd3.5", "text_encoders/"))}


@pytest.fixture(autouse=True)
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache, offline, with the network calls guarded; the CLI on the reference ops."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test reached for the network")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    return tmp_path / "hub"


def online(monkeypatch, listing=None, commit=COMMIT_A, error=None):
    """Go online with a Hub that lists `listing` ({path: size}) at `commit`, or raises `error`; returns the calls."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def model_info(self, repo_id, revision=None, files_metadata=False, **kwargs):
        calls.append((repo_id, revision))
        if error is not None:
            raise error
        return ModelInfo(id=repo_id, sha=commit, siblings=[{"rfilename": n, "size": s} for n, s in listing.items()],
                         private=False, downloads=0, likes=0, tags=[])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


def downloads(monkeypatch, cache, listing, error=None):
    """snapshot_download that stores the allowed files of `listing` in the cache as huggingface_hub does (blob, then
    the snapshot link), or raises `error` after writing an unfinished blob; returns the allow_patterns it got."""
    got = []

    def snapshot_download(repo_id, *, revision, cache_dir, allow_patterns, **kwargs):
        got.append(sorted(allow_patterns))
        assert Path(cache_dir) == cache
        if error is not None:
            blobs = cache / f"models--{repo_id.replace('/', '--')}" / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            (blobs / "0123.incomplete").write_bytes(b"x")
            raise error
        import fnmatch

        files = {n: b"x" * s for n, s in listing.items() if any(fnmatch.fnmatchcase(n, p) for p in allow_patterns)}
        return str(put_in_cache(cache, repo_id, files, revision, refs=()))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return got


def put_in_cache(cache: Path, repo: str, files: dict, commit: str = COMMIT_A, refs=("main",)) -> Path:
    """Lay out `files` ({path: bytes or a file to copy}) as huggingface_hub caches them: blobs named by content hash,
    snapshots/<commit>/<path> linking to them, refs/<name> holding the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        data = Path(data).read_bytes() if isinstance(data, Path) else data
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def fake_files(listing):
    return {name: b"x" * size for name, size in listing.items()}


def http_error(cls, status):
    """A huggingface_hub HTTP error as its HTTP library would produce it."""
    for name in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(name)
        except ImportError:
            continue
        return cls(f"{status} Client Error", response=http.Response(status, request=http.Request("GET", "https://huggingface.co/x")))
    import requests

    response = requests.Response()
    response.status_code = status
    return cls(f"{status} Client Error", response=response)


def connection_error():
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name).ConnectError("[Errno -3] Temporary failure in name resolution")
        except ImportError:
            continue
    import requests

    return requests.ConnectionError("Temporary failure in name resolution")


# -- names -------------------------------------------------------------------------------------------------------


def test_hub_names_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_name("stabilityai/stable-diffusion-3.5-large") == ("stabilityai/stable-diffusion-3.5-large", None)
    assert hub.parse_hub_name("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_hub_name(f"org/name@{COMMIT_A}") == ("org/name", COMMIT_A)
    for local in ("models", "./org/name", "/org/name", "a/b/c", "org/model.safetensors", "org/..", "~/x", None):
        assert hub.parse_hub_name(local) is None, local
    (tmp_path / "org").mkdir()
    assert hub.parse_hub_name("org/name") == ("org/name", None)  # only a path that exists is local
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse_hub_name("org/name") is None  # an existing path wins


# -- resolution from the cache -----------------------------------------------------------------------------------


def test_official_layout_selection_offline(hf_cache):
    snapshot = put_in_cache(hf_cache, "org/turbo", fake_files(OFFICIAL))
    p = hub.plan("org/turbo", None, PRESETS["large_turbo"])
    assert (p.layout, p.commit, p.source) == ("official", COMMIT_A, "cache (HF_HUB_OFFLINE is set)")
    names = [f.path for f in p.files]
    assert names[0] == "sd3.5_large_turbo.safetensors" and "text_encoders/t5xxl_fp16.safetensors" in names
    assert not any(n.endswith((".bin", ".md", ".png")) or n.startswith(("transformer/", "text_encoder/")) for n in names)
    assert "text_encoders/t5xxl_fp8_e4m3fn.safetensors" not in names
    assert {"tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_3/spiece.model"} <= set(names)
    assert hub.download(p) == snapshot / "sd3.5_large_turbo.safetensors"
    files = find_model_files(hub.download(p), PRESETS["large_turbo"])
    assert files.transformer == snapshot / "sd3.5_large_turbo.safetensors"

    fp8 = [f.path for f in hub.plan("org/turbo", None, PRESETS["large_turbo"], dtype="fp8").files]
    assert "text_encoders/t5xxl_fp8_e4m3fn.safetensors" in fp8 and "text_encoders/t5xxl_fp16.safetensors" not in fp8
    no_t5 = [f.path for f in hub.plan("org/turbo", None, PRESETS["large_turbo"], t5=False).files]
    assert not any("t5xxl" in n or n.startswith("tokenizer_3/") for n in no_t5)


def test_diffusers_layout_selection_offline(hf_cache):
    snapshot = put_in_cache(hf_cache, "org/diffusers", fake_files(DIFFUSERS))
    p = hub.plan("org/diffusers", None, PRESETS["large_turbo"])
    assert p.layout == "diffusers" and p.checkpoint is None
    names = {f.path for f in p.files}
    assert names == {n for n in DIFFUSERS if n.endswith((".safetensors", ".json", ".txt", ".model"))
                     and not n.startswith("scheduler/") and ".fp16." not in n}
    assert hub.download(p) == snapshot
    assert find_model_files(snapshot, PRESETS["large_turbo"]).transformer == snapshot
    no_t5 = {f.path for f in hub.plan("org/diffusers", None, PRESETS["large_turbo"], t5=False).files}
    assert not any(n.startswith(("text_encoder_3/", "tokenizer_3/")) for n in no_t5)


def test_revisions(hf_cache):
    put_in_cache(hf_cache, "org/turbo", fake_files(OFFICIAL), COMMIT_A, refs=("main",))
    put_in_cache(hf_cache, "org/turbo", fake_files(DIFFUSERS), COMMIT_B, refs=("v2",))
    turbo = PRESETS["large_turbo"]
    assert hub.plan("org/turbo", None, turbo).commit == COMMIT_A
    assert hub.plan("org/turbo", "v2", turbo).layout == "diffusers"
    assert hub.plan("org/turbo", COMMIT_A, turbo).layout == "official"
    with pytest.raises(FastSD35Error, match="org/turbo@v3 is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        hub.plan("org/turbo", "v3", turbo)
    with pytest.raises(FastSD35Error, match="org/none is not in the Hugging Face cache"):
        hub.plan("org/none", None, turbo)


def test_partial_cache_offline_says_what_is_missing(hf_cache):
    files = fake_files(OFFICIAL)
    del files["text_encoders/clip_g.safetensors"], files["text_encoder_2/model.safetensors"]
    put_in_cache(hf_cache, "org/turbo", files)
    with pytest.raises(FastSD35Error, match="in the cache .*no large_turbo model in either layout.*run once online"):
        hub.plan("org/turbo", None, PRESETS["large_turbo"])


def test_preset_named_by_repository():
    assert hub.preset_of("stabilityai/stable-diffusion-3.5-large-turbo").name == "large_turbo"  # no request
    assert hub.preset_for("org/x", {"sd3.5_medium.safetensors": 1}).name == "medium"
    with pytest.raises(FastSD35Error, match="cannot tell which model it holds: pass --preset"):
        hub.preset_for("org/x", {"sd3.5_large.safetensors": 1, "sd3.5_large_turbo.safetensors": 1})


# -- online: selection, disk space and every failure -------------------------------------------------------------


def test_online_download_fetches_only_the_selected_files(monkeypatch, hf_cache):
    calls = online(monkeypatch, OFFICIAL)
    got = downloads(monkeypatch, hf_cache, OFFICIAL)
    p = hub.plan("stabilityai/stable-diffusion-3.5-large-turbo", None, None)
    assert p.preset.name == "large_turbo" and p.source == "hub" and calls == [(p.repo, "main")]
    path = hub.download(p)
    assert path.name == "sd3.5_large_turbo.safetensors" and path.stat().st_size == 900
    assert got == [sorted(f.path for f in p.files)] and not any(".bin" in n for n in got[0])
    again = hub.plan(p.repo, None, None)  # everything cached now: nothing to download
    assert all(f.cached for f in again.files) and hub.download(again) == path and len(got) == 1


def test_commit_fully_cached_makes_no_request(monkeypatch, hf_cache):
    put_in_cache(hf_cache, "org/turbo", fake_files(OFFICIAL), refs=())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, but the guards fail on any request
    assert hub.plan("org/turbo", COMMIT_A, PRESETS["large_turbo"]).source.startswith("cache")


def test_not_enough_disk_space_is_found_before_downloading(monkeypatch, hf_cache):
    online(monkeypatch, {**OFFICIAL, "sd3.5_large_turbo.safetensors": 10**18})
    p = hub.plan("org/turbo", None, PRESETS["large_turbo"])
    with pytest.raises(FastSD35Error, match=r"not enough disk space for org/turbo: its files need 1000000000.0 GB but .* "
                                            r"GB free: free some space or set HF_HOME"):
        hub.download(p)  # the guarded snapshot_download was never called


@pytest.mark.parametrize("version, login", [("0.30.2", "huggingface-cli login"), ("1.0.0", "hf auth login")])
def test_gated_repository_names_the_license_page_and_the_login(monkeypatch, version, login):
    monkeypatch.setattr(huggingface_hub, "__version__", version)  # huggingface_hub 1.0 replaced huggingface-cli by hf
    online(monkeypatch, error=http_error(GatedRepoError, 403))
    with pytest.raises(FastSD35Error) as e:
        hub.plan("org/turbo", None, PRESETS["large_turbo"])
    assert str(e.value) == (f"org/turbo is gated: accept the license at https://huggingface.co/org/turbo and log in with "
                            f"`{login}` or set HF_TOKEN")


@pytest.mark.parametrize("error, message", [
    (lambda: http_error(RepositoryNotFoundError, 404), "org/turbo: no such model on the Hugging Face Hub"),
    (lambda: http_error(RevisionNotFoundError, 404), "org/turbo has no revision 'main': use a branch, tag or commit"),
    (connection_error, "cannot reach the Hugging Face Hub (ConnectError: [Errno -3] Temporary failure in name resolution) "
                       "and org/turbo is not in the cache"),
    (lambda: huggingface_hub.utils.OfflineModeIsEnabled("offline"), "cannot reach the Hugging Face Hub"),
])
def test_listing_failures(monkeypatch, error, message):
    online(monkeypatch, error=error())
    with pytest.raises(FastSD35Error) as e:
        hub.plan("org/turbo", None, PRESETS["large_turbo"])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("error, message", [
    (lambda: http_error(GatedRepoError, 401), "org/turbo is gated: accept the license at https://huggingface.co/org/turbo"),
    (lambda: LocalEntryNotFoundError("connection lost"), "the download of org/turbo was interrupted"),
    (connection_error, "the download of org/turbo was interrupted (ConnectError"),
    (lambda: OSError(28, "No space left on device"), "the download of org/turbo failed"),
])
def test_download_failures_and_resume(monkeypatch, hf_cache, error, message):
    online(monkeypatch, OFFICIAL)
    downloads(monkeypatch, hf_cache, OFFICIAL, error=error())
    p = hub.plan("org/turbo", None, PRESETS["large_turbo"])
    with pytest.raises(FastSD35Error) as e:
        hub.download(p)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not p.snapshot.exists()  # nothing half-written can be loaded
    got = downloads(monkeypatch, hf_cache, OFFICIAL)  # the next run completes it
    assert hub.download(hub.plan("org/turbo", None, PRESETS["large_turbo"])).is_file() and len(got) == 1


def test_unreachable_hub_falls_back_to_a_cached_snapshot(monkeypatch, hf_cache, capsys):
    put_in_cache(hf_cache, "org/turbo", fake_files(OFFICIAL))
    online(monkeypatch, error=connection_error())
    p = hub.plan("org/turbo", None, PRESETS["large_turbo"])
    assert p.source.startswith("cache (the Hub failed") and hub.download(p).is_file()
    err = capsys.readouterr().err
    assert err.startswith("fastsd35: cannot reach the Hugging Face Hub (") and err.count("\n") == 1, err
    assert err.endswith(f"): using org/turbo from the Hugging Face cache (commit {COMMIT_A[:12]})\n")
    assert "not in the cache" not in err
    online(monkeypatch, error=http_error(RepositoryNotFoundError, 404))  # the Hub says it is gone: no fallback
    with pytest.raises(FastSD35Error, match="no such model"):
        hub.plan("org/turbo", None, PRESETS["large_turbo"])


def test_cut_short_cached_file_is_never_loaded(monkeypatch, hf_cache):
    snapshot = put_in_cache(hf_cache, "org/turbo", fake_files(OFFICIAL))
    target = (snapshot / "text_encoders/clip_g.safetensors").resolve()
    target.write_bytes(b"x" * 10)  # corrupted since it was cached
    online(monkeypatch, OFFICIAL)
    with pytest.raises(FastSD35Error, match=r"clip_g.safetensors in the Hugging Face cache is incomplete \(10 bytes, expected 70\)"):
        hub.download(hub.plan("org/turbo", None, PRESETS["large_turbo"]))


# -- the CLI and the Pipeline with a Hub name --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny model's files as an official Hub repository lays them out (text encoders in text_encoders/)."""
    from fastsd35.tiny.family import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("tiny_random"))
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return {("text_encoders/" + n if n.endswith(".safetensors") and n != "tiny.safetensors" else n): p for n, p in files.items()}


def test_cli_generates_from_a_cached_hub_repository(hf_cache, tiny_files, tmp_path, capsys, monkeypatch):
    put_in_cache(hf_cache, "org/tiny-sd3", tiny_files)
    out = tmp_path / "out"
    assert cli.main(["run", "--model", "org/tiny-sd3", "--prompt", "a red cube", "--out", str(out), *FAST]) == 0
    png = out / "tiny_a-red-cube_23.png"  # the preset of tiny.safetensors: tiny (shared with tiny_random)
    with Image.open(png) as image:
        assert json.loads(image.info["fastsd35"])["model"] == f"org/tiny-sd3@{COMMIT_A}"  # pinned to the commit
    assert cli.main(["run", "--from-png", str(png), "--out", str(out)]) == 0  # reproduced from the cache, no request
    with Image.open(png) as a, Image.open(out / "tiny_a-red-cube_23-2.png") as b:
        assert a.tobytes() == b.tobytes()

    monkeypatch.chdir(tmp_path)  # a local folder of the same name wins
    (tmp_path / "org" / "tiny-sd3").mkdir(parents=True)
    capsys.readouterr()
    assert cli.main(["run", "--preset", "tiny_random", "--model", "org/tiny-sd3", "--prompt", "a", "--dry-run"]) == 2
    assert "org/tiny-sd3: no checkpoint for preset 'tiny_random'" in capsys.readouterr().err


def test_cli_dry_run_lists_the_hub_files_and_writes_nothing(monkeypatch, hf_cache, tmp_path, capsys):
    online(monkeypatch, OFFICIAL)
    out = tmp_path / "out"
    argv = ["run", "--model", "stabilityai/stable-diffusion-3.5-large-turbo", "--prompt", "a cat", "--out", str(out),
            "--dry-run", "--device", "cpu"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "preset: large_turbo: 4 steps, cfg 1.0, shift 3.0, euler, 1024x1024" in text
    assert "sd3.5_large_turbo.safetensors  0.00 GB  to download" in text and "official layout" in text
    assert "memory (cpu, not checked): about" in text and f"outputs: {out / 'large_turbo_a-cat_23.png'}" in text
    assert not out.exists() and not (hf_cache / "models--stabilityai--stable-diffusion-3.5-large-turbo").exists()


def test_cli_gated_repository_is_one_line(monkeypatch, tmp_path, capsys):
    online(monkeypatch, error=http_error(GatedRepoError, 401))
    assert cli.main(["run", "--model", "stabilityai/stable-diffusion-3.5-large", "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == ("fastsd35: error: stabilityai/stable-diffusion-3.5-large is gated: accept the license at "
                   f"https://huggingface.co/stabilityai/stable-diffusion-3.5-large and log in with `{hub.login_command()}` "
                   "or set HF_TOKEN\n")
    assert not (tmp_path / "o").exists()


def test_pipeline_from_pretrained_with_a_hub_name(hf_cache, tiny_files):
    from fastsd35.pipeline.runner import Pipeline

    put_in_cache(hf_cache, "org/tiny-sd3", tiny_files)
    pipe = Pipeline.from_pretrained("org/tiny-sd3", device="cpu")  # the preset from the repository's checkpoint
    assert pipe.preset.name == "tiny" and pipe.text_encoders.t5 is not None


@pytest.mark.parametrize("spelling", ["./org/tiny-sd3", "org//tiny-sd3", "org/./tiny-sd3"])
def test_dry_run_and_run_read_a_local_spelling_alike(hf_cache, tiny_files, tmp_path, capsys, monkeypatch, spelling):
    """A path spelled locally names no Hub repository, even where it normalises to one that is cached: the dry run and
    the run both say the local path is missing (the job parses --model once; the run never reaches the cache)."""
    put_in_cache(hf_cache, "org/tiny-sd3", tiny_files)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--preset", "tiny", "--model", spelling, "--prompt", "a", "--out", str(tmp_path / "out"), *FAST]
    for extra in (["--dry-run"], []):
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tiny-sd3: no such file or folder" in err, err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_with_a_cache_runs_listing_once_and_says_so(hf_cache, tiny_files, tmp_path, capsys,
                                                                        monkeypatch):
    """The run plans once (one listing request), says in one line that the cache is used, and generates."""
    put_in_cache(hf_cache, "org/tiny-sd3", tiny_files)
    calls = online(monkeypatch, error=connection_error())
    out = tmp_path / "out"
    assert cli.main(["run", "--model", "org/tiny-sd3", "--prompt", "a", "--out", str(out), *FAST]) == 0
    assert calls == [("org/tiny-sd3", "main")]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastsd35:")]
    assert len(err) == 1 and err[0].startswith("fastsd35: cannot reach the Hugging Face Hub"), err
    assert len(list(out.glob("*.png"))) == 1


def test_no_t5_applies_when_the_preset_comes_from_the_repository(hf_cache, tiny_files, tmp_path, capsys):
    """A cached official layout without T5 serves --no-t5 when the preset is read from the repository too, as it does
    with --preset named."""
    without_t5 = {n: p for n, p in tiny_files.items() if "t5xxl" not in n}
    put_in_cache(hf_cache, "org/tiny-no-t5", without_t5)
    out = tmp_path / "out"
    for preset in ([], ["--preset", "tiny"]):
        assert cli.main(["run", "--model", "org/tiny-no-t5", "--no-t5", *preset, "--prompt", "a", "--out", str(out),
                         *FAST]) == 0, capsys.readouterr().err  # fmt: skip
    assert len(list(out.glob("*.png"))) == 2
    assert cli.main(["run", "--model", "org/tiny-no-t5", "--prompt", "a", "--out", str(out), *FAST]) == 2
    assert "t5xxl" in capsys.readouterr().err  # without --no-t5 the missing T5 is named


@pytest.mark.parametrize("damage", ["dangling", "fifo"])
def test_a_broken_checkpoint_in_a_snapshot_is_named(hf_cache, tiny_files, tmp_path, capsys, damage):
    """A checkpoint whose blob is gone, or that is a FIFO, is named with what it is (not 'cannot tell which model')."""
    snapshot = put_in_cache(hf_cache, "org/broken", tiny_files)
    checkpoint = snapshot / "tiny.safetensors"
    blob = checkpoint.resolve()
    checkpoint.unlink()
    if damage == "dangling":
        checkpoint.symlink_to(os.path.relpath(blob.with_name("gone"), checkpoint.parent))
    else:
        os.mkfifo(checkpoint)
    assert cli.main(["run", "--model", "org/broken", "--prompt", "a", "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    kind = "a link to a missing or unreadable blob" if damage == "dangling" else "a FIFO"
    assert f"tiny.safetensors is {kind}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
