"""Hostile input, on the command line, in `--from-png` records and through the Python API: every value is checked
against the documented limits before anything is loaded, absent (None) is the only "default", user files never
block or are read without bound, non-finite results are refused, and nothing is written or left behind."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from fastsd35.app import cli
from fastsd35.app.outputs import METADATA_KEY
from fastsd35.errors import FastSD35Error
from fastsd35.pipeline import inputs
from fastsd35.pipeline.presets import get_preset
from fastsd35.pipeline.runner import Pipeline

FAST = ["--steps", "2", "--width", "64", "--height", "48"]


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def fails(capsys, message, *argv, out):
    before = listing(out)
    assert run(*argv) == 2
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # without tqdm's progress bar
    err = "".join(line + "\n" for line in lines if line and "sampling:" not in line)
    assert err.count("\n") == 1 and err.startswith("fastsd35: error: "), err
    assert message in err, err
    assert listing(out) == before
    return err


def tiny_run(tmp_path, *extra):
    return ["--preset", "tiny_random", "--out", tmp_path / "out", *extra]


# -- limits (class 3) and zero-is-not-default (class 4) ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 1001], "--steps must be an integer in [1, 1000], got 1001"),
        (["--steps", -3], "--steps must be an integer in [1, 1000], got -3"),
        (["--batch-size", 65], "--batch-size must be an integer in [1, 64], got 65"),
        (["--batch-size", -1], "--batch-size must be an integer in [1, 64], got -1"),
        (["--seed", -1], "--seed must be an integer in [0, 9223372036854775807], got -1"),
        (["--seed", 2**63], "--seed must be an integer in [0, 9223372036854775807], got 9223372036854775808"),
        (["--seed", 2**64 + 5], "--seed must be an integer in"),
        (["--width", 0], "width 0 is not a multiple of 16: use 16"),
        (["--height", 0], "height 0 is not a multiple of 16: use 16"),
        (["--width", -64], "width -64 is not a multiple of 16: use 16"),
        (["--shift", 0], "--shift must be a finite number > 0, got 0.0"),
        (["--t5-tokens", 0], "--t5-tokens must be an integer in [77, 512], got 0"),
        (["--device", "meta"], "--device 'meta' is not supported: use cuda, cuda:N or cpu"),
        (["--device", "mps"], "--device 'mps' is not supported"),
        (["--device", "bogus"], "unknown --device 'bogus'"),
        (["--text-encoder-device", "bogus"], "unknown --text-encoder-device 'bogus'"),
        (["--text-encoder-device", "meta"], "--text-encoder-device 'meta' is not supported"),
    ],
)
def test_limits_before_loading(tmp_path, capsys, args, message):
    fails(capsys, message, *tiny_run(tmp_path, "--prompt", "a"), *args, out=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    for flag in ("--device", "--text-encoder-device"):
        fails(capsys, f"{flag} 'cuda:1' asked for CUDA, which is not available here: use cpu",
              *tiny_run(tmp_path, "--prompt", "a"), flag, "cuda:1", out=tmp_path)


def test_the_seed_limit_fits_the_generator():
    """The largest seed, plus the image index and the VAE's stream offset, is a seed the CPU generator takes."""
    g = torch.Generator()
    g.manual_seed(inputs.MAX_SEED + inputs.MAX_BATCH + (2 << 32))
    with pytest.raises((RuntimeError, ValueError)):
        g.manual_seed(2**64)


def test_zero_is_not_the_default():
    preset = get_preset("tiny_random")
    assert preset.resolve(width=None).width == 256
    for kwargs in (dict(width=0), dict(height=0), dict(steps=0), dict(sampler=""), dict(shift=0.0)):
        with pytest.raises(FastSD35Error):
            preset.resolve(**kwargs)
    assert preset.resolve(cfg=0.0).cfg == 0.0  # a real zero is a value, not "unset"


# -- user files that are not what they seem ---------------------------------------------------------------------


