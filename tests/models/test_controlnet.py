"""ControlNet: parity with diffusers' SD3ControlNetModel, the reference's 8B/2B semantics, the control image path,
preprocessing, loading and its errors, and the Triton ops."""

import copy
import re

import numpy as np
import pytest
import torch
from helpers.diffusers_ref import require_diffusers
from helpers.models import make_diffusers, run_diffusers
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from fastsd35 import kernels
from fastsd35.models.controlnet import SD35_LARGE_CONTROLNET, ControlNet, ControlNetConfig, check_compatible, control_type_id
from fastsd35.pipeline.control import blur, canny, control_latent, control_pixels, preprocess
from fastsd35.weights.controlnet import load_controlnet
from fastsd35.errors import CheckpointError, FastSD35Error
from fastsd35.models.mmditx import FastMMDiTX, MMDiTX, MMDiTXConfig
from fastsd35.tiny.family import randomize_
from fastsd35.tiny.family import TINY_VAE_CONFIG
from fastsd35.models.vae import SDVAE, process_in

MAIN = MMDiTXConfig(depth=4, pos_embed_max_size=16, context_dim=48, adm_in_channels=40, qk_norm="rms")  # hidden 256
CN_8B = ControlNetConfig(num_layers=2, hidden_size=256, pooled_dim=40)  # pooled input = the raw pooled text
CN_2B = ControlNetConfig(num_layers=2, hidden_size=256, pooled_dim=256)  # pooled input = the transformer's y_embedder


def diffusers_controlnet(num_layers=2, seed=3):
    """The SD3.5 8B ControlNet's diffusers config (convert_sd3_controlnet_to_diffusers.py), tiny (skips the test
    without diffusers)."""
    model = require_diffusers().SD3ControlNetModel(
        patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=64, num_attention_heads=MAIN.num_heads,
        joint_attention_dim=None, caption_projection_dim=MAIN.hidden_size, pooled_projection_dim=MAIN.adm_in_channels,
        out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    )  # fmt: skip
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def main():
    return randomize_(MMDiTX(MAIN), 0).eval()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    diffusers_controlnet().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """A random 8B-kind canny ControlNet, written in the released files' layout and loaded (no diffusers needed)."""
    model = randomize_(ControlNet(CN_8B), 3)
    model.control_type.fill_(control_type_id("canny"))
    path = tmp_path_factory.mktemp("controlnet") / "sd3.5_large_controlnet_canny.safetensors"
    save_file(official_state(model), str(path))
    return load_controlnet(path, device="cpu")


def inputs(batch=2, h=8, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=g)
    sigma = torch.tensor([0.98, 0.0035, 0.5][:batch]).half().float()  # fp16-rounded, as the sampler feeds the model
    y = torch.randn(batch, MAIN.adm_in_channels, generator=g)
    ctx = torch.randn(batch, 7, MAIN.context_dim, generator=g)
    cond = torch.randn(1, 16, h, w, generator=g)
    return x, sigma, y, ctx, cond


def official_state(model: ControlNet) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# -- parity with diffusers ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_residuals_match_diffusers(main, diffusers_folder):
    """diffusers' pipeline gives an SD3.5 8B ControlNet the transformer's pos_embed (patch + position table) and the
    latent; we borrow the same from our transformer. diffusers' timestep is our sigma * 1000; same pooled text."""
    cn = load_controlnet(diffusers_folder, control_type="canny", device="cpu")
    ref = require_diffusers().SD3ControlNetModel.from_pretrained(diffusers_folder).eval()
    ref.pos_embed = ref._get_pos_embed_from_transformer(make_diffusers(main))
    x, sigma, y, _, cond = inputs()
    ours = cn(main, x, sigma, y, cond, scale=0.7)
    expected = ref(hidden_states=x, controlnet_cond=cond.expand(2, -1, -1, -1), conditioning_scale=0.7,
                   pooled_projections=y, timestep=sigma * 1000, return_dict=False)[0]  # fmt: skip
    assert len(ours) == 2 and ours[0].shape == (2, 4 * 6, MAIN.hidden_size)
    for a, b in zip(ours, expected):
        assert b.std() > 0.3  # outputs of order 1: the bound is meaningful
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # measured: 1.4e-6


