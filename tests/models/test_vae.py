"""SDVAE against diffusers' AutoencoderKL (weights converted by diffusers' own converter); loading; image conversion."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers.diffusers_ref import require_diffusers
from helpers.models import diffusers_vae_config, make_diffusers_vae as make_diffusers, make_vae

from fastsd35 import CheckpointError
from fastsd35.models.vae import LATENT_SCALE, LATENT_SHIFT, SDVAE, VAEConfig, image_to_tensor, process_in, process_out, tensor_to_images
from fastsd35.tiny.family import TINY_VAE_CONFIG
from fastsd35.weights.vae import load_vae


def inputs(seed=1, batch=2, h=32, w=40):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    latent = torch.randn(batch, 16, h // 8, w // 8, generator=g)
    return image, latent


@pytest.fixture(scope="module")
def vae():
    return make_vae()


@pytest.fixture(scope="module")
def pair(vae):
    return vae, make_diffusers(vae)


def test_decode_matches_diffusers(pair):
    vae, ref = pair
    _, latent = inputs()
    out = vae.decode(latent)
    expected = ref.decode(latent).sample
    assert out.shape == (2, 3, 32, 40)
    assert expected.std() > 0.3  # outputs of order 1: the bound is meaningful
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_encode_mean_and_sample_match_diffusers(pair):
    vae, ref = pair
    image, _ = inputs()
    dist = ref.encode(image).latent_dist
    mean = vae.encode(image)
    assert mean.shape == (2, 16, 4, 5) and dist.mean.std() > 0.3
    torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
    sample = vae.encode(image, torch.Generator().manual_seed(7))
    expected = dist.sample(generator=torch.Generator().manual_seed(7))  # the same CPU float32 noise
    assert (expected - dist.mean).abs().max() > 0.1  # the noise term is not negligible
    torch.testing.assert_close(sample, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_seeded_sampling(vae):
    image, _ = inputs()
    a = vae.encode(image, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, vae.encode(image, torch.Generator().manual_seed(3)), atol=0, rtol=0)
    assert (a - vae.encode(image, torch.Generator().manual_seed(4))).abs().max() > 0.1


def test_full_size_layout_matches_diffusers():
    """The default config is the SD3 VAE: our keys, converted by diffusers' converter, are exactly AutoencoderKL's
    keys and shapes for the SD3.5 `vae/config.json` values; and the config is recovered from the shapes."""
    diffusers = require_diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = SDVAE.empty(VAEConfig(), device="meta")
    cfg = diffusers_vae_config(vae.config)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**cfg)
    ours = {k: tuple(v.shape) for k, v in convert_ldm_vae_checkpoint(vae.state_dict(), cfg).items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert VAEConfig.from_shapes(shapes) == VAEConfig()
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3) and shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert len(vae.decoder.up[3].block) == 3 and vae.decoder.up[0].upsample is None
    # eps is too small to show in the random-weight parity tests: check it here
    assert {(m.num_groups, m.eps) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)} == {(32, 1e-6)}


def test_input_dtype_and_shape_checks(vae):
    half = make_vae().to(torch.bfloat16)
    image, latent = inputs(batch=1, h=16, w=16)
    with torch.no_grad():
        assert half.encode(image).dtype == torch.bfloat16
        assert half.encode(image, torch.Generator().manual_seed(0)).dtype == torch.bfloat16
        out = half.decode(latent)  # float32 input is cast
        assert out.dtype == torch.bfloat16
        assert (out.float() - vae.decode(latent)).abs().max() < 0.2
    with pytest.raises(ValueError, match=r"latent must be \(B, 16, H, W\), got \(1, 4, 2, 2\)"):
        vae.decode(latent[:, :4])
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        vae.encode(image[0])


# -- latent format and images ------------------------------------------------------------------------------------


def test_latent_format():
    assert (LATENT_SCALE, LATENT_SHIFT) == (1.5305, 0.0609)
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(process_in(z), (z - 0.0609) * 1.5305, atol=0, rtol=0)
    torch.testing.assert_close(process_out(process_in(z)), z, atol=1e-6, rtol=0)


def test_tensor_to_images_truncates():
    # 254.9 and 0.99 must truncate to 254 and 0 (diffusers would round to 255 and 1); out-of-range values clamp
    values = torch.tensor([254.9, 0.99, 128.0, 300.0, -20.0]) / 255 * 2 - 1
    x = values.view(1, 1, 1, 5).expand(2, 3, 1, 5).contiguous()
    images = tensor_to_images(x)
    assert len(images) == 2 and images[1].mode == "RGB" and images[1].size == (5, 1)
    assert np.asarray(images[1])[0, :, 0].tolist() == [254, 0, 128, 255, 0]
    assert np.asarray(tensor_to_images(x.to(torch.bfloat16))[0]).dtype == np.uint8  # any float dtype


def test_image_to_tensor_range_and_resize():
    pixels = np.zeros((12, 20, 3), dtype=np.uint8)
    pixels[:, 10:] = 255
    pixels[0, 0] = (51, 102, 204)
    image = Image.fromarray(pixels)
    x = image_to_tensor(image)
    assert x.shape == (1, 3, 12, 20) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([51, 102, 204]) / 255 * 2 - 1)
    assert image_to_tensor(image.convert("L")).shape == (1, 3, 12, 20)  # any mode -> RGB
    resized = image_to_tensor(image, width=16, height=8)
    assert resized.shape == (1, 3, 8, 16)
    expected = np.asarray(image.resize((16, 8), Image.Resampling.LANCZOS), dtype=np.float32) / 255 * 2 - 1
    torch.testing.assert_close(resized[0].permute(1, 2, 0), torch.from_numpy(expected))
    torch.testing.assert_close(image_to_tensor(image, width=20, height=12), x, atol=0, rtol=0)


# -- loading -----------------------------------------------------------------------------------------------------


def save(tmp_path, name, tensors):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def same_outputs(a: SDVAE, b: SDVAE):
    image, latent = inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(a.decode(latent), b.decode(latent), atol=0, rtol=0)
        torch.testing.assert_close(a.encode(image), b.encode(image), atol=0, rtol=0)


def test_official_single_file(tmp_path):
    vae = make_vae()
    sd = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.randn(64, 16, 2, 2)  # the transformer: ignored
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    loaded = load_vae(save(tmp_path, "sd3_tiny.safetensors", sd), device="cpu")
    assert loaded.config == TINY_VAE_CONFIG and loaded.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.parameters())
    same_outputs(vae, loaded)


def test_bare_file_and_dtype(tmp_path):
    vae = make_vae()
    sd = dict(vae.state_dict(), **{"loss.discriminator.main.0.weight": torch.ones(4)})  # training-only: ignored
    path = save(tmp_path, "sd3_vae.safetensors", sd)
    same_outputs(vae, load_vae(path, device="cpu"))
    half = load_vae(path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_diffusers_folder_round_trip(tmp_path):
    """Our own diffusers->official mapping inverts diffusers' converter: identical outputs from the pipeline folder,
    its vae/ folder, and the diffusers weight file itself."""
    vae = make_vae()
    make_diffusers(vae).save_pretrained(tmp_path / "vae", safe_serialization=True)
    (tmp_path / "transformer").mkdir()
    for path in (tmp_path, tmp_path / "vae", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        loaded = load_vae(path, device="cpu")
        assert loaded.config == TINY_VAE_CONFIG
        same_outputs(vae, loaded)


def test_error_missing_and_not_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or folder; expected .* VAE"):
        load_vae(tmp_path / "nope.safetensors", device="cpu")
    torch.save({"encoder.conv_in.weight": torch.ones(2)}, tmp_path / "vae.ckpt")
    with pytest.raises(CheckpointError, match=r"vae\.ckpt: this is a PyTorch pickle checkpoint"):
        load_vae(tmp_path / "vae.ckpt", device="cpu")
    (tmp_path / "vae.safetensors").write_text("hello, I am text")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: not a safetensors file"):
        load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_error_truncated(tmp_path):
    path = save(tmp_path, "sd3_vae.safetensors", make_vae().state_dict())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"sd3_vae\.safetensors: truncated: its header describes {len(data)} bytes"):
        load_vae(path, device="cpu")


def test_error_no_vae_weights(tmp_path):
    path = save(tmp_path, "transformer.safetensors", {"model.diffusion_model.x_embedder.proj.weight": torch.ones(2)})
    with pytest.raises(
        CheckpointError,
        match=r"transformer\.safetensors: no VAE weights \(expected keys 'first_stage_model\.\*'.*\); "
        r"found 1 tensors such as model\.diffusion_model\.x_embedder",
    ):
        load_vae(path, device="cpu")


def edited(tmp_path, vae, change):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    change(sd)
    return save(tmp_path, "edited.safetensors", sd)


def test_error_missing_unexpected_wrong_shape(tmp_path, vae):
    path = edited(tmp_path, vae, lambda sd: sd.pop("decoder.up.2.block.1.conv2.bias"))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: weights do not match .*missing: decoder\.up\.2\.block\.1\.conv2\.bias"):
        load_vae(path, device="cpu")
    path = edited(tmp_path, vae, lambda sd: sd.update({"encoder.down.0.attn.0.q.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: .*unexpected: encoder\.down\.0\.attn\.0\.q\.weight"):
        load_vae(path, device="cpu")
    path = edited(tmp_path, vae, lambda sd: sd.update({"decoder.mid.attn_1.q.weight": torch.ones(64, 64)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: decoder\.mid\.attn_1\.q\.weight \(64, 64\) \(expected \(64, 64, 1, 1\)\)"):
        load_vae(path, device="cpu")
    path = edited(tmp_path, vae, lambda sd: sd.pop("decoder.conv_in.weight"))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: not an SD3 VAE: key 'decoder\.conv_in\.weight' is missing"):
        load_vae(path, device="cpu")


def test_error_diffusers_folders(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a diffusers model folder \(expected vae/ .*found: model_index\.json, transformer"):
        load_vae(tmp_path, device="cpu")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"only pickle weights found \(diffusion_pytorch_model\.bin\)"):
        load_vae(tmp_path, device="cpu")
    sdxl_like = dict(make_diffusers(make_vae()).state_dict(), **{"quant_conv.weight": torch.ones(32, 32, 1, 1)})
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").unlink()
    save(tmp_path / "vae", "diffusion_pytorch_model.safetensors", sdxl_like)
    with pytest.raises(CheckpointError, match=r"vae: weights do not match the model: unexpected: quant_conv\.weight"):
        load_vae(tmp_path, device="cpu")
