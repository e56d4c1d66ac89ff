"""The job layer (fastsd35.app.jobs): one schema for every front end. A Python request and the same command line give
the same job; a record becomes a request the command line's values override; messages name values as the front end
does; what the schema does not know is refused."""

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from fastsd35.app import cli, jobs
from fastsd35.errors import FastSD35Error
from fastsd35.pipeline.sampling import SLGConfig


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def from_cli(*argv):
    return jobs.from_args(cli.build_parser().parse_args(["run", *map(str, argv)]))


def test_a_python_request_and_the_command_line_make_the_same_job(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (40, 24), "red").save(init)
    request = {"preset": "tiny_random", "prompt": ["a cat", "a dog"], "negative_prompt": "blurry", "seed": 5,
               "batch_size": 2, "steps": 3, "cfg": 2.5, "sampler": "euler", "width": 64, "height": 48,
               "init_image": init, "denoise": 0.5, "t5_tokens": 100, "out": tmp_path / "out"}  # fmt: skip
    python = jobs.plan(request, label=str)
    command = from_cli("--preset", "tiny_random", "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt",
                       "blurry", "--seed", 5, "--batch-size", 2, "--steps", 3, "--cfg", 2.5, "--sampler", "euler",
                       "--width", 64, "--height", 48, "--init-image", init, "--denoise", 0.5, "--t5-tokens", 100,
                       "--out", tmp_path / "out")  # fmt: skip
    assert jobs.fingerprint(python) == jobs.fingerprint(command)
    assert python.settings == command.settings and python.image_names() == command.image_names()
    assert python.settings.denoise == 0.5 and python.init.sha256 == command.init.sha256
    assert python.image_names() == ["tiny_random_a-cat_5.png", "tiny_random_a-cat_6.png", "tiny_random_a-dog_5.png",
                                    "tiny_random_a-dog_6.png"]  # fmt: skip
    assert python.model.builtin and python.out == tmp_path / "out"
    assert jobs.fingerprint(dataclasses.replace(python, seed=6)) != jobs.fingerprint(python)


@pytest.mark.parametrize("label, shown", [(str, "steps"), (jobs.cli_label, "--steps")])
def test_messages_name_values_as_the_front_end_does(label, shown):
    with pytest.raises(FastSD35Error, match=rf"^{shown} must be an integer in \[1, 1000\], got 0$"):
        jobs.plan({"preset": "tiny_random", "prompt": "a", "steps": 0}, label=label)
    with pytest.raises(FastSD35Error, match=rf"^{shown.replace('steps', 'denoise')} needs "):
        jobs.plan({"preset": "tiny_random", "prompt": "a", "denoise": 0.5}, label=label)


def test_what_the_schema_does_not_know_is_refused():
    with pytest.raises(FastSD35Error, match="^unknown options: stepz, widht$"):
        jobs.plan({"preset": "tiny_random", "prompt": "a", "stepz": 3, "widht": 64}, label=str)
    with pytest.raises(FastSD35Error, match="^unknown option: --stepz$"):
        jobs.plan({"prompt": "a", "stepz": 3})


@pytest.mark.parametrize("key, value, message", [
    ("graphs", "yes", "graphs must be true or false, got 'yes'"),
    ("overwrite", 1, "overwrite must be true or false, got 1"),
    ("lora", "style.safetensors", "lora must be a list, got str"),
    ("lora", [42], "lora must be FILE[:SCALE] or a (file, scale) pair, got 42"),
    ("lora", [("x.safetensors", float("nan"))], "the scale must be a finite number, got nan"),
    ("lora", [("x.safetensors", 10**400)], "the scale must be a finite number"),
    ("control_type", "pose", "control_type needs controlnet"),
    ("prompt", 42, "prompt must be a string or a list of strings, got int"),
])  # fmt: skip
def test_every_value_is_checked_by_the_schema(key, value, message):
    with pytest.raises(FastSD35Error) as info:
        jobs.plan({"preset": "tiny_random", "prompt": "a", key: value}, label=str)
    assert message in str(info.value)


