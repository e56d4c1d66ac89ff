"""The `tiny` preset: the trained tiny family shipped with the package (fastsd35/tiny/trained) draws what the prompt
says, judged on pixels by `tiny_scenes.judge` (colour fractions and the shape of the largest blob: independent of the
training loss) and `tiny_scenes.adherence`, and the paths that must not change a picture keep those bars."""

import numpy as np
import pytest
import torch

from helpers.pipelines import reference_ops  # noqa: F401  (autouse, module-wide: the reference ops)

from fastsd35.app import cli
from fastsd35.pipeline.runner import Pipeline
from fastsd35.tiny import family as tiny
from fastsd35.tiny.scenes import CHECK_CAPTIONS, SIZE, adherence, judge, parse_caption

CAPTIONS = list(CHECK_CAPTIONS)  # every colour as the shape's and the background's, every shape
SEEDS = (23, 24, 25)  # `--seed 23 --batch-size 3`: the CLI's default seed and the next two
# The bars for the 8 captions x 3 seeds, by `judge`: colours right in 95% of the images, the shape in 75%.
# Measured on the shipped model with the preset's cfg 1.5: 24 and 23 of 24 (README "The tiny model").
COLOURS_RIGHT, SHAPES_RIGHT = 0.95, 0.75
# The adherence bars the trained model clears with margin and noise does not come near (coloured noise scores about
# 0.2, a plain background 0.5), on the same images.
MIN_SCORE = 0.75
MIN_MEAN = 0.85


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def checked(pipe):
    """{caption: its images for SEEDS}, generated once with the preset's settings."""
    return {caption: pipe(caption, seed=SEEDS[0], batch_size=len(SEEDS), progress=False) for caption in CAPTIONS}


def scores(images, captions=CAPTIONS):
    return np.array([adherence(image, caption).score for image, caption in zip(images, captions)])


def right(images, captions=CAPTIONS):
    """(colours right, shape right) per image, by `judge`."""
    judged = [(judge(image, caption), parse_caption(caption).shape) for image, caption in zip(images, captions)]
    return np.array([j.colours_right for j, _ in judged]), np.array([j.shape == shape for j, shape in judged])


def psnr(a, b) -> float:
    a, b = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_shipped_files_load_through_the_checkpoint_loaders(pipe):
    """The preset reads the package's model folder (official layout, fp16, 16 MiB: README says why not 10) with the
    real loaders."""
    folder = tiny.trained_model_dir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "tiny.safetensors",
        "tokenizer", "tokenizer_2", "tokenizer_3"]  # fmt: skip
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 16.5 * 2**20
    assert pipe.transformer.depth >= 4 and tiny.TRAINED_MMDITX_CONFIG.depth >= 4
    assert pipe.transformer.config == tiny.TRAINED_MMDITX_CONFIG and pipe.vae.config == tiny.TRAINED_VAE_CONFIG
    assert pipe.preset.name == "tiny" and (pipe.preset.width, pipe.preset.height) == (SIZE, SIZE)


def test_colours_and_shapes_are_right(checked):
    """The issue's check: over the 8 captions x 3 seeds, the colours right in at least 95% of the images and the shape
    a person would name in at least 75%, by `judge` (not the training loss, not adherence's layout templates)."""
    images = [im for caption in CAPTIONS for im in checked[caption]]
    captions = [caption for caption in CAPTIONS for _ in SEEDS]
    colours, shapes = right(images, captions)
    assert colours.mean() >= COLOURS_RIGHT and shapes.mean() >= SHAPES_RIGHT, (colours.mean(), shapes.mean())


def test_draws_what_the_caption_says(checked):
    """Every caption and seed: the named colour where the named shape is (best layout), the background colour
    elsewhere. The random-weight family fails the same bar."""
    got = np.array([scores(checked[caption], [caption] * len(SEEDS)) for caption in CAPTIONS])
    assert got.min() >= MIN_SCORE and got.mean() >= MIN_MEAN, got
    noise = Pipeline.from_preset("tiny_random", device="cpu")
    assert scores(noise(CAPTIONS, seed=23, width=SIZE, height=SIZE, steps=4, progress=False)).max() < 0.5


