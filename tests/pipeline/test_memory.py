"""The GPU memory estimate (fastsd35.pipeline.memory) for the released configs, the preflight's one-line verdicts on a device
that reports too little memory (through the device_memory seam), and `fastsd35 run --dry-run`."""

import pytest
import torch

from fastsd35.app import cli, jobs
from fastsd35.errors import FastSD35Error
from fastsd35.pipeline import memory
from fastsd35.pipeline.memory import Request, estimate, preflight
from fastsd35.pipeline.presets import PRESETS

CUDA = torch.device("cuda")


@pytest.mark.parametrize("variant, billions, rel", [("sd3.5_large", 8.1, 0.01), ("sd3.5_medium", 2.5, 0.02), ("sd3_medium", 2, 0.05)])
def test_transformer_parameters_from_the_configs(variant, billions, rel):
    assert memory.transformer_parameters(variant)[0] == pytest.approx(billions * 1e9, rel=rel)  # "2B": a rounded figure
    assert PRESETS["large_turbo"].variant == PRESETS["large"].variant == "sd3.5_large"  # Turbo: Large's architecture


@pytest.mark.parametrize("name, billions, rel", [("t5xxl", 4.7, 0.02), ("clip_g", 0.69, 0.02), ("clip_l", 0.12, 0.04)])
def test_text_encoder_parameters_from_the_configs(name, billions, rel):
    assert memory.encoder_parameters(name) == pytest.approx(billions * 1e9, rel=rel)


def test_estimate_follows_dtype_encoders_batch_and_size():
    large = Request("sd3.5_large", "bf16", 1024, 1024)
    e = estimate(large)
    assert e.parts["transformer"] == pytest.approx(2 * 8.15e9, rel=0.01)
    assert e.parts["text encoders"] == pytest.approx(2 * (4.76 + 0.69 + 0.12) * 1e9, rel=0.01) and e.text_encoders_on_gpu
    totals = [estimate(Request("sd3.5_large", d, 1024, 1024)).total for d in ("fp8", "bf16", "fp32")]
    assert totals == sorted(totals) and totals[0] < totals[1] - 7e9  # FP8 halves the Linear weights
    assert estimate(Request("sd3.5_large", "bf16", 1024, 1024, t5=False)).total < e.total - 9e9
    assert estimate(Request("sd3.5_large", "bf16", 1024, 1024, batch=4)).total > e.total
    assert estimate(Request("sd3.5_large", "bf16", 512, 512)).total < e.total
    assert estimate(Request("sd3.5_medium", "bf16", 1024, 1024)).total < e.total
    cpu_encoders = estimate(Request("sd3.5_large", "bf16", 1024, 1024, text_encoder_device="cpu"))
    assert not cpu_encoders.text_encoders_on_gpu and cpu_encoders.parts["text encoders"] == 0
    auto = estimate(large, free=22e9)  # "auto" puts them on the CPU when they do not fit beside the rest
    assert not auto.text_encoders_on_gpu and auto.total < 22e9


@pytest.fixture
def gpu_with(monkeypatch):
    def set_free(gb):
        monkeypatch.setattr(memory, "device_memory", lambda device: (int(gb * 1e9), int(80e9)))

    return set_free


def test_preflight_says_what_would_fit(gpu_with):
    gpu_with(14)
    large = Request("sd3.5_large", "bf16", 1024, 1024)
    with pytest.raises(FastSD35Error) as e:
        preflight(large, CUDA)
    message = str(e.value)
    assert message.startswith("SD3.5 Large in bf16 at 1024x1024, batch 1 needs about ") and "\n" not in message
    assert "of GPU memory but cuda has 14.0 GB free: it would fit with --dtype fp8 (about 1" in message
    with pytest.raises(FastSD35Error, match="it does not fit even with --width 512 --height 512 .*: use a GPU with more memory"):
        preflight(large, CUDA, dtypes=("fp16", "bf16", "fp32"))  # before --dtype fp8 exists

    gpu_with(40)
    crowded = Request("sd3.5_large", "bf16", 1024, 1024, batch=4, text_encoder_device="cuda")
    with pytest.raises(FastSD35Error, match=r"--text-encoder-device cpu \(about .* GB\), or --batch-size [1-3] "):
        preflight(crowded, CUDA)
    gpu_with(24)
    with pytest.raises(FastSD35Error, match=r"it would fit with --dtype fp8 --text-encoder-device cpu --batch-size \d together"):
        preflight(crowded, CUDA)


