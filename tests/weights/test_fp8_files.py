"""FP8 checkpoint files (fastsd35.weights.fp8) written here from tiny official-layout models: each format loads,
dequantized values equal the source within FP8 rounding, loading into FP8 never holds a full-precision copy, and every
malformed file is a CheckpointError naming the file, the key and what was expected."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

from fastsd35 import CheckpointError
from fastsd35.app import cli
from fastsd35.models import fp8 as Q
from fastsd35.models.mmditx import MMDiTXConfig
from fastsd35.weights.checkpoints import load_transformer

from helpers.models import TINY_CONFIGS, inputs, make_model

PREFIX = "model.diffusion_model."
CONFIG = TINY_CONFIGS["sd35_medium"]  # qk-norm and MMDiT-X blocks: every kind of layer
F8 = torch.float8_e4m3fn


def linear_weights(state):
    """The keys a quantizer of the released files turns into FP8: every Linear weight (2-D)."""
    return [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]


def quantized_state(model, fmt, fp8=F8):
    """(file tensors, expected dequantized weights): the Linear weights of a model (or state dict) in FP8 as `fmt`
    stores them."""
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    out, expected = dict(state), {}
    for i, key in enumerate(linear_weights(state)):
        w, layer = state[key], key.removesuffix(".weight")
        if fmt == "legacy" or (fmt == "new" and i % 3 == 0):  # one scale per tensor
            scale = w.abs().max() / torch.finfo(fp8).max
        elif fmt == "new":  # per output channel, as (N,) or (N, 1)
            scale = w.abs().amax(1) / torch.finfo(fp8).max
            scale = scale[:, None] if i % 3 == 1 else scale
        else:  # plain: no scale
            scale = torch.ones(())
        q = (w / (scale if scale.ndim != 1 else scale[:, None])).to(fp8)
        out[key] = q
        expected[key] = q.float() * (scale if scale.ndim != 1 else scale[:, None])
        if fmt == "legacy":
            out[layer + ".scale_weight"] = scale.float()
            if i % 2:
                out[layer + ".scale_input"] = torch.tensor(0.01)
        elif fmt == "new":
            out[layer + ".weight_scale"] = scale.float()
            if i % 2:
                out[layer + ".input_scale"] = torch.tensor([0.01])
    if fmt == "legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out, expected


def write(path, tensors, metadata=None):
    save_file({PREFIX + k: v for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def quant_metadata(tensors):
    layers = {PREFIX + k.removesuffix(".weight_scale"): {"format": "float8_e4m3fn"} for k in tensors if k.endswith(".weight_scale")}
    return {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


@pytest.fixture(scope="module")
def model():
    return make_model(CONFIG)


@pytest.mark.parametrize("fmt", ["legacy", "new", "new+metadata", "plain", "plain_e5m2"])
def test_formats_load_dequantized_and_into_fp8(tmp_path, model, fmt):
    fp8 = torch.float8_e5m2 if fmt == "plain_e5m2" else F8
    tensors, expected = quantized_state(model, fmt.split("+")[0].removesuffix("_e5m2"), fp8)
    path = write(tmp_path / "m.safetensors", tensors, quant_metadata(tensors) if "metadata" in fmt else None)
    source = model.state_dict()

    # Full precision: every FP8 tensor dequantized exactly (q * scale), the rest as stored; within FP8 of the source.
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_transformer(path, dtype=dtype, device="cpu").state_dict()
        assert sorted(loaded) == sorted(source)
        for key, value in loaded.items():
            want = expected.get(key, source[key])
            torch.testing.assert_close(value.float(), want.to(dtype).float(), rtol=0, atol=0)
            rel = 2.0**-3 if fp8 == torch.float8_e5m2 else 2.0**-4
            assert ((value.float() - source[key]).abs() <= rel * source[key].abs() + 1e-2 * source[key].abs().max()).all()

    # FP8: e4m3fn bytes pass through with their scale per channel; others are quantized per channel at load.
    model8 = load_transformer(path, dtype="fp8", device="cpu")
    for name in Q.fp8_layer_names(model8):
        layer, key = model8.get_submodule(name), name + ".weight"
        if fp8 == F8:
            assert torch.equal(layer.weight.view(torch.uint8), tensors[key].view(torch.uint8))
        torch.testing.assert_close(layer.dequantized_weight(), expected[key], rtol=2.0**-4, atol=0)
    for key in ("context_embedder.weight", "final_layer.linear.weight", "t_embedder.mlp.0.weight"):
        torch.testing.assert_close(model8.state_dict()[key], expected[key], rtol=0, atol=0)  # dequantized: not FP8 here
    x, t, y, ctx = inputs(CONFIG)
    with torch.no_grad():
        out, ref = model8(x, t, y, ctx), model(x, t, y, ctx)
    # Measured: 3.6% for e4m3 with scales; plain e4m3 and e5m2 (no scales: small weights in the subnormal range, e5m2's 2
    # mantissa bits, then requantized to e4m3) 5% and 10%.
    assert ((out - ref).norm() / ref.norm()).item() < (0.15 if fp8 == torch.float8_e5m2 else 0.07)


def test_full_precision_matmul_marker(tmp_path, model):
    tensors, _ = quantized_state(model, "legacy")
    tensors["scaled_fp8"] = torch.empty(2, dtype=F8)  # ComfyUI: 2 elements = keep FP8 storage, full-precision GEMMs
    model8 = load_transformer(write(tmp_path / "m.safetensors", tensors), dtype="fp8", device="cpu")
    assert all(not model8.get_submodule(n).fp8_matmul for n in Q.fp8_layer_names(model8))


def test_full_precision_file_quantized_at_load(tmp_path, model):
    path = write(tmp_path / "m.safetensors", {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()})
    model8 = load_transformer(path, dtype="fp8", device="cpu")
    reference = Q.quantize_(load_transformer(path, dtype=torch.float32, device="cpu"))
    for key, value in reference.state_dict().items():
        assert torch.equal(model8.state_dict()[key].float(), value.float()), key


def peak_allocated_bytes(fn, mapped_file):
    """The peak of the bytes the CPU allocator holds while fn runs, above what was held before (torch's profiler
    records every allocation and free). safetensors maps `mapped_file` whole into one storage (a lazy mmap: pages are
    read as tensors are, nothing is copied); that mapping and its release are left out."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    size = mapped_file.stat().st_size
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not size - 2**16 <= abs(event.self_cpu_memory_usage) <= size:
            now += event.self_cpu_memory_usage
            peak = max(peak, now)
    return peak, result