def test_guidance_is_applied_and_strong_guidance_distorts_squares(pipe):
    """The preset's cfg 1.5 changes the pictures of no guidance (cfg 1, the cond pass alone) from the same noise, and
    both follow the captions; much stronger guidance pinches the squares' sides (README: the cfg sweep), which a
    guidance that is not applied (or applied to the wrong pass) would not do."""
    squares = [c for c in CAPTIONS if "square" in c]
    guided, plain = (pipe(squares, seed=5, cfg=cfg, progress=False) for cfg in (1.5, 1.0))
    assert min(psnr(a, b) for a, b in zip(guided, plain)) < 45
    assert right(guided, squares)[1].all() and right(plain, squares)[1].all()
    strong = pipe(squares, seed=5, cfg=6.0, progress=False)
    assert right(strong, squares)[1].sum() <= 1


def test_another_sampler_still_follows_the_caption(pipe):
    """euler instead of dpmpp_2m changes the numerics on purpose; the picture must still follow the caption."""
    images = pipe(CAPTIONS, seed=23, sampler="euler", progress=False)
    colours, shapes = right(images)
    assert scores(images).mean() >= MIN_MEAN - 0.05 and colours.mean() >= 7 / 8 and shapes.mean() >= 5 / 8


def test_fp8_still_follows_the_caption():
    """FP8 weights (per-channel scales) change the numerics; the metric must still pass."""
    fp8 = Pipeline.from_preset("tiny", device="cpu", dtype="fp8")
    images = fp8(CAPTIONS, seed=23, progress=False)
    got, (colours, shapes) = scores(images), right(images)
    assert got.min() >= MIN_SCORE - 0.05 and got.mean() >= MIN_MEAN - 0.05, got
    assert colours.mean() >= 7 / 8 and shapes.mean() >= 5 / 8


def test_batch_of_two_is_the_same_pictures(pipe):
    """Image i of a batch uses seed + i: batching two captions gives the pictures made one at a time."""
    both = pipe(CAPTIONS[:2], seed=40, progress=False)
    alone = [pipe(CAPTIONS[i], seed=40 + i, progress=False)[0] for i in range(2)]
    assert min(psnr(a, b) for a, b in zip(both, alone)) >= 40


def test_triton_kernels_draw_the_same_picture(monkeypatch):
    """FastMMDiTX on the Triton kernels (interpreter) against the reference ops, on the trained weights."""
    kw = dict(seed=3, steps=2, width=32, height=32, progress=False)  # the interpreter is slow: 16 tokens, 2 steps
    reference = Pipeline.from_preset("tiny", device="cpu")(CAPTIONS[0], **kw)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fast = Pipeline.from_preset("tiny", device="cpu")
    assert type(fast.transformer).__name__ == "FastMMDiTX"
    assert psnr(fast(CAPTIONS[0], **kw)[0], reference) >= 40


def test_the_command_draws_a_red_square_on_blue(tmp_path):
    """The issue's "done when": `fastsd35 run --preset tiny --prompt "a red square on a blue background"` draws a red
    square on blue for most seeds (here the default seed 23 and the next two)."""
    out = tmp_path / "out"
    prompt = "a red square on a blue background"
    assert cli.main(["run", "--preset", "tiny", "--prompt", prompt, "--batch-size", "3", "--out", str(out)]) == 0
    from PIL import Image

    judged = [judge(Image.open(p), prompt) for p in sorted(out.iterdir())]
    assert len(judged) == 3 and sum(j.colours_right and j.shape == "square" for j in judged) >= 2, judged


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


def test_four_blocks_in_the_official_layout_cannot_fit_10_mb():
    """Why the shipped model is 16 MB (README "The tiny model"): the official layout makes the width 64 x depth, and
    at 4 blocks the adaLN modulations and the attention projections alone, which no config option shrinks, hold
    about 5 M parameters: over 10 MB in fp16 before any MLP, VAE or text encoder."""
    from fastsd35.models.mmditx import MMDiTX, MMDiTXConfig

    smallest = MMDiTX(MMDiTXConfig(depth=4, patch_size=1, pos_embed_max_size=16, context_dim=64, adm_in_channels=64,
                                   mlp_ratio=1 / 256))  # no second attention, the narrowest MLP
    adaln = sum(lin.weight.numel() + lin.bias.numel() for lin in smallest._adaln_linears())
    attention = sum(p.numel() for name, p in smallest.named_parameters() if ".attn." in name)
    assert smallest.config.hidden_size == 256 and 2.9e6 < adaln < 3.1e6 and 2.0e6 < attention < 2.2e6
    assert 2 * (adaln + attention) > 10e6