def test_preflight_passes_when_it_fits_and_skips_the_cpu(gpu_with):
    gpu_with(80)
    e = preflight(Request("sd3.5_large", "bf16", 1024, 1024), CUDA)
    assert e.text_encoders_on_gpu and e.total < 80e9
    gpu_with(1)
    assert preflight(Request("sd3.5_large", "fp32", 1024, 1024), torch.device("cpu")) is None


@pytest.fixture
def large_folder(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "sd3.5_large.safetensors").write_bytes(b"")  # --dry-run and the preflight read no weights
    return folder


def test_dry_run_prints_and_writes_nothing(monkeypatch, gpu_with, large_folder, tmp_path, capsys):
    monkeypatch.setattr(jobs, "_device", lambda requested, label: CUDA)
    out = tmp_path / "out" / "nested"
    argv = ["run", "--preset", "large", "--model", str(large_folder), "--prompt", "a cat", "--prompt", "a dog",
            "--batch-size", "2", "--out", str(out), "--dry-run"]
    gpu_with(80)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "preset: large: 40 steps, cfg 4.5, shift 3.0, dpmpp_2m, 1024x1024, no SLG, batch 2" in text
    assert f"model: transformer {large_folder / 'sd3.5_large.safetensors'}" in text
    assert "memory (cuda): about " in text and "fits: 80.0 GB free; text encoders on the GPU" in text
    names = [out / n for n in ("large_a-cat_23.png", "large_a-cat_24.png", "large_a-dog_23.png", "large_a-dog_24.png")]
    assert f"outputs: {', '.join(map(str, names))}" in text
    assert not (tmp_path / "out").exists()

    gpu_with(22)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "memory (cuda): about " in captured.out
    assert captured.err.count("\n") == 1 and "but cuda has 22.0 GB free: it would fit with --dtype fp8 (" in captured.err
    assert "or --batch-size 1 (" in captured.err
    assert not (tmp_path / "out").exists()


def test_preflight_runs_before_anything_is_loaded_or_written(monkeypatch, gpu_with, large_folder, tmp_path, capsys):
    import fastsd35.pipeline.runner

    def never(*args, **kwargs):
        raise AssertionError("loaded a model that does not fit")

    monkeypatch.setattr(fastsd35.pipeline.runner.Pipeline, "from_pretrained", never)
    monkeypatch.setattr(jobs, "_device", lambda requested, label: CUDA)
    gpu_with(12)
    out = tmp_path / "out"
    assert cli.main(["run", "--preset", "large", "--model", str(large_folder), "--prompt", "a", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsd35: error: SD3.5 Large in bf16 at 1024x1024, batch 1 needs about") and err.count("\n") == 1
    assert not out.exists()


def test_pipeline_checks_the_weights_fit_before_loading(gpu_with, large_folder, monkeypatch):
    from fastsd35.pipeline.runner import Pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA device passes the device check ...
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu_with(8)  # ... and has 8 GB free: the Large weights alone are 16 GB in bf16
    with pytest.raises(FastSD35Error, match=r"SD3.5 Large in bf16 at 256x256, batch 1 needs about 1\d\.\d GB .* 8.0 GB free"):
        Pipeline.from_pretrained(large_folder, "large", device="cuda")  # the empty checkpoint is never opened
