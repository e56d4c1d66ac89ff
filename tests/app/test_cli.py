"""`fastsd35 run` end to end on the tiny preset, and one test per bad input: exit status 2, one line on stderr,
nothing written."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from fastsd35.app.outputs import METADATA_KEY, PARAMETERS_KEY

from helpers.cli import FAST, fails, listing, run


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    """Run as a user on a CPU does: without Triton's interpreter the transformer takes the reference ops (the kernels
    have their own tests; interpreting them through whole generations would take minutes). Never touch the network
    or the real Hugging Face cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_tiny_end_to_end_with_metadata_and_reproduction(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--prompt", "a red cube", "--negative-prompt", "blurry", "--out", out, "--seed", 7, *FAST) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"wrote {out / 'tiny_random_a-red-cube_7.png'} in ")
    for stage in ("load", "encode", "sample", "decode"):
        assert f"{stage} " in printed
    path = out / "tiny_random_a-red-cube_7.png"
    with Image.open(path) as image:
        assert image.size == (64, 48)
        record = json.loads(image.info[METADATA_KEY])
        parameters = image.info[PARAMETERS_KEY]
        pixels = np.asarray(image)
    assert record["prompt"] == "a red cube" and record["negative_prompt"] == "blurry" and record["seed"] == 7
    assert (record["steps"], record["width"], record["height"], record["sampler"]) == (2, 64, 48, "dpmpp_2m")
    assert record["preset"] == "tiny_random" and record["fastsd35_version"]
    assert parameters.splitlines()[:2] == ["a red cube", "Negative prompt: blurry"]
    assert "Steps: 2, Sampler: dpmpp_2m, CFG scale: 4.5, Seed: 7, Size: 64x48" in parameters
    assert pixels.std() > 0  # not a blank image

    # The metadata alone reproduces the image, pixel for pixel; the original is kept (no --overwrite).
    assert run("--from-png", path, "--out", out) == 0
    with Image.open(out / "tiny_random_a-red-cube_7-2.png") as again:
        np.testing.assert_array_equal(np.asarray(again), pixels)
    assert listing(out) == ["tiny_random_a-red-cube_7-2.png", "tiny_random_a-red-cube_7.png"]


def test_batch_prompts_file_seeds_and_overwrite(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\n   \nsecond one\n")
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--prompts-file", prompts, "--batch-size", 2, "--out", out, *FAST) == 0
    assert listing(out) == [
        "tiny_random_first-prompt_23.png", "tiny_random_first-prompt_24.png", "tiny_random_second-one_23.png", "tiny_random_second-one_24.png"
    ]
    a, b = (np.asarray(Image.open(out / f"tiny_random_first-prompt_{s}.png")) for s in (23, 24))
    assert not np.array_equal(a, b)  # different seeds, different images
    (out / "tiny_random_first-prompt_23.png").write_bytes(b"an older file")  # --overwrite must replace it, not keep it
    assert run("--preset", "tiny_random", "--prompt", "first prompt", "--out", out, "--overwrite", *FAST) == 0
    assert len(listing(out)) == 4
    # Same seed, same noise: the image equals the batch-of-2 one up to float rounding that depends on the batch size.
    again = np.asarray(Image.open(out / "tiny_random_first-prompt_23.png")).astype(int)
    assert np.abs(again - a).max() <= 1


def test_img2img(tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--prompt", "x", "--init-image", init, "--denoise", 0.5, "--out", out, *FAST) == 0
    record = json.loads(Image.open(out / "tiny_random_x_23.png").info[METADATA_KEY])
    assert record["init_image"] == str(init) and record["denoise"] == 0.5


# -- bad input ------------------------------------------------------------------------------------------------------


def test_unknown_preset(tmp_path, capsys):
    fails(capsys, "unknown preset 'xl'; choose one of: sd3_medium, medium, large, large_turbo, tiny",
          "--preset", "xl", "--prompt", "a", "--out", tmp_path)


def test_missing_model_folder_lists_what_was_expected(tmp_path, capsys):
    fails(capsys, "nowhere: no such file or folder; expected a folder with sd3.5_large_turbo.safetensors (and clip_g.safetensors",
          "--preset", "large_turbo", "--model", tmp_path / "nowhere", "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)


def test_truncated_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "sd3.5_large.safetensors"
    ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header says 16 bytes, file has 2
    fails(capsys, "truncated", "--preset", "large", "--model", tmp_path, "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)


def test_checkpoint_for_another_model(tmp_path, capsys):
    from safetensors.torch import save_file

    from fastsd35.models.mmditx import MMDiTX
    from fastsd35.tiny.family import TINY_MMDITX_CONFIG

    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in MMDiTX(TINY_MMDITX_CONFIG).state_dict().items()}
    save_file(sd, str(tmp_path / "sd3.5_large.safetensors"))
    fails(capsys, "holds a custom transformer, but preset 'large' needs sd3.5_large",
          "--preset", "large", "--model", tmp_path, "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", 1000], "width 1000 is not a multiple of 16: use 992 or 1008"),
        (["--height", 100], "height 100 is not a multiple of 16: use 96 or 112"),
        (["--width", 2048], "width 2048 is beyond this model's position-embedding limit of 1024 pixels"),
        (["--steps", 0], "--steps must be an integer in [1, 1000], got 0"),
        (["--cfg", "nan"], "--cfg must be a finite number >= 0, got nan"),
        (["--cfg", "inf"], "--cfg must be a finite number >= 0, got inf"),
        (["--batch-size", 0], "--batch-size must be an integer in [1, 64], got 0"),
        (["--t5-tokens", 600], "--t5-tokens must be an integer in [77, 512], got 600"),
    ],
)
def test_bad_settings(tmp_path, capsys, args, message):
    fails(capsys, message, "--preset", "tiny_random", "--prompt", "a", "--out", tmp_path / "o", *args, out=tmp_path)


def test_bad_denoise_and_init_image(tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(init)
    for value in (0.0, 1.5):
        fails(capsys, f"--denoise must be a finite number in (0, 1], got {value!r}", "--preset", "tiny_random", "--prompt", "a",
              "--init-image", init, "--denoise", value, "--out", tmp_path / "o", out=tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    fails(capsys, f"cannot read init image {broken}", "--preset", "tiny_random", "--prompt", "a", "--init-image", broken,
          "--out", tmp_path / "o", out=tmp_path)
    fails(capsys, f"cannot read init image {tmp_path / 'missing.png'}", "--preset", "tiny_random", "--prompt", "a",
          "--init-image", tmp_path / "missing.png", "--out", tmp_path / "o", out=tmp_path)


def test_denoise_without_init_image(tmp_path, capsys):
    fails(capsys, "--denoise needs --init-image", "--preset", "tiny_random", "--prompt", "a", "--denoise", 0.5,
          "--out", tmp_path / "o", out=tmp_path)


def test_preset_read_from_the_checkpoint_or_asked_for(tmp_path, capsys):
    fails(capsys, "no --preset given and", "--model", tmp_path / "none", "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)
    from safetensors.torch import save_file

    from fastsd35.models.mmditx import MMDiTX
    from fastsd35.tiny.family import TINY_MMDITX_CONFIG

    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in MMDiTX(TINY_MMDITX_CONFIG).state_dict().items()}
    save_file(sd, str(tmp_path / "mine.safetensors"))
    fails(capsys, "mine.safetensors: holds a custom transformer (presets: tiny, tiny_random): pass --preset",
          "--model", tmp_path / "mine.safetensors", "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)


def test_prompt_problems(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails(capsys, f"prompts file {empty} has no prompts", "--preset", "tiny_random", "--prompts-file", empty, "--out", tmp_path / "o", out=tmp_path)
    fails(capsys, "cannot read prompts file", "--preset", "tiny_random", "--prompts-file", tmp_path / "nope.txt", "--out", tmp_path / "o", out=tmp_path)
    fails(capsys, 'nothing to generate: give --prompt "..." or --prompts-file FILE', "--preset", "tiny_random", "--out", tmp_path / "o", out=tmp_path)


def test_missing_encoder_and_tokenizer_files(tmp_path, capsys):
    from fastsd35.tiny.family import write_tiny_model

    models = write_tiny_model(tmp_path / "models")
    (models / "clip_l.safetensors").unlink()
    fails(capsys, "clip_l.safetensors", "--preset", "tiny_random", "--model", models, "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)
    import shutil

    write_tiny_model(models)
    shutil.rmtree(models / "tokenizer_3")
    fails(capsys, "tokenizer", "--preset", "tiny_random", "--model", models, "--prompt", "a", "--out", tmp_path / "o", out=tmp_path)


def test_tiny_from_official_files(tmp_path, capsys):
    from fastsd35.tiny.family import write_tiny_model

    models = write_tiny_model(tmp_path / "models")
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--model", models, "--prompt", "a red cube", "--out", out, *FAST) == 0
    assert run("--preset", "tiny_random", "--prompt", "a red cube", "--out", out, *FAST) == 0
    with Image.open(out / "tiny_random_a-red-cube_23.png") as a, Image.open(out / "tiny_random_a-red-cube_23-2.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # files and built-in weights are the same model
        assert json.loads(a.info[METADATA_KEY])["model"] == str(models)


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails(capsys, f"cannot write to output folder {blocker / 'out'}", "--preset", "tiny_random", "--prompt", "a", "--out", blocker / "out", out=tmp_path)


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run("--preset", "tiny_random", "--steps", "many")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_from_png_without_metadata(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    fails(capsys, f"{plain} has no fastsd35 metadata", "--from-png", plain, "--out", tmp_path / "o", out=tmp_path)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("fastsd35", '{"prompt": "cut off')  # a record whose JSON was damaged
    broken = tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(broken, pnginfo=info)
    fails(capsys, f"{broken}: its fastsd35 metadata is not valid JSON", "--from-png", broken, "--out", tmp_path / "o",
          out=tmp_path)  # fmt: skip


def test_interrupt_leaves_no_partial_png(tmp_path, capsys, monkeypatch):
    import fastsd35.pipeline.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsd35.pipeline.runner, "sample", interrupted)
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--prompt", "a", "--out", out, *FAST) == 130
    assert "interrupted" in capsys.readouterr().err
    assert listing(out) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-file", "overwrite"])
def test_interrupt_inside_the_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch, overwrite):
    """Ctrl-C at the moment the finished PNG is moved into place (`os.link`, or `os.replace` with --overwrite):
    its bytes are all in a temporary file next to the target, which the run must remove on its way out."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"another run's image")
    if overwrite:
        (out / "tiny_random_a_23.png").write_bytes(b"the image --overwrite would replace")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pending = []

    def interrupted(*args, **kwargs):
        pending.extend(p.read_bytes() for p in out.iterdir() if p.name not in before)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace" if overwrite else "link", interrupted)
    flags = ["--overwrite"] if overwrite else []
    assert run("--preset", "tiny_random", "--prompt", "a", "--out", out, *flags, *FAST) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(pending) == 1 and pending[0].startswith(b"\x89PNG")  # the write was under way, the PNG complete
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the temporary file is gone, the rest intact


# -- ControlNet -----------------------------------------------------------------------------------------------------


@pytest.fixture
def controlnet_files(tmp_path):
    from fastsd35.tiny.family import write_tiny_controlnet

    photo = np.zeros((48, 64, 3), dtype=np.uint8)
    photo[10:38, 16:48] = (200, 40, 40)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    return write_tiny_controlnet(tmp_path / "cn.safetensors", "canny"), tmp_path / "photo.png"


def test_controlnet_end_to_end_and_reproduction(tmp_path, controlnet_files):
    cn, photo = controlnet_files
    out = tmp_path / "out"
    args = ["--preset", "tiny_random", "--prompt", "a red box", "--controlnet", cn, "--control-image", photo,
            "--control-preprocess", "canny", "--canny-low", 50, "--control-strength", 0.8, "--out", out, *FAST]
    assert run(*args) == 0
    path = out / "tiny_random_a-red-box_23.png"
    with Image.open(path) as image:
        record = json.loads(image.info[METADATA_KEY])
        pixels = np.asarray(image)
    assert record["controlnet"] == {"controlnet": str(cn), "control_type": "canny", "control_image": str(photo),
                                    "control_image_sha256": hashlib.sha256(photo.read_bytes()).hexdigest(),
                                    "preprocess": "canny", "options": {"low": 50.0}, "strength": 0.8}
    assert (record["sampler"], record["cfg"], record["shift"]) == ("euler", 3.5, 3.0)  # the ControlNet settings
    assert run("--from-png", path, "--out", out) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "tiny_random_a-red-box_23-2.png")), pixels)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--control-preprocess", "depth"], "the depth ControlNet needs a depth map as the control image"),
        (["--canny-low", 10], "--canny-low only apply with the matching --control-preprocess"),
        (["--control-strength", "nan"], "--control-strength must be a finite number, got nan"),
    ],
)
def test_controlnet_bad_input(tmp_path, capsys, controlnet_files, extra, message):
    cn, photo = controlnet_files
    fails(capsys, message, "--preset", "tiny_random", "--prompt", "a", "--controlnet", cn, "--control-image", photo, *extra,
          "--out", tmp_path / "o", out=tmp_path)


def test_controlnet_needs_both_flags_and_a_readable_image(tmp_path, capsys, controlnet_files):
    cn, photo = controlnet_files
    base = ["--preset", "tiny_random", "--prompt", "a", "--out", tmp_path / "o"]
    fails(capsys, "--control-image needs --controlnet", *base, "--control-image", photo, out=tmp_path)
    fails(capsys, "--control-image, --control-strength need --controlnet", *base, "--control-image", photo,
          "--control-strength", 0.5, out=tmp_path)
    fails(capsys, "--controlnet needs --control-image", *base, "--controlnet", cn, out=tmp_path)
    fails(capsys, f"cannot read control image {tmp_path / 'none.png'}", *base, "--controlnet", cn, "--control-image",
          tmp_path / "none.png", out=tmp_path)
    fails(capsys, "no such ControlNet file or folder", *base, "--controlnet", tmp_path / "x.safetensors",
          "--control-image", photo, out=tmp_path)
    fails(capsys, "the SD3.5 ControlNets are made for SD3.5 Large: use --preset large or large_turbo, not medium",
          "--preset", "medium", "--prompt", "a", "--controlnet", cn, "--control-image", photo, "--out", tmp_path / "o",
          out=tmp_path)


def test_tiny_in_fp8_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--preset", "tiny_random", "--dtype", "fp8", "--prompt", "a red cube", "--out", out, *FAST) == 0
    with Image.open(out / "tiny_random_a-red-cube_23.png") as image:
        record = json.loads(image.info[METADATA_KEY])
        fp8 = np.asarray(image).astype(np.float32)
    assert record["dtype"] == "fp8" and fp8.std() > 0
    assert run("--preset", "tiny_random", "--prompt", "a red cube", "--out", out, *FAST) == 0
    with Image.open(out / "tiny_random_a-red-cube_23-2.png") as image:
        full = np.asarray(image).astype(np.float32)
    assert 0 < np.abs(fp8 - full).mean() < 8  # the same image within FP8's error (8 of 255 on average)