def test_loading_into_fp8_never_holds_a_full_precision_copy(tmp_path):
    # Wide enough that the block Linears are most of the model, as in the released ones.
    config = MMDiTXConfig(depth=6, pos_embed_max_size=4, context_dim=64, adm_in_channels=64, qk_norm="rms")
    model = make_model(config)
    path = write(tmp_path / "m.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    full = Q.weight_bytes(model)
    largest = max(v.numel() * 4 for v in model.state_dict().values())
    del model
    peak, model8 = peak_allocated_bytes(lambda: load_transformer(path, dtype="fp8", device="cpu"), path)
    fp8 = Q.weight_bytes(model8)
    # The FP8 model plus a few single-tensor temporaries (fp32 copy, |x|, x * 448 / amax, the FP8 bytes): measured
    # peak = fp8 + 2 * largest, far from the fp32 model (full) that loading it in full precision first would hold.
    assert fp8 < 0.3 * full
    assert peak < fp8 + 4 * largest < 0.5 * full, (peak, fp8, largest, full)


def test_t5_fp8_files(tmp_path):
    from fastsd35.tiny.family import write_tiny_model
    from fastsd35.weights.text_encoders import load_text_encoders

    folder = write_tiny_model(tmp_path / "models")
    t5_path = folder / "t5xxl_fp16.safetensors"
    from safetensors.torch import load_file

    t5 = load_file(str(t5_path))
    t5_path.unlink()
    for fmt, name in (("plain", "t5xxl_fp8_e4m3fn.safetensors"), ("legacy", "t5xxl_fp8_e4m3fn_scaled.safetensors")):
        tensors, expected = quantized_state(t5, fmt)
        assert any(v.dtype == F8 for v in tensors.values())
        save_file(tensors, str(folder / name))
        text = load_text_encoders(folder, device="cpu", dtype=torch.float32)
        state = text.t5.state_dict()
        for key, value in t5.items():
            torch.testing.assert_close(state[key], expected.get(key, value), rtol=0, atol=0)
        (folder / name).unlink()


def test_controlnet_in_fp8(tmp_path, model):
    from fastsd35.models.mmditx import MMDiTX
    from fastsd35.tiny.family import TINY_MMDITX_CONFIG, randomize_, write_tiny_controlnet
    from fastsd35.weights.controlnet import load_controlnet

    transformer = randomize_(MMDiTX(TINY_MMDITX_CONFIG), 0).eval()
    path = write_tiny_controlnet(tmp_path / "cn.safetensors")
    cn = load_controlnet(path, dtype=torch.float32, device="cpu")
    cn8 = load_controlnet(path, dtype="fp8", device="cpu")
    names = Q.fp8_layer_names(cn8)
    assert {"transformer_blocks.0.attn.qkv", "transformer_blocks.0.attn.proj", "transformer_blocks.0.mlp.fc1",
            "transformer_blocks.0.mlp.fc2", "transformer_blocks.0.adaLN_modulation.1"} == set(names)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    y = torch.randn(2, TINY_MMDITX_CONFIG.adm_in_channels, generator=g)
    cond = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        a = torch.cat([r.flatten() for r in cn(transformer, x, torch.tensor([0.5, 0.9]), y, cond)])
        b = torch.cat([r.flatten() for r in cn8(transformer, x, torch.tensor([0.5, 0.9]), y, cond)])
    assert 1e-4 < ((a - b).norm() / a.norm()).item() < 0.06


# -- malformed files ------------------------------------------------------------------------------------------------

QKV = "joint_blocks.0.x_block.attn.qkv"


def legacy(model, **changes):
    tensors, _ = quantized_state(model, "legacy")
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


def new(model, **changes):
    tensors, _ = quantized_state(model, "new")
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


BAD = {
    "legacy scale not a single value": (
        lambda m: legacy(m, **{f"{QKV}__scale_weight": torch.ones(2)}), f"{QKV}.scale_weight", "expected a single value"),
    "per-channel scale of the wrong length": (
        lambda m: new(m, **{f"{QKV}__weight_scale": torch.ones(5)}), f"{QKV}.weight_scale", "one per output channel"),
    "FP8 weight without its scale (legacy)": (
        lambda m: legacy(m, **{f"{QKV}__scale_weight": None}), f"{QKV}.weight", f"expected '{QKV}.scale_weight'"),
    "FP8 weight without its scale (new)": (
        lambda m: new(m, **{f"{QKV}__weight_scale": None}), f"{QKV}.weight", f"expected '{QKV}.weight_scale'"),
    "unknown FP8 type": (
        lambda m: legacy(m, **{f"{QKV}__weight": m.state_dict()[f"{QKV}.weight"].to(torch.float8_e4m3fnuz)}),
        f"{QKV}.weight", "unknown FP8 type F8_E4M3FNUZ"),
    "marker of a non-FP8 dtype": (lambda m: legacy(m, scaled_fp8=torch.empty(0, dtype=torch.float16)), "scaled_fp8",
                                  "expected float8_e4m3fn, float8_e5m2 or float32"),
    "weights of another FP8 type than the marker": (
        lambda m: legacy(m, **{f"{QKV}__weight": m.state_dict()[f"{QKV}.weight"].to(torch.float8_e5m2)}),
        f"{QKV}.weight", "the 'scaled_fp8' marker says F8_E4M3"),
    "scale for a missing weight": (lambda m: legacy(m, **{"joint_blocks.0.x_block.attn.nothing__scale_weight": torch.tensor(1.0)}),
                                   "nothing.scale_weight", "which the file does not have"),
    "scale for a full-precision weight": (lambda m: legacy(m, **{f"{QKV}__weight": m.state_dict()[f"{QKV}.weight"]}),
                                          f"{QKV}.scale_weight", "expected an FP8 weight"),
    "two scales for one weight": (lambda m: legacy(m, **{f"{QKV}__weight_scale": torch.tensor(1.0)}), QKV,
                                  "a second scale"),
    "input scale of several values": (lambda m: new(m, **{f"{QKV}__input_scale": torch.ones(3)}),
                                      f"{QKV}.input_scale", "expected a single value"),
    "non-finite scale": (lambda m: legacy(m, **{f"{QKV}__scale_weight": torch.tensor(float("nan"))}),
                         f"{QKV}.scale_weight", "non-finite"),
    "negative scale": (lambda m: new(m, **{f"{QKV}__weight_scale": -torch.ones(m.state_dict()[f'{QKV}.weight'].shape[0])}),
                       f"{QKV}.weight_scale", "expected finite values >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("dtype", ["fp8", torch.float32])
def test_malformed_files(tmp_path, model, case, dtype):
    make, key, expected = BAD[case]
    path = write(tmp_path / "bad.safetensors", make(model))
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, dtype=dtype, device="cpu")
    message = str(err.value)
    assert str(path) in message and key in message and expected in message, message


def test_unknown_fp8_type_in_the_header(tmp_path, model):
    tensors, _ = quantized_state(model, "plain")
    path = write(tmp_path / "bad.safetensors", tensors)
    raw = bytearray(path.read_bytes())  # safetensors writes F8_E8M0 but torch cannot load it: forge the header
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode().replace('"F8_E4M3"', '"F8_E8M0"', 1)
    path.write_bytes(raw[:8] + header.encode() + raw[8 + n :])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: '.*': unknown FP8 type F8_E8M0; expected F8_E4M3"):
        load_transformer(path, dtype="fp8", device="cpu")


@pytest.mark.parametrize("metadata, expected", [
    ("not json", "is not JSON"),
    (json.dumps({"layers": {PREFIX + QKV: {"format": "int8_blockwise"}}}), "format 'int8_blockwise'"),
    (json.dumps({"layers": {PREFIX + "joint_blocks.0.x_block.attn.proj": {"format": "float8_e4m3fn"}}}), None),
])
def test_malformed_quantization_metadata(tmp_path, model, metadata, expected):
    tensors, _ = quantized_state(model, "new")
    del tensors["joint_blocks.0.x_block.attn.proj.weight_scale"]  # a listed layer without its scale
    tensors["joint_blocks.0.x_block.attn.proj.weight"] = model.state_dict()["joint_blocks.0.x_block.attn.proj.weight"]
    path = write(tmp_path / "bad.safetensors", tensors, {"_quantization_metadata": metadata})
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, dtype="fp8", device="cpu")
    assert str(path) in str(err.value) and (expected or "has no 'model.diffusion_model.joint_blocks.0.x_block.attn.proj."
                                                      "weight_scale'") in str(err.value), str(err.value)


def test_cli_reports_a_malformed_fp8_file_in_one_line(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = write(tmp_path / "bad.safetensors", legacy(model, **{f"{QKV}__scale_weight": None}))
    code = cli.main(["run", "--preset", "tiny_random", "--model", str(path), "--prompt", "a", "--dtype", "fp8",
                     "--out", str(tmp_path / "out"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{QKV}.weight" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