@torch.no_grad()
def test_transformer_with_residuals_matches_diffusers_except_last_block(main, cn):
    """Block i gets residual i // (4 // 2) in both, but the reference (and we) add one after the last block too,
    diffusers does not. Spread as 4 states [hs0, hs0, hs1, 0] (block i gets state i) ours equals diffusers."""
    x, sigma, y, ctx, cond = inputs()
    hs, t = cn(main, x, sigma, y, cond), sigma * 1000
    out = main(x, t, y, ctx, controlnet_hidden_states=hs)
    expected = run_diffusers(make_diffusers(main), x, t, y, ctx, block_controlnet_hidden_states=hs)
    without_last = main(x, t, y, ctx, controlnet_hidden_states=[hs[0], hs[0], hs[1], torch.zeros_like(hs[1])])
    torch.testing.assert_close(without_last, expected, atol=1e-4, rtol=0)
    assert (out - expected).abs().max() > 1e-2  # the last block's residual: reference behaviour, documented in SPEC §8.4
    assert (out - main(x, t, y, ctx)).abs().max() > 1e-1


def test_official_key_names_match_diffusers_converter():
    """convert_sd3_controlnet_to_diffusers.py (huggingface/diffusers) reads these official names: block qkv split into
    to_q/to_k/to_v, proj -> attn.to_out.0, mlp.fc1/fc2 -> ff.net.0.proj/ff.net.2, adaLN_modulation.1 -> norm1.linear;
    controlnet_blocks, pos_embed_input and time_text_embed keep their names. Renamed the converter's way, our state
    dict loads strictly into SD3ControlNetModel; and the released 8B shapes (SPEC §8.2) give SD35_LARGE_CONTROLNET."""
    renames = {
        "attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm1.linear"
    }  # fmt: skip
    converted = {}
    for key, value in official_state(randomize_(ControlNet(CN_8B), 4)).items():
        m = re.fullmatch(r"(transformer_blocks\.\d+)\.(.+)\.(weight|bias)", key)
        if key == "control_type":
            continue  # not read by the converter; diffusers has no such field
        if m and m[2] == "attn.qkv":
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                converted[f"{m[1]}.attn.{name}.{m[3]}"] = part
        else:
            converted[f"{m[1]}.{renames[m[2]]}.{m[3]}" if m else key] = value
    diffusers_controlnet().load_state_dict(converted, strict=True)

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(SD35_LARGE_CONTROLNET).state_dict().items()}
    assert shapes["transformer_blocks.18.adaLN_modulation.1.weight"] == (14592, 2432)
    assert shapes["transformer_blocks.0.attn.qkv.weight"] == (7296, 2432)
    assert shapes["transformer_blocks.0.mlp.fc1.weight"] == (9728, 2432)
    assert shapes["controlnet_blocks.18.weight"] == (2432, 2432)
    assert shapes["pos_embed_input.proj.weight"] == (2432, 16, 2, 2)
    assert shapes["time_text_embed.text_embedder.linear_1.weight"] == (2432, 2048)
    assert "pos_embed.proj.weight" not in shapes and "transformer_blocks.19.attn.qkv.weight" not in shapes
    assert ControlNetConfig.from_shapes(shapes) == SD35_LARGE_CONTROLNET and SD35_LARGE_CONTROLNET.is_8b
    odd = shapes | {"pos_embed_input.proj.weight": (2400, 16, 2, 2)}  # 2400 = 37.5 heads of 64
    with pytest.raises(CheckpointError, match="cn: hidden size 2400 is not a multiple of 64"):
        ControlNetConfig.from_shapes(odd, source="cn")


