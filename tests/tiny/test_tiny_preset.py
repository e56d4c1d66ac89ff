"""The `tiny` preset: the trained tiny family shipped with the package (fastsd35/tiny_model) draws what the prompt
says, measured on pixels with `tiny_scenes.adherence`, and the paths that must not change a picture do not."""

import numpy as np
import pytest
import torch

from fastsd35.app import cli
from fastsd35.pipeline.runner import Pipeline
from fastsd35.tiny import family as tiny
from fastsd35.tiny.scenes import SIZE, adherence

# One caption per shape, every colour at least once as shape or background.
CAPTIONS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a white triangle on a red background",
    "a blue circle on a yellow background",
    "a green square on a white background",
]
# The bar the trained model clears with margin and noise does not come near. Measured on the shipped model
# (seed 23, 64x64, the preset's 16 steps): README "The tiny model". Coloured noise scores about 0.2.
MIN_SCORE = 0.75
MIN_MEAN = 0.85


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference ops, as on a user's CPU (one test turns it back on)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset("tiny", device="cpu")


def scores(images, captions=CAPTIONS):
    return np.array([adherence(image, caption).score for image, caption in zip(images, captions)])


def psnr(a, b) -> float:
    a, b = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_shipped_files_load_through_the_checkpoint_loaders(pipe):
    """The preset reads the package's model folder (official layout, well under 10 MB) with the real loaders."""
    folder = tiny.trained_model_dir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "tiny.safetensors",
        "tokenizer", "tokenizer_2", "tokenizer_3"]  # fmt: skip
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 6 * 2**20
    assert pipe.transformer.config == tiny.TRAINED_MMDITX_CONFIG and pipe.vae.config == tiny.TRAINED_VAE_CONFIG
    assert pipe.preset.name == "tiny" and (pipe.preset.width, pipe.preset.height) == (SIZE, SIZE)


def test_draws_what_the_caption_says(pipe):
    """Every caption: the named colour where the named shape is (best layout), the background colour elsewhere. The
    random-weight family fails the same bar."""
    got = scores(pipe(CAPTIONS, seed=23, progress=False))
    assert got.min() >= MIN_SCORE and got.mean() >= MIN_MEAN, got
    noise = Pipeline.from_preset("tiny_random", device="cpu")
    assert scores(noise(CAPTIONS, seed=23, width=SIZE, height=SIZE, steps=4, progress=False)).max() < 0.5


def test_guidance_sharpens_adherence(pipe):
    """cfg 4.5 (the preset's) follows the captions better than cfg 1.0 (no guidance) from the same noise."""
    guided = scores(pipe(CAPTIONS, seed=5, progress=False)).mean()
    plain = scores(pipe(CAPTIONS, seed=5, cfg=1.0, progress=False)).mean()
    assert guided > plain + 0.02, (guided, plain)


def test_another_sampler_still_follows_the_caption(pipe):
    """euler instead of dpmpp_2m changes the numerics on purpose; the picture must still follow the caption."""
    got = scores(pipe(CAPTIONS, seed=23, sampler="euler", progress=False))
    assert got.mean() >= MIN_MEAN - 0.05, got


def test_fp8_still_follows_the_caption():
    """FP8 weights (per-channel scales) change the numerics; the metric must still pass."""
    fp8 = Pipeline.from_preset("tiny", device="cpu", dtype="fp8")
    got = scores(fp8(CAPTIONS, seed=23, progress=False))
    assert got.min() >= MIN_SCORE - 0.05 and got.mean() >= MIN_MEAN - 0.05, got


def test_batch_of_two_is_the_same_pictures(pipe):
    """Image i of a batch uses seed + i: batching two captions gives the pictures made one at a time."""
    both = pipe(CAPTIONS[:2], seed=40, progress=False)
    alone = [pipe(CAPTIONS[i], seed=40 + i, progress=False)[0] for i in range(2)]
    assert min(psnr(a, b) for a, b in zip(both, alone)) >= 40


def test_triton_kernels_draw_the_same_picture(monkeypatch):
    """FastMMDiTX on the Triton kernels (interpreter) against the reference ops, on the trained weights."""
    kw = dict(seed=3, steps=4, progress=False)
    reference = Pipeline.from_preset("tiny", device="cpu")(CAPTIONS[0], **kw)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fast = Pipeline.from_preset("tiny", device="cpu")
    assert type(fast.transformer).__name__ == "FastMMDiTX"
    assert psnr(fast(CAPTIONS[0], **kw)[0], reference) >= 40


def test_from_png_reproduces_the_picture(tmp_path):
    """`fastsd35 run --preset tiny` and `--from-png` on its file: the same pixels."""
    out = tmp_path / "out"
    assert cli.main(["run", "--preset", "tiny", "--prompt", CAPTIONS[0], "--out", str(out)]) == 0
    (first,) = sorted(out.iterdir())
    assert cli.main(["run", "--from-png", str(first), "--out", str(out)]) == 0
    from PIL import Image

    images = [np.asarray(Image.open(p)) for p in sorted(out.iterdir())]
    assert len(images) == 2 and images[0].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(images[0], images[1])
    assert adherence(images[0], CAPTIONS[0]).score >= MIN_SCORE


@pytest.mark.gpu
def test_cuda_graphs_draw_the_same_picture_gpu():
    """The passes replayed from CUDA graphs against eager passes, on the trained weights."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = dict(seed=23, progress=False)
    graphed = Pipeline.from_preset("tiny", device="cuda")(CAPTIONS, **kw)
    eager = Pipeline.from_preset("tiny", device="cuda", graphs=False)(CAPTIONS, **kw)
    assert min(psnr(a, b) for a, b in zip(graphed, eager)) >= 40
    assert scores(graphed).mean() >= MIN_MEAN - 0.05


def test_an_installation_without_the_model_files_says_so(tmp_path, monkeypatch, capsys):
    """A broken installation (the package's model folder gone): one line naming the folder and the fix, exit 2."""
    from fastsd35.errors import FastSD35Error

    monkeypatch.setattr(tiny, "TRAINED_MODEL_DIR", tmp_path / "tiny_model")
    with pytest.raises(FastSD35Error, match=r"the tiny model is missing from this installation .*tiny_model.*tiny.train"):
        Pipeline.from_preset("tiny", device="cpu")
    assert cli.main(["run", "--preset", "tiny", "--prompt", "a", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the tiny model is missing" in err and not (tmp_path / "out").exists()