def test_fifos_and_folders_never_hang(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fails(capsys, f"cannot read prompts file {fifo}: it is a FIFO", *tiny_run(tmp_path, "--prompts-file", fifo), out=tmp_path)
    fails(capsys, f"cannot read init image {fifo}: it is a FIFO", *tiny_run(tmp_path, "--prompt", "a", "--init-image", fifo), out=tmp_path)
    fails(capsys, f"cannot read PNG {fifo}: it is a FIFO", "--from-png", fifo, "--out", tmp_path / "o", out=tmp_path)
    fails(capsys, f"cannot read prompts file {tmp_path}: it is a folder", *tiny_run(tmp_path, "--prompts-file", tmp_path), out=tmp_path)
    if os.path.exists("/dev/zero"):  # endless: refused as a device, never read
        fails(capsys, "cannot read prompts file /dev/zero: it is not a regular file",
              *tiny_run(tmp_path, "--prompts-file", "/dev/zero"), out=tmp_path)
    fails(capsys, f"cannot read checkpoint {fifo}: it is a FIFO", "--model", fifo, "--prompt", "a",
          "--out", tmp_path / "o", out=tmp_path)


def test_a_huge_prompts_file_is_refused_unread(tmp_path, capsys):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(inputs.MAX_PROMPTS_FILE_BYTES + 1)  # sparse: nothing is really written
    fails(capsys, f"prompts file {big} is {inputs.MAX_PROMPTS_FILE_BYTES + 1} bytes; the limit is {inputs.MAX_PROMPTS_FILE_BYTES}",
          *tiny_run(tmp_path, "--prompts-file", big), out=tmp_path)


def png_header_only(width, height) -> bytes:
    """A PNG that claims width x height pixels (its pixels are never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, message", [(10_000, "is 10000x10000 pixels; the limit is 67108864 pixels"),
                                           (40_000, "cannot read init image")])
def test_decompression_bombs(tmp_path, capsys, side, message):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    fails(capsys, message, *tiny_run(tmp_path, "--prompt", "a", "--init-image", bomb), out=tmp_path)


# -- --from-png records (class 6) -----------------------------------------------------------------------------------


def png_with_record(path, record):
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, record if isinstance(record, str) else json.dumps(record))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = {"prompt": "a", "preset": "tiny_random", "steps": 2, "width": 64, "height": 48}


@pytest.mark.parametrize(
    "record, message",
    [
        (["a", "list"], "the record must be an object, got list"),
        ({"steps": 2}, "the record has no prompt"),
        ({**GOOD, "steps": "5"}, "the record.steps must be an integer in [1, 1000], got '5'"),
        ({**GOOD, "steps": 2.0}, "the record.steps must be an integer in [1, 1000], got 2.0"),
        ({**GOOD, "cfg": "5"}, "the record.cfg must be a finite number >= 0, got '5'"),
        ({**GOOD, "width": 0}, "width 0 is not a multiple of 16"),
        ({**GOOD, "sampler": ""}, "the record.sampler must be one of euler, dpmpp_2m, got ''"),
        ({**GOOD, "dtype": "fp64"}, "the record.dtype must be one of fp16, bf16, fp32, fp8, got 'fp64'"),
        ({**GOOD, "prompt": 5}, "the record.prompt must be a string, got 5"),
        ({**GOOD, "lora": [{"file": "x"}]}, "the record has fields this fastsd35 version does not know: lora"),
        ({**GOOD, "slg": {"scale": 1}}, "the record.slg has no start"),
        ({**GOOD, "slg": [1]}, "the record.slg must be an object"),
        ({**GOOD, "controlnet": {"controlnet": 3}}, "the record.controlnet has no control_image"),
        ({**GOOD, "init_image_sha256": "abc"}, "must be a SHA-256 hex digest"),
        ({**GOOD, "model": "x" * 5000}, "characters cut) ...xxxxxxxxxx"),
        ("[" * 100_000 + "]" * 100_000, "its fastsd35 metadata is not valid JSON"),
        ({**GOOD, "model": "a\u0000b"}, "must be a path (a str or Path, not empty, without NUL bytes)"),
        ({**GOOD, "init_image": ""}, "--init-image must be a path"),
        ({**GOOD, "model": "org/name@" + "r" * 6000}, "org/name"),
    ],
)
def test_bad_records(tmp_path, capsys, record, message):
    png = png_with_record(tmp_path / "r.png", record)
    fails(capsys, message, "--from-png", png, "--out", tmp_path / "o", out=tmp_path)


HUGE = 10**400  # a JSON integer no float holds: every number of a record is one line, not an OverflowError


@pytest.mark.parametrize("key, value", [
    ("cfg", HUGE), ("shift", HUGE), ("denoise", HUGE), ("seed", HUGE), ("steps", HUGE), ("width", HUGE),
    ("t5_tokens", HUGE), ("cfg", -HUGE),
    ("slg", {"scale": HUGE, "start": 0.01, "end": 0.2, "layers": [0], "cfg": 4.0}),
    ("slg", {"scale": 2.5, "start": 0.01, "end": 0.2, "layers": [HUGE], "cfg": 4.0}),
    ("loras", [{"file": "x.safetensors", "scale": HUGE}]),
    ("controlnet", {"controlnet": "cn", "control_image": "c.png", "strength": HUGE}),
    ("controlnet", {"controlnet": "cn", "control_image": "c.png", "strength": 1.0, "options": {"low": HUGE}}),
], ids=lambda v: str(v)[:30])  # fmt: skip
def test_huge_numbers_in_records(tmp_path, capsys, key, value):
    png = png_with_record(tmp_path / "r.png", {**GOOD, key: value})
    err = fails(capsys, "", "--from-png", png, "--out", tmp_path / "o", out=tmp_path)
    assert len(err) < 400 and ("1000000000" in err or "characters" in err or "layers" in err), err


def test_a_record_reproduces_from_any_folder_and_never_from_a_changed_file(tmp_path, capsys, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(first / "init.png")
    monkeypatch.chdir(first)
    assert run("--preset", "tiny_random", "--prompt", "x", "--init-image", "init.png", "--out", "out", *FAST, "--steps", 1) == 0
    made = first / "out" / "tiny_random_x_23.png"
    record = json.loads(Image.open(made).info[METADATA_KEY])
    assert record["init_image"] == str(first / "init.png") and len(record["init_image_sha256"]) == 64
    monkeypatch.chdir(second)
    assert run("--from-png", made, "--out", "again") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(second / "again" / "tiny_random_x_23.png")), np.asarray(Image.open(made)))
    Image.new("RGB", (40, 40), "red").save(first / "init.png")  # the same path, another image
    capsys.readouterr()
    fails(capsys, f"init image {first / 'init.png'} is not the file the PNG was made with", "--from-png", made,
          "--out", "again", out=second)


# -- whole runs: every prompt checked first (class 10), non-finite results (class 5) ------------------------------


def test_every_prompt_is_checked_before_the_first_image(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "word " * 100 + "\n")
    fails(capsys, "T5 tokens long", *tiny_run(tmp_path, "--prompts-file", prompts, "--t5-tokens", 77, *FAST), out=tmp_path)


def test_non_finite_results_write_nothing(tmp_path, capsys):
    fails(capsys, "sampling produced NaN or infinite values; likely cause: the extreme cfg 1e+30",
          *tiny_run(tmp_path, "--prompt", "a", "--cfg", 1e30, *FAST), out=tmp_path)


# -- the Python API (class 13, and the same checks as above) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.from_preset("tiny_random", device="cpu")


SMALL = dict(steps=2, width=64, height=48, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=5), "prompt must be a string or a list of strings, got int"),
        (dict(prompt=["a", None]), "prompt must be a string, got None"),
        (dict(negative_prompt=3), "negative prompt must be a string or a list of strings"),
        (dict(cfg="5"), "cfg must be a finite number >= 0, got '5'"),
        (dict(steps=True), "steps must be an integer in [1, 1000], got True"),
        (dict(steps=2.0), "steps must be an integer in [1, 1000], got 2.0"),
        (dict(seed=-1), "seed must be an integer in [0, 9223372036854775807], got -1"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(batch_size=0), "batch_size must be an integer in [1, 64], got 0"),
        (dict(width=0), "width 0 is not a multiple of 16"),
        (dict(init_image="photo.png"), "init_image must be a PIL.Image.Image, got the path 'photo.png'"),
        (dict(init_image=np.zeros((8, 8, 3))), "init_image must be a PIL.Image.Image, got ndarray"),
        (dict(denoise=0.5), "denoise needs an init_image"),
        (dict(slg="yes"), "slg must be None, True, False or an SLGConfig, got 'yes'"),
        (dict(control_strength=float("nan")), "control_strength must be a finite number, got nan"),
        (dict(control_image="edges.png"), "control_image must be a PIL.Image.Image, got the path 'edges.png'"),
        (dict(control_image=np.zeros((8, 8, 3))), "control_image must be a PIL.Image.Image, got ndarray"),
    ],
)
def test_api_arguments(tiny, monkeypatch, kwargs, message):
    monkeypatch.setattr(tiny.text_encoders, "encode", lambda *a: pytest.fail("encoded before checking"))
    kwargs = {"prompt": "a", **SMALL, **kwargs}
    with pytest.raises(FastSD35Error) as e:
        tiny.generate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("device, message", [("meta", "device 'meta' is not supported"), ("mps", "'mps' is not supported"),
                                             ("bogus", "unknown device 'bogus'"), (3.5, "unknown device 3.5")])
def test_api_devices(tmp_path, device, message):
    with pytest.raises(FastSD35Error, match=message):
        Pipeline.from_preset("tiny_random", device=device)
    with pytest.raises(FastSD35Error, match=message):
        Pipeline.from_pretrained(tmp_path, "tiny_random", device=device)
    with pytest.raises(FastSD35Error, match=message.replace("device", "text_encoder_device", 1)):
        Pipeline.from_pretrained(tmp_path, "tiny_random", device="cpu", text_encoder_device=device)


def test_api_load_options(tmp_path):
    for kwargs, message in ((dict(dtype="fp64"), "dtype must be one of"), (dict(dtype=torch.float64), "dtype must be"),
                            (dict(dtype=16), "dtype must be one of"), (dict(t5="no"), "t5 must be True or False"),
                            (dict(t5_tokens=0), "t5_tokens must be an integer in [77, 512]")):
        with pytest.raises(FastSD35Error, match=message.replace("[", r"\[").replace("]", r"\]")):
            Pipeline.from_preset("tiny_random", device="cpu", **kwargs)
    with pytest.raises(FastSD35Error, match="model must be a path"):
        Pipeline.from_pretrained(3, "tiny_random", device="cpu")
    assert Pipeline.from_preset("tiny_random", device="cpu", dtype="fp16").transformer.dtype == torch.float16  # --dtype's names


def test_api_non_finite_weights_name_the_cause(tiny):
    weight = tiny.transformer.final_layer.linear.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(FastSD35Error, match="sampling produced NaN or infinite values; likely cause: NaN or infinite weights"):
            tiny.generate("a", **SMALL)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert len(tiny.generate("a", **SMALL).images) == 1


def test_api_non_finite_decode_is_caught(tiny, monkeypatch):
    monkeypatch.setattr(tiny.vae, "decode", lambda z: torch.full((z.shape[0], 3, 48, 64), float("inf")))
    with pytest.raises(FastSD35Error, match="decoding produced NaN or infinite values"):
        tiny.generate("a", **SMALL)


def test_open_image_checks_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(9000, 9000))
    with pytest.raises(FastSD35Error, match="is 9000x9000 pixels"):
        inputs.open_image(path, "image")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buffer, format="PNG")
    (tmp_path / "ok.png").write_bytes(buffer.getvalue())
    assert inputs.open_image(tmp_path / "ok.png", "image").size == (4, 4)


def test_check_rejects_bool_for_numbers_and_numbers_for_strings():
    assert inputs.check("cfg", 5) == 5.0 and isinstance(inputs.check("cfg", 5), float)
    for name, value in (("cfg", True), ("steps", 3.0), ("sampler", 1), ("no_t5", 1), ("cfg", float("inf"))):
        with pytest.raises(FastSD35Error):
            inputs.check(name, value)



@pytest.mark.parametrize("option", ["--init-image", "--prompts-file", "--out", "--model", "--lora", "--controlnet",
                                    "--from-png"])
@pytest.mark.parametrize("value", ["a\x00b", ""])
def test_paths_that_no_file_system_holds(tmp_path, capsys, option, value):
    """A NUL byte (or an empty path) in any path option is one line before anything is generated or written."""
    fails(capsys, "", *tiny_run(tmp_path, "--prompt", "a", option, value), out=tmp_path)
