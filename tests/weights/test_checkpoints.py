"""Loading transformers from official single files, bare files and diffusers folders; every CheckpointError."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastsd35 import CheckpointError
from fastsd35.weights.checkpoints import load_transformer, safetensors_header

from helpers.models import TINY_CONFIGS, inputs, make_diffusers, make_model

PREFIX = "model.diffusion_model."


def official_file(tmp_path, model, name="sd3_tiny.safetensors", extra=True):
    sd = {PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    if extra:  # a real single file also holds the VAE and maybe text encoders: ignored here
        sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
        sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def same_outputs(a, b):
    x, t, y, ctx = inputs(a.config)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y, ctx), b(x, t, y, ctx), atol=0, rtol=0)


def test_official_single_file(tmp_path, tiny_config):
    model = make_model(tiny_config)
    loaded = load_transformer(official_file(tmp_path, model), device="cpu")
    assert loaded.config == tiny_config and loaded.config.variant == "custom"
    assert loaded.dtype == torch.float32 and loaded._adaln_is_fused()
    assert not any(p.requires_grad for p in loaded.parameters())
    same_outputs(model, loaded)


def test_bare_file_and_dtype(tmp_path):
    model = make_model(TINY_CONFIGS["sd35_large"])
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    same_outputs(model, load_transformer(path, device="cpu"))
    half = load_transformer(path, device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half._adaln_is_fused()


@pytest.mark.parametrize("shard", [False, True])
def test_diffusers_folder_round_trip(tmp_path, tiny_config, shard):
    """Our own diffusers->official mapping inverts diffusers' converter: identical outputs, with or without shards,
    from the pipeline folder or its transformer/ subfolder."""
    model = make_model(tiny_config)
    ref = make_diffusers(model)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="200KB" if shard else "10GB")
    has_index = (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert has_index == shard
    for path in (tmp_path, tmp_path / "transformer"):
        same_outputs(model, load_transformer(path, device="cpu"))


# -- errors ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or folder"):
        load_transformer(tmp_path / "nope.safetensors", device="cpu")


def test_pickle_is_refused_without_loading(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: this is a PyTorch pickle checkpoint.*only reads \.safetensors"):
        load_transformer(path, device="cpu")


def test_garbage_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        load_transformer(path, device="cpu")


def test_truncated_file(tmp_path):
    path = official_file(tmp_path, make_model(TINY_CONFIGS["sd3"]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"sd3_tiny\.safetensors: truncated: its header describes {len(data)} bytes but the file has {len(data) - 1000}"):
        load_transformer(path, device="cpu")
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated: the header alone needs"):
        safetensors_header(path)


def test_file_without_transformer(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: no transformer weights \(expected keys 'model\.diffusion_model\.\*'\); found 1 tensors such as first_stage_model"):
        load_transformer(path, device="cpu")
    # a file of many tensors: the count, and the first three names in order as examples
    save_file({f"cond_stage_model.{c}.weight": torch.zeros(1) for c in "edcba"}, str(path))
    with pytest.raises(CheckpointError, match=r"found 5 tensors such as cond_stage_model\.a\.weight, "
                                              r"cond_stage_model\.b\.weight, cond_stage_model\.c\.weight$"):
        load_transformer(path, device="cpu")


def edited_file(tmp_path, edit):
    model = make_model(TINY_CONFIGS["sd35_large"])
    sd = {PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    edit(sd)
    path = tmp_path / "edited.safetensors"
    save_file(sd, str(path))
    return path


def test_missing_key(tmp_path):
    path = edited_file(tmp_path, lambda sd: sd.pop(PREFIX + "joint_blocks.1.x_block.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: weights do not match the model .*missing: joint_blocks\.1\.x_block\.mlp\.fc2\.bias"):
        load_transformer(path, device="cpu")


def test_unexpected_key(tmp_path):
    path = edited_file(tmp_path, lambda sd: sd.update({PREFIX + "joint_blocks.0.x_block.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: .*unexpected: joint_blocks\.0\.x_block\.extra\.weight"):
        load_transformer(path, device="cpu")


def test_wrong_shape(tmp_path):
    path = edited_file(tmp_path, lambda sd: sd.update({PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: joint_blocks\.0\.x_block\.attn\.ln_q\.weight \(32,\) \(expected \(64,\)\)"):
        load_transformer(path, device="cpu")


def test_diffusers_folder_errors(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights found \(diffusion_pytorch_model\.bin\)"):
        load_transformer(tmp_path, device="cpu")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"proj_out.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model-00001-of-00002\.safetensors: shard listed in .* is missing"):
        load_transformer(tmp_path, device="cpu")


def test_diffusers_folder_with_keys_of_another_model_is_refused(tmp_path):
    """A diffusers transformer folder whose file holds tensors no SD3/SD3.5 transformer has (another model's
    transformer, or a merge gone wrong) is refused naming the first four, not loaded with them dropped."""
    from safetensors.torch import load_file

    make_diffusers(make_model(TINY_CONFIGS["sd3"])).save_pretrained(tmp_path / "transformer", safe_serialization=True)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    load_transformer(tmp_path, device="cpu")  # as saved: loads
    extra = {f"single_transformer_blocks.{i}.proj_mlp.weight": torch.zeros(2, 2) for i in range(5)}
    save_file({**tensors, **extra}, str(weights))
    with pytest.raises(CheckpointError, match=r"transformer: unexpected diffusers keys single_transformer_blocks\.0\.proj_mlp"
                                              r"\.weight, .* \.\.\.: not an SD3/SD3\.5 transformer"):
        load_transformer(tmp_path, device="cpu")


def test_a_closed_source_reopens_its_files(tmp_path):
    """TensorSource.close() releases the files it had open; reading again afterwards opens them anew."""
    from fastsd35.weights.checkpoints import TensorSource

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path))
    source = TensorSource.from_file(path)
    first = source.get("a")
    source.close()
    assert torch.equal(source.get("a"), first)
    source.close()


def test_folder_that_is_not_diffusers(tmp_path):
    (tmp_path / "clip_l.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a diffusers model folder .* found: clip_l\.safetensors"):
        load_transformer(tmp_path, device="cpu")


def test_find_model_files(tmp_path):
    from fastsd35.pipeline.presets import get_preset
    from fastsd35.weights.checkpoints import find_model_files

    large = get_preset("large")
    (tmp_path / "sd3.5_large.safetensors").write_bytes(b"")
    files = find_model_files(tmp_path, large)
    assert files.transformer == files.vae == files.text_encoders == tmp_path / "sd3.5_large.safetensors"
    with pytest.raises(CheckpointError, match=r"no checkpoint for preset 'large_turbo': expected sd3\.5_large_turbo\.safetensors; found sd3\.5_large\.safetensors"):
        find_model_files(tmp_path, get_preset("large_turbo"))
    with pytest.raises(CheckpointError, match=r"models: no such file or folder; expected a folder with sd3\.5_large\.safetensors \(and clip_g"):
        find_model_files(tmp_path / "models", large)
    (tmp_path / "diffusers" / "transformer").mkdir(parents=True)
    assert find_model_files(tmp_path / "diffusers", large).transformer == tmp_path / "diffusers"


@pytest.mark.parametrize("length", [0x180, 0x4B50], ids=["0x80", "PK"])
def test_header_length_that_looks_like_a_pickle_magic(tmp_path, length):
    # The 8-byte header length is little-endian: 1 valid file in 256 starts with 0x80 (a pickle's first byte), and a
    # 19280-byte header starts with "PK" (a zip's). They are safetensors files all the same.
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": ""})
    pad = length - int.from_bytes(path.read_bytes()[:8], "little")
    for extra in range(pad - 8, pad + 1):
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "x" * extra})
        if int.from_bytes(path.read_bytes()[:8], "little") == length:
            break
    assert int.from_bytes(path.read_bytes()[:8], "little") == length
    assert list(safetensors_header(path)) == ["w"]


def test_truncated_by_a_few_bytes_at_every_boundary(tmp_path):
    """Cut at the boundaries where an off-by-one would hide: the last byte of the data, the last few, the header's
    last byte, inside the 8-byte length; each is a CheckpointError naming the file, never a load of short data."""
    path = official_file(tmp_path, make_model(TINY_CONFIGS["sd3"]))
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for keep in (len(data) - 1, len(data) - 7, header_end, header_end - 1, 9, 5, 0):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"sd3_tiny\.safetensors: "):
            safetensors_header(path)
    path.write_bytes(data)
    assert safetensors_header(path)  # the whole file is fine


def test_diffusers_qkv_parts_are_stacked_q_k_v_whatever_the_key_order():
    """Each block's q, k and v (and the context stream's) go into qkv in that order by their role, not by the order
    the keys arrive in: a state dict listed backwards gives the same official tensors."""
    from fastsd35.weights.checkpoints import DiffusersTransformerSource

    model = make_model(TINY_CONFIGS["sd35_medium"])
    backwards = dict(reversed(list(make_diffusers(model).state_dict().items())))
    source = DiffusersTransformerSource.from_state_dict(backwards)
    official = model.state_dict()
    for key in ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.bias",
                "joint_blocks.0.x_block.attn2.qkv.weight"):
        assert torch.equal(source.get(key), official[key]), key