# -- reference semantics ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_8b_and_2b_kinds_differ_as_the_reference(main):
    """8B: the transformer's patch embedding + position table as x, raw pooled y, chained blocks. 2B: its own patch
    embedding (pos_embed.proj, no position table), y through the transformer's y_embedder, every block on the same x."""
    x, sigma, y, _, cond = inputs()
    nets = {"8b": randomize_(ControlNet(CN_8B), 5).eval(), "2b": randomize_(ControlNet(CN_2B), 5).eval()}
    assert nets["2b"].pos_embed is not None and nets["8b"].pos_embed is None
    assert "pos_embed.proj.weight" in nets["2b"].state_dict() and "pos_embed.proj.weight" not in nets["8b"].state_dict()
    base = {kind: net(main, x, sigma, y, cond) for kind, net in nets.items()}

    def changed(kind, net, model):
        return [(a - b).abs().max().item() > 1e-3 for a, b in zip(net(model, x, sigma, y, cond), base[kind])]

    other_pos = copy.deepcopy(main)
    other_pos.pos_embed.add_(1.0)
    other_y = copy.deepcopy(main)
    other_y.y_embedder.mlp[2].bias.add_(1.0)
    assert changed("8b", nets["8b"], other_pos) == [True, True] and changed("2b", nets["2b"], other_pos) == [False, False]
    assert changed("8b", nets["8b"], other_y) == [False, False] and changed("2b", nets["2b"], other_y) == [True, True]
    for kind, net in nets.items():  # block 1's residual depends on block 0 only when the blocks are chained
        other = copy.deepcopy(net)
        other.transformer_blocks[0].mlp.fc2.bias.add_(1.0)
        assert changed(kind, other, main) == [True, kind == "8b"]


@torch.no_grad()
def test_batch_scale_and_timestep(main, cn):
    """One control latent serves the batch (the reference repeats it); each row is its own sample; scale multiplies
    every residual; the timestep matters."""
    x, sigma, y, _, cond = inputs(batch=3)
    hs = cn(main, x, sigma, y, cond)
    for a, b in zip(hs, cn(main, x, sigma, y, cond.expand(3, -1, -1, -1))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    single = cn(main, x[1:2], sigma[1:2], y[1:2], cond)
    for a, b in zip(hs, single):
        torch.testing.assert_close(a[1:2], b, atol=1e-5, rtol=0)
    for a, b in zip(hs, cn(main, x, sigma, y, cond, scale=0.5)):
        torch.testing.assert_close(0.5 * a, b, atol=0, rtol=0)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(hs, cn(main, x, sigma + 0.05, y, cond)))
    same = sigma[:1].expand(3)  # one sigma for the batch, given as a scalar (how the sampler steps pass it)
    for a, b in zip(cn(main, x, same, y, cond), cn(main, x, same[0], y, cond)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="control latent must be"):
        cn(main, x, sigma, y, cond[..., :8])
    with pytest.raises(ValueError, match=r"sigma must be \(3,\) and y \(3, \d+\), got \(2,\)"):
        cn(main, x, sigma[:2], y, cond)


@torch.no_grad()
def test_triton_ops_match_reference_ops(main, cn):
    """With a FastMMDiTX the ControlNet's blocks run on the Triton kernels (Triton's interpreter on the CPU)."""
    fast = FastMMDiTX.from_mmditx(copy.deepcopy(main))
    assert kernels.backend("cpu") == "triton-interpreter" and fast.ops(torch.device("cpu")).name == "triton"
    x, sigma, y, _, cond = inputs()
    for a, b in zip(cn(fast, x, sigma, y, cond), cn(main, x, sigma, y, cond)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # measured: 1.9e-6


# -- the control image ----------------------------------------------------------------------------------------------


def test_control_pixels_follow_the_reference():
    """a = pixels / 255; an 8B canny ControlNet gets a*255*0.5 + 0.5, everything else 2a - 1; LANCZOS to the size."""
    values = np.array([[[0, 51, 102], [255, 0, 17]], [[3, 200, 255], [128, 64, 32]]], dtype=np.uint8)
    image = Image.fromarray(values)
    a = torch.from_numpy(values.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    canny_px = control_pixels(image, 2, 2, "canny", is_8b=True)
    torch.testing.assert_close(canny_px, a * 255 * 0.5 + 0.5, atol=0, rtol=0)
    assert canny_px.min() == 0.5 and canny_px.max() == 128.0
    for control_type, is_8b in (("blur", True), ("depth", True), (2, True), ("canny", False), (0, False)):
        torch.testing.assert_close(control_pixels(image, 2, 2, control_type, is_8b), 2 * a - 1, atol=0, rtol=0)
    big = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    resized = np.asarray(big.resize((16, 24), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    expected = 2 * torch.from_numpy(resized).permute(2, 0, 1)[None] - 1
    torch.testing.assert_close(control_pixels(big, 16, 24, "depth"), expected, atol=0, rtol=0)


def test_control_image_from_a_path(tmp_path):
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (8, 8, 3), dtype=np.uint8))
    image.save(tmp_path / "cond.png")
    torch.testing.assert_close(control_pixels(tmp_path / "cond.png", 16, 16, "blur"), control_pixels(image, 16, 16, 0))
    with pytest.raises(FastSD35Error, match="missing.png: cannot read the control image"):
        control_pixels(tmp_path / "missing.png", 16, 16, "blur")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(FastSD35Error, match="text.png: cannot read the control image"):
        preprocess(tmp_path / "text.png", "canny")


@torch.no_grad()
def test_control_latent_is_the_seeded_vae_posterior():
    vae = randomize_(SDVAE(TINY_VAE_CONFIG), 2).eval()
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 40, 3), dtype=np.uint8))

    def gen():
        return torch.Generator().manual_seed(7)

    latent = control_latent(vae, image, 32, 48, "canny", True, gen())
    expected = process_in(vae.encode(control_pixels(image, 32, 48, "canny"), gen()))
    assert latent.shape == (1, 16, 6, 4) and latent.dtype == torch.float32
    torch.testing.assert_close(latent, expected, atol=0, rtol=0)
    assert (latent - control_latent(vae, image, 32, 48, "blur", True, gen())).abs().max() > 1e-2
    mean = process_in(vae.encode(control_pixels(image, 32, 48, 1)))  # no generator: the posterior mean
    torch.testing.assert_close(control_latent(vae, image, 32, 48, 1, True, None), mean)