def test_a_record_is_a_request_that_the_command_line_overrides(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 48), "blue").save(init)
    job = jobs.plan({"preset": "tiny_random", "prompt": "a cat", "seed": 9, "steps": 3, "width": 64, "height": 48,
                     "init_image": init, "slg": SLGConfig(layers=(1,)), "t5_tokens": 90, "dtype": "fp32"},
                    label=str)  # fmt: skip
    record = {"prompt": "a cat", "preset": "tiny_random", "model": None, "negative_prompt": "", "seed": 9, "steps": 3,
              "cfg": job.settings.cfg, "shift": job.settings.shift, "sampler": job.settings.sampler, "width": 64,
              "height": 48, "slg": {"scale": 2.5, "start": 0.01, "end": 0.2, "layers": [1], "cfg": 4.0},
              "init_image": str(init.absolute()), "init_image_sha256": job.init.sha256, "denoise": 0.8,
              "dtype": "fp32", "t5_tokens": 90, "no_t5": False, "controlnet": None, "loras": [], "backend": "torch",
              "cfg_parallel": False}  # fmt: skip
    request = jobs.request_from_record(record, "x.png")
    again = jobs.plan(request, label=str)
    assert again.settings == job.settings and jobs.fingerprint(again) == jobs.fingerprint(job)

    steps_given = jobs.plan(jobs.merge({"steps": 5, "prompt": None}, request), label=str)
    assert steps_given.settings.steps == 5 and steps_given.seed == 9  # the command line wins, the record fills in

    other = tmp_path / "other.png"
    Image.new("RGB", (64, 48), "green").save(other)
    replaced = jobs.plan(jobs.merge({"init_image": other}, request), label=str)
    assert replaced.init.path == other  # another image on purpose: the record's hash does not apply to it
    init.write_bytes(other.read_bytes())
    with pytest.raises(FastSD35Error, match="is not the file the PNG was made with"):
        jobs.plan(request, label=str)


def test_a_record_is_checked_before_it_is_used():
    with pytest.raises(FastSD35Error, match="x.png: the record.steps must be an integer in"):
        jobs.request_from_record({"prompt": "a", "steps": "3"}, "x.png")
    with pytest.raises(FastSD35Error, match="fields this fastsd35 version does not know: magic"):
        jobs.request_from_record({"prompt": "a", "magic": 1}, "x.png")


def test_the_model_is_parsed_once(tmp_path):
    builtin = jobs.ModelSource.parse(None, preset_builtin=True)
    assert builtin.builtin and builtin.path is None and builtin.hub is None
    assert jobs.ModelSource.parse(None, preset_builtin=False).path == Path("models")
    assert jobs.ModelSource.parse("org/name@v1", False).hub == ("org", "name", )[:0] + ("org/name", "v1")
    assert jobs.ModelSource.parse("./org/name", False).path == Path("org/name")
    assert jobs.ModelSource.parse(Path("org/name"), False).path == Path("org/name")  # a Path is always local


def test_dry_run_describes_the_job_it_would_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny_random_a-cat_23.png").write_bytes(b"taken")
    job = from_cli("--preset", "tiny_random", "--prompt", "a cat", "--batch-size", 2, "--out", out)
    lines = list(jobs.describe(job))
    assert lines[0] == "preset: tiny_random: 8 steps, cfg 4.5, shift 3.0, dpmpp_2m, 256x256, no SLG, batch 2"
    assert lines[1] == "model: the built-in tiny_random model (no files to find)"
    assert lines[-1] == f"outputs: {out / 'tiny_random_a-cat_23-2.png'}, {out / 'tiny_random_a-cat_24.png'}"
    overwrite = dataclasses.replace(job, overwrite=True)
    assert jobs.planned_outputs(overwrite) == [out / "tiny_random_a-cat_23.png", out / "tiny_random_a-cat_24.png"]