# -- preprocessing ------------------------------------------------------------------------------------------------


def square_image(value=255, ramp_to=None, size=64, lo=20, hi=44):
    """A square [lo, hi)^2 on black; its value ramps from left to right down to `ramp_to` when given."""
    a = np.zeros((size, size), np.uint8)
    a[lo:hi, lo:hi] = value if ramp_to is None else np.linspace(value, ramp_to, hi - lo).round()
    return Image.fromarray(a)


def edge_mask(image):
    e = np.asarray(image)
    assert image.mode == "RGB" and set(np.unique(e)) <= {0, 255}
    return e[..., 0] > 0


def sides(edges, lo=20, hi=44):
    """Per side of the square (left, right, top, bottom): for each position along it, whether an edge pixel lies on
    either side of the boundary."""
    span = slice(lo, hi)
    return [edges[span, lo - 1] | edges[span, lo], edges[span, hi - 1] | edges[span, hi],
            edges[lo - 1, span] | edges[lo, span], edges[hi - 1, span] | edges[hi, span]]  # fmt: skip


def away_from_border(size=64, lo=20, hi=44):
    far = np.ones((size, size), bool)
    far[lo - 2 : hi + 2, lo - 2 : hi + 2] = False
    far[lo + 2 : hi - 2, lo + 2 : hi - 2] = True
    return far


def test_canny_finds_the_border_of_a_square():
    edges = edge_mask(canny(square_image()))
    assert all(side.all() for side in sides(edges))  # the border is traced all round ...
    assert not edges[away_from_border()].any()  # ... and nothing inside or outside it
    assert edges.sum() <= 4 * 24 + 4  # one pixel wide, not the two-pixel gradient ridge
    assert not edge_mask(canny(square_image(), high=2000)).any()  # no gradient reaches the high threshold
    assert not edge_mask(canny(Image.new("RGB", (32, 32), (90, 90, 90)))).any()


def test_canny_smoothing_is_a_gaussian_of_the_given_sigma():
    """The blur before the gradients: normalised and symmetric, reaching 3 sigma (rounded, at least one pixel) on
    each side, with variance sigma^2 (up to the truncation and the sampling of small sigmas)."""
    from fastsd35.pipeline.control import _gaussian_kernel

    for sigma, radius in ((0.3, 1), (0.6, 2), (1.0, 3), (1.4, 4), (2.5, 8)):
        k = _gaussian_kernel(sigma).double()
        x = torch.arange(len(k), dtype=torch.float64) - (len(k) - 1) / 2
        assert len(k) == 2 * radius + 1 and torch.allclose(k, k.flip(0)) and abs(k.sum().item() - 1) < 1e-6
        if sigma >= 0.6:
            assert abs((k * x**2).sum().item() / sigma**2 - 1) < 0.04, sigma


def test_canny_defaults_and_sigma_range():
    """The documented defaults (thresholds 100 and 200, sigma 1) are the ones used; sigma 0 (no smoothing) and any
    positive sigma are accepted, a negative one refused."""
    image = square_image(80)  # a dim square: its edges pass the default high threshold (200), not 400
    assert np.array_equal(edge_mask(canny(image)), edge_mask(canny(image, low=100.0, high=200.0, sigma=1.0)))
    assert edge_mask(canny(image)).any() and not edge_mask(canny(image, high=400.0)).any()
    photo = Image.fromarray(np.random.RandomState(3).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(blur(photo)), np.asarray(blur(photo, radius=5.0)))  # blur's documented default
    for sigma in (0.0, 0.5):
        canny(image, sigma=sigma)
    with pytest.raises(FastSD35Error, match="canny sigma must be >= 0, got -0.5"):
        canny(image, sigma=-0.5)


def test_canny_hysteresis():
    """A square fading from 255 (left side: gradient ~650) to 50 (right side: ~130): the dim right side is kept when
    it passes `low` and is connected (along the top and bottom) to edges that pass `high`."""
    image = square_image(255, ramp_to=50)
    kept, dropped = (edge_mask(canny(image, low=low, high=300)) for low in (100, 200))
    assert all(side.all() for side in sides(kept)) and not kept[away_from_border()].any()
    assert sides(dropped)[0].all() and not sides(dropped)[1].any()
    assert not edge_mask(canny(square_image(50), low=100, high=300)).any()  # the dim square alone: no strong edge
    assert edge_mask(canny(square_image(50), low=100, high=100)).any()


def test_blur_and_preprocess_options():
    image = Image.fromarray(np.random.RandomState(2).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    blurred = preprocess(image, "blur", radius=3)
    assert np.array_equal(np.asarray(blurred), np.asarray(image.filter(ImageFilter.GaussianBlur(3))))
    stds = [np.asarray(preprocess(image, "blur", radius=r), dtype=np.float32).std() for r in (0, 1, 4)]
    assert stds[0] == np.asarray(image, dtype=np.float32).std() and stds[0] > stds[1] > stds[2]
    assert np.array_equal(np.asarray(preprocess(square_image(), "canny", low=50)), np.asarray(canny(square_image(), 50)))
    with pytest.raises(FastSD35Error, match="DepthFM"):
        preprocess(image, "depth")
    with pytest.raises(FastSD35Error, match="unknown control preprocessing 'pose'"):
        preprocess(image, "pose")
    with pytest.raises(FastSD35Error, match="canny preprocessing has no option radius; its options: low, high, sigma"):
        preprocess(image, "canny", radius=2)
    with pytest.raises(FastSD35Error, match="low <= high"):
        preprocess(image, "canny", low=300, high=200)


# -- loading ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_diffusers_layouts_load_as_the_official_file(main, diffusers_folder, tmp_path):
    """Our own diffusers -> official mapping: the diffusers folder and its weight file give the ControlNet that the
    same weights in the released layout give."""
    x, sigma, y, _, cond = inputs()
    cn = load_controlnet(diffusers_folder, control_type="canny", device="cpu")
    assert cn.control_name == "canny" and cn.source == str(diffusers_folder)
    official = tmp_path / "sd3.5_large_controlnet_canny.safetensors"
    save_file(official_state(cn), str(official))
    expected = load_controlnet(official, device="cpu")(main, x, sigma, y, cond)
    for source in (diffusers_folder, diffusers_folder / "diffusion_pytorch_model.safetensors"):
        loaded = load_controlnet(source, device="cpu", control_type=1)
        assert loaded.control_name == "canny" and loaded.config == CN_8B
        for a, b in zip(loaded(main, x, sigma, y, cond), expected):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="does not record its control type .* pass control_type"):
        load_controlnet(diffusers_folder, device="cpu")
    transformer_folder = tmp_path / "transformer"
    require_diffusers().SD3Transformer2DModel(
        num_layers=1, num_attention_heads=1, joint_attention_dim=48, caption_projection_dim=64, pooled_projection_dim=40,
        pos_embed_max_size=16, sample_size=16).save_pretrained(transformer_folder)  # fmt: skip
    with pytest.raises(CheckpointError, match="not an SD3.5 ControlNet: key 'pos_embed_input.proj.weight' is missing"):
        load_controlnet(transformer_folder, device="cpu")


@torch.no_grad()
def test_official_file_layouts_load_the_same(main, cn, tmp_path):
    x, sigma, y, _, cond = inputs()
    expected = cn(main, x, sigma, y, cond)
    assert cn.control_name == "canny" and cn.source.endswith("sd3.5_large_controlnet_canny.safetensors")
    official = tmp_path / "sd3.5_large_controlnet_canny.safetensors"
    save_file(official_state(cn), str(official))
    pos = {"pos_embed.proj.weight": torch.randn(256, 16, 2, 2), "pos_embed.proj.bias": torch.randn(256)}
    with_unused = tmp_path / "with_unused_x_embedder.safetensors"
    save_file(official_state(cn) | pos, str(with_unused))  # an 8B file's pos_embed.proj is unused by the reference
    for source, control_type in ((official, None), (with_unused, "canny")):
        loaded = load_controlnet(source, device="cpu", control_type=control_type)
        assert loaded.control_name == "canny" and loaded.config == CN_8B
        for a, b in zip(loaded(main, x, sigma, y, cond), expected):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    half = load_controlnet(official, device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.control_type.dtype == torch.int32

    two_b = randomize_(ControlNet(CN_2B), 6)
    two_b.control_type.fill_(2)
    save_file(official_state(two_b), str(tmp_path / "2b.safetensors"))
    loaded = load_controlnet(tmp_path / "2b.safetensors", device="cpu")
    assert loaded.control_name == "depth" and not loaded.config.is_8b
    torch.testing.assert_close(loaded.pos_embed.proj.weight, two_b.pos_embed.proj.weight, atol=0, rtol=0)


def test_loading_errors(cn, tmp_path):
    state = official_state(cn)

    def write(name, tensors):
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    def fails(path, match, **kw):
        with pytest.raises(CheckpointError, match=match) as info:
            load_controlnet(path, device="cpu", **kw)
        assert str(path) in str(info.value)

    fails(tmp_path / "missing.safetensors", "no such file")
    truncated = write("truncated.safetensors", state)
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    fails(truncated, "truncated")
    fails(write("transformer.safetensors", {"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}),
          "no ControlNet weights .* found 1 tensors such as model.diffusion_model.pos_embed")  # fmt: skip
    fails(write("shape.safetensors", state | {"controlnet_blocks.1.weight": torch.zeros(256, 128)}),
          re.escape("wrong shape: controlnet_blocks.1.weight (256, 128) (expected (256, 256))"))  # fmt: skip
    fails(write("missing_key.safetensors", {k: v for k, v in state.items() if k != "controlnet_blocks.1.bias"}),
          "missing: controlnet_blocks.1.bias")  # fmt: skip
    fails(write("no_time.safetensors", {k: v for k, v in state.items() if not k.startswith("time_text_embed.text")}),
          "not an SD3.5 ControlNet: key 'time_text_embed.text_embedder.linear_1.weight' is missing")  # fmt: skip
    fails(write("instantx.safetensors", state | {"context_embedder.weight": torch.zeros(256, 48)}), "InstantX")
    fails(write("bad_type.safetensors", state | {"control_type": torch.tensor([7], dtype=torch.int32)}),
          re.escape("control_type holds [7]"))  # fmt: skip
    fails(write("canny.safetensors", state), "holds a canny ControlNet, but control type depth was asked", control_type="depth")
    with pytest.raises(FastSD35Error, match="unknown control type 'pose'"):
        load_controlnet(tmp_path / "canny.safetensors", control_type="pose")


def test_2b_controlnet_needs_the_transformers_y_embedder():
    """A 2B-kind ControlNet (pooled width = hidden size) embeds the pooled text with the transformer's y_embedder: a
    transformer without one (adm_in_channels None) cannot drive it, though every size matches."""
    with torch.device("meta"):
        plain = MMDiTX(MMDiTXConfig(depth=4, pos_embed_max_size=16, context_dim=48, adm_in_channels=None))
        two_b, eight_b = ControlNet(ControlNetConfig(2, 256, 256)), ControlNet(ControlNetConfig(2, 256, 40))
    assert not two_b.config.is_8b and eight_b.config.is_8b
    with pytest.raises(CheckpointError, match="this 2B-kind ControlNet needs the transformer's y_embedder"):
        check_compatible(two_b, plain)
    with pytest.raises(CheckpointError, match="it takes pooled text of width 40, the transformer None"):
        check_compatible(eight_b, plain)


@torch.no_grad()
def test_incompatible_transformer(main, cn):
    x, sigma, y, _, cond = inputs()
    small = randomize_(MMDiTX(MMDiTXConfig(depth=2, pos_embed_max_size=16, context_dim=48, adm_in_channels=40)), 0)
    message = re.escape(f"{cn.source} (a 2-block ControlNet, hidden size 256) does not fit the custom transformer "
                        "(depth 2, hidden size 128): it was made for a transformer of hidden size 256 (4 heads)")
    with pytest.raises(CheckpointError, match=message):
        check_compatible(cn, small)
    with pytest.raises(CheckpointError, match=message):
        cn(small, x, sigma, y, cond)
    with pytest.raises(CheckpointError, match="its 3 blocks cannot be spread evenly over 4"):
        check_compatible(ControlNet(ControlNetConfig(3, 256, 40)), main)
    with pytest.raises(CheckpointError, match="it takes pooled text of width 48, the transformer 40"):
        check_compatible(ControlNet(ControlNetConfig(2, 256, 48)), main)
    with torch.device("meta"):
        large_cn, medium, large = ControlNet(SD35_LARGE_CONTROLNET), MMDiTX("sd3.5_medium"), MMDiTX("sd3.5_large")
    with pytest.raises(CheckpointError, match=r"sd3.5_medium transformer \(depth 24, hidden size 1536\): it was made for .* 2432"):
        check_compatible(large_cn, medium)
    check_compatible(large_cn, large)


# -- spreading fewer states than blocks ----------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("n", [2, 3])
def test_fewer_states_than_blocks_spread_as_the_reference(n):
    """The released layout gives 19 states to 38 blocks: block i adds state i // (depth // n). On a depth-6 model with
    n = 2 (blocks 0-2 share state 0, 3-5 state 1) and n = 3 (pairs), the result must equal giving every block its own
    state laid out by that rule (block i gets state i with n = depth: pinned against diffusers above), and differ from
    other plausible rules (interleaving i % n, or only the first n blocks)."""
    depth = 6
    config = MMDiTXConfig(depth=depth, pos_embed_max_size=8, context_dim=48, adm_in_channels=40, mlp_ratio=1.0)
    model = randomize_(MMDiTX(config), 5)
    model.eval()
    x, sigma, y, ctx, _ = inputs(batch=1)
    x, y, ctx = x[:, :, :4, :4], y[:, : model.config.adm_in_channels], ctx
    g = torch.Generator().manual_seed(9)
    hs = [torch.randn(1, 4, model.config.hidden_size, generator=g) for _ in range(n)]
    t = sigma * 1000
    out = model(x, t, y, ctx, controlnet_hidden_states=hs)
    by_rule = model(x, t, y, ctx, controlnet_hidden_states=[hs[i // (depth // n)] for i in range(depth)])
    torch.testing.assert_close(out, by_rule, atol=0, rtol=0)
    zero = torch.zeros_like(hs[0])
    for other in ([hs[i % n] for i in range(depth)], [hs[i] if i < n else zero for i in range(depth)]):
        assert (model(x, t, y, ctx, controlnet_hidden_states=other) - out).abs().max() > 1e-3


def test_released_controlnet_spreads_two_blocks_per_state():
    from fastsd35.models.mmditx import CONFIGS

    large = CONFIGS["sd3.5_large"]
    assert SD35_LARGE_CONTROLNET.num_layers == 19 and large.depth == 38
    assert large.depth // SD35_LARGE_CONTROLNET.num_layers == 2
    with torch.device("meta"):
        cn, model = ControlNet(SD35_LARGE_CONTROLNET), MMDiTX(large)
    check_compatible(cn, model)  # 19 over 38 is accepted ...
    with torch.device("meta"):
        odd = ControlNet(ControlNetConfig(num_layers=5, hidden_size=2432, pooled_dim=2048))
    with pytest.raises(CheckpointError, match="cannot be spread evenly over 38"):
        check_compatible(odd, model)  # ... 5 over 38 is not
