"""LoRA files (diffusers/PEFT and kohya/ComfyUI layouts) fused into the transformer: the fused weights follow
W + scale * (alpha / rank) * up @ down, the tiny pipeline with a LoRA equals diffusers' load_lora_weights + fuse_lora,
the CLI records the LoRA and --from-png honours it, and every bad input is one line, exit 2, nothing written."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fastsd35.pipeline.runner
import fastsd35.pipeline.sampling
from fastsd35 import FastSD35Error
from fastsd35.app.outputs import METADATA_KEY
from fastsd35.pipeline.runner import Pipeline
from fastsd35.weights.lora import fuse_lora, lora_layers, parse_lora_arg

from helpers.cli import FAST, fails, run
from helpers.diffusers_ref import require_diffusers
from helpers.models import TINY_CONFIGS, inputs, make_diffusers, make_model
from helpers.pipelines import SMALL, diffusers_pipeline, pixels

# diffusers module -> official weight (and which third of qkv): the diffusers names the test LoRAs touch
DIFFUSERS_MODULES = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_v",
    "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.norm1.linear",
    "transformer_blocks.1.norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder",
]  # fmt: skip
KOHYA_MODULES = [
    "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj", "joint_blocks.1.x_block.mlp.fc2",
    "joint_blocks.1.context_block.adaLN_modulation.1", "joint_blocks.0.x_block.attn2.qkv", "final_layer.linear",
    "t_embedder.mlp.2", "x_embedder.proj",
]  # fmt: skip


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def low_rank(shape, rank, g):
    """(down, up) for a weight of `shape` (a Linear's or a Conv2d's)."""
    down = 0.2 * torch.randn(rank, *shape[1:], generator=g)
    up = 0.2 * torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g)
    return down, up


def write_diffusers_lora(path, diffusers_model, modules=DIFFUSERS_MODULES, rank=4, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = dict(diffusers_model.named_parameters())
    tensors = {}
    for m in modules:
        down, up = low_rank(weights[f"{m}.weight"].shape, rank, g)
        tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"] = down, up
        if alpha is not None:
            tensors[f"transformer.{m}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return tensors


def kohya_name(module):
    return "lora_unet_" + module.replace(".", "_")


def write_kohya_lora(path, model, modules=KOHYA_MODULES, rank=4, alpha=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = model.state_dict()
    tensors = {}
    for m in modules:
        down, up = low_rank(weights[f"{m}.weight"].shape, rank, g)
        name = kohya_name(m)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return tensors


def delta(down, up, factor):
    return factor * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


# -- the fused weights -------------------------------------------------------------------------------------------


def test_kohya_fused_weights(tmp_path):
    model = make_model(TINY_CONFIGS["sd35_medium"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = write_kohya_lora(tmp_path / "k.safetensors", model, rank=4, alpha=2.0)
    assert fuse_lora(model, tmp_path / "k.safetensors", scale=0.7) == len(KOHYA_MODULES)
    after = model.state_dict()
    for m in KOHYA_MODULES:
        name = kohya_name(m)
        expected = before[f"{m}.weight"] + delta(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                                                 0.7 * 2.0 / 4)  # fmt: skip
        torch.testing.assert_close(after[f"{m}.weight"], expected, atol=1e-6, rtol=0)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{m}.weight" for m in KOHYA_MODULES}
    # the adaLN weights are views of the fused matrix that `modulations` multiplies by
    assert model._adaln_is_fused()
    lin = model.joint_blocks[1].context_block.adaLN_modulation[1]
    c = torch.randn(2, model.config.hidden_size)
    mods = model.modulations(c)[0][1][0]
    torch.testing.assert_close(mods.flatten(1), torch.nn.functional.linear(torch.nn.functional.silu(c), lin.weight, lin.bias))


def test_diffusers_layout_fused_weights(tmp_path):
    """q/k/v land in their thirds of qkv; the last context block's and the final layer's adaLN halves are swapped."""
    model = make_model(TINY_CONFIGS["sd3"])  # depth 2: block 1 is the last
    ref = make_diffusers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [m for m in DIFFUSERS_MODULES if "attn2" not in m]  # no dual attention in this config
    tensors = write_diffusers_lora(tmp_path / "d.safetensors", ref, modules, rank=3, alpha=6.0)
    fuse_lora(model, tmp_path / "d.safetensors", scale=0.5)
    after = model.state_dict()
    D = model.config.hidden_size

    def d(m):
        return delta(tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"], 0.5 * 6 / 3)

    def swapped(t):
        return torch.cat(t.chunk(2)[::-1])

    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    expected = before[qkv] + torch.cat([d(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"])
    torch.testing.assert_close(after[qkv], expected, atol=1e-6, rtol=0)
    ctx_qkv = "joint_blocks.0.context_block.attn.qkv.weight"
    expected = before[ctx_qkv].clone()
    expected[D : 2 * D] += d("transformer_blocks.0.attn.add_k_proj")
    torch.testing.assert_close(after[ctx_qkv], expected, atol=1e-6, rtol=0)
    for m, official, swap in (
        ("transformer_blocks.1.norm1_context.linear", "joint_blocks.1.context_block.adaLN_modulation.1", True),
        ("transformer_blocks.1.norm1.linear", "joint_blocks.1.x_block.adaLN_modulation.1", False),
        ("norm_out.linear", "final_layer.adaLN_modulation.1", True),
        ("proj_out", "final_layer.linear", False),
    ):
        want = before[f"{official}.weight"] + (swapped(d(m)) if swap else d(m))
        torch.testing.assert_close(after[f"{official}.weight"], want, atol=1e-6, rtol=0)


@pytest.fixture
def tiny():
    return Pipeline.from_preset("tiny_random", device="cpu")


def test_pipeline_with_lora_equals_diffusers_fuse_lora(tiny, tmp_path, monkeypatch):
    """diffusers' load_lora_weights + fuse_lora (PEFT) on the same tiny pipeline is the independent reference; the
    kohya file holding the same update (q/k/v as one rank-3r qkv layer) gives the same weights."""
    monkeypatch.setattr(fastsd35.pipeline.sampling, "model_sigma", lambda sigma: sigma)  # diffusers' fp32 timesteps
    monkeypatch.setattr(fastsd35.pipeline.runner, "model_timestep", lambda sigma: sigma * 1000)
    reference = diffusers_pipeline(tiny)
    path = tmp_path / "style.safetensors"
    tensors = write_diffusers_lora(path, reference.transformer, rank=4)
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=0.8)
    tiny.load_lora(path, scale=0.8)
    assert [(f.path, f.scale, f.sha256) for f in tiny.loras] == [(path, 0.8, hashlib.sha256(path.read_bytes()).hexdigest())]
    ours = pixels(tiny.generate("a red cube", "blurry", seed=5, sampler="euler", cfg=4.5, **SMALL).images)
    latents = fastsd35.pipeline.sampling.initial_latent(torch.tensor(1.0), fastsd35.pipeline.sampling.make_noise(5, 1, (16, 6, 8)))
    with torch.no_grad():
        ref = reference("a red cube", negative_prompt="blurry", num_inference_steps=4, guidance_scale=4.5, height=48,
                        width=64, latents=latents, max_sequence_length=77, output_type="np").images
    ref = (np.clip(ref, 0, 1) * 255).astype(np.int16)  # truncated like ours
    assert np.abs(ours - ref).max() <= 1 and ours.std() > 10
    without = pixels(diffusers_pipeline(Pipeline.from_preset("tiny_random", device="cpu"))(
        "a red cube", negative_prompt="blurry", num_inference_steps=4, guidance_scale=4.5, height=48, width=64,
        latents=latents, max_sequence_length=77, output_type="pil").images)
    assert np.abs(without - ours).max() > 5  # the LoRA changed the image

    # The same update in the kohya layout: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v).
    kohya = {}
    for block, proj in ((0, "x_block.attn.qkv"), (0, "x_block.attn2.qkv")):
        attn = "attn2" if "attn2" in proj else "attn"
        parts = [f"transformer.transformer_blocks.{block}.{attn}.to_{p}" for p in "qkv"]
        downs = [tensors.get(f"{p}.lora_A.weight", torch.zeros(4, 128)) for p in parts]
        ups = [tensors.get(f"{p}.lora_B.weight", torch.zeros(128, 4)) for p in parts]
        name = kohya_name(f"joint_blocks.{block}.{proj}")
        kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = torch.cat(downs), torch.block_diag(*ups)
        kohya[f"{name}.alpha"] = torch.tensor(12.0)  # rank 12: factor 1
    save_file(kohya, tmp_path / "kohya.safetensors")
    a, b = (Pipeline.from_preset("tiny_random", device="cpu").transformer for _ in range(2))
    fuse_lora(a, tmp_path / "kohya.safetensors", 0.8)
    subset = {k: v for k, v in tensors.items() if re.search(r"\.attn2?\.to_[qkv]\.", k)}
    save_file(subset, tmp_path / "qkv_only.safetensors")
    fuse_lora(b, tmp_path / "qkv_only.safetensors", 0.8)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], atol=1e-6, rtol=0)


# -- arguments and errors ----------------------------------------------------------------------------------------


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_lora_arg("a.safetensors:0.5")[1] == 0.5
    assert str(parse_lora_arg("dir/a.safetensors:-2")[0]) == "dir/a.safetensors"
    odd = tmp_path / "with:colon.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (odd, 1.0)
    for bad in ("a.safetensors:nan", "a.safetensors:inf", "a.safetensors:abc", "a.safetensors:"):
        with pytest.raises(FastSD35Error, match="the scale must be a finite number"):
            parse_lora_arg(bad)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """One file per bad-input case, made once for the module."""
    folder = tmp_path_factory.mktemp("loras")
    return folder, lora_files(folder)


def lora_files(tmp_path):
    """One file per bad-input case, for the tiny preset's transformer (hidden 128)."""
    model = Pipeline.from_preset("tiny_random", device="cpu").transformer
    files = {}
    write_kohya_lora(tmp_path / "good.safetensors", model, modules=["final_layer.linear"])
    files["good"] = tmp_path / "good.safetensors"
    other = make_model(TINY_CONFIGS["sd35_medium"])  # hidden 192: a LoRA for another model
    write_kohya_lora(tmp_path / "other.safetensors", other, modules=["joint_blocks.0.x_block.mlp.fc1"])
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "nolora.safetensors")
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 128),
               "lora_unet_foo_bar.lora_up.weight": torch.zeros(128, 2)}, tmp_path / "nomatch.safetensors")  # fmt: skip
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)},
              tmp_path / "te.safetensors")  # fmt: skip
    (tmp_path / "pickle.safetensors").write_bytes(b"PK\x03\x04 a zip archive")
    (tmp_path / "text.safetensors").write_text("not a lora")
    down, up = "lora_unet_final_layer_linear.lora_down.weight", "lora_unet_final_layer_linear.lora_up.weight"
    save_file({down: torch.zeros(0, 128), up: torch.zeros(64, 0)}, tmp_path / "rank0.safetensors")
    save_file({down: torch.ones(2, 128), up: torch.ones(64, 2), "lora_unet_final_layer_linear.alpha": torch.tensor(float("nan"))},
              tmp_path / "nan_alpha.safetensors")  # fmt: skip
    save_file({down: torch.full((2, 128), float("inf")), up: torch.ones(64, 2)}, tmp_path / "inf_down.safetensors")
    save_file({down: torch.full((2, 128), 1e30), up: torch.full((64, 2), 1e30)}, tmp_path / "overflow.safetensors")
    save_file({down: torch.ones(2, 128, dtype=torch.int32), up: torch.ones(64, 2, dtype=torch.int32)},
              tmp_path / "ints.safetensors")  # fmt: skip
    os.mkfifo(tmp_path / "fifo.safetensors")
    return files


BAD = [
    ("other.safetensors", "a LoRA for another model: lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_down.weight "
                          "changes a (768, 192) weight, but joint_blocks.0.x_block.mlp.fc1.weight here is (512, 128)"),
    ("nolora.safetensors", "no LoRA weights"),
    ("nomatch.safetensors", "lora_unet_foo_bar.lora_down.weight matches no weight of this transformer"),
    ("te.safetensors", "text-encoder LoRA layers"),
    ("pickle.safetensors", "PyTorch pickle checkpoint"),
    ("text.safetensors", "not a safetensors file"),
    ("missing.safetensors", "not found"),
    ("good.safetensors:nan", "the scale must be a finite number, got 'nan'"),
    ("good.safetensors:x1", "the scale must be a finite number, got 'x1'"),
    ("good.safetensors:1" + "0" * 400, "the scale must be a finite number, got '1000"),
    ("rank0.safetensors", "have rank 0 or an empty side: a LoRA layer needs rank >= 1"),
    ("nan_alpha.safetensors", "lora_unet_final_layer_linear.alpha is nan, not a finite number"),
    ("inf_down.safetensors", "lora_unet_final_layer_linear.lora_down.weight holds NaN or infinite values"),
    ("overflow.safetensors", "would make final_layer.linear.weight overflow to infinity"),
    ("ints.safetensors", "lora_unet_final_layer_linear.lora_down.weight holds non-float values"),
    ("fifo.safetensors", "it is a FIFO"),
    ("x" * 300 + ".safetensors", "File name too long"),
]


@pytest.mark.parametrize("arg, message", BAD)
def test_bad_lora_on_the_command_line(tmp_path, capsys, lora_dir, arg, message):
    folder, _ = lora_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"old")
    fails(capsys, message, "--preset", "tiny_random", "--prompt", "x", "--out", out, "--lora", folder / arg, *FAST, out=out)
    assert (out / "keep.png").read_bytes() == b"old"


def test_bad_lora_leaves_the_weights_unchanged(tmp_path, tiny, lora_dir):
    folder, files = lora_dir
    mixed = tmp_path / "mixed.safetensors"
    tensors = write_kohya_lora(mixed, tiny.transformer, modules=["final_layer.linear", "joint_blocks.0.x_block.mlp.fc1"])
    tensors["lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_up.weight"] = torch.zeros(99, 4)  # the second layer is bad
    save_file(tensors, mixed)
    before = {k: v.clone() for k, v in tiny.transformer.state_dict().items()}
    with pytest.raises(FastSD35Error, match=r"changes a \(99, 128\) weight, but joint_blocks.0.x_block.mlp.fc1.weight"):
        tiny.load_lora(mixed)
    with pytest.raises(FastSD35Error, match="the scale must be a finite number"):
        tiny.load_lora(files["good"], scale=float("inf"))
    for bad in (None, 123, folder / "rank0.safetensors", folder / "nan_alpha.safetensors",
                folder / "inf_down.safetensors", folder / "overflow.safetensors", folder / "fifo.safetensors"):
        with pytest.raises(FastSD35Error):
            tiny.load_lora(bad)
    for scale in (float("inf"), "0.5", "big", True, None, 10**400):  # numbers only, as cfg="5" is refused
        with pytest.raises(FastSD35Error, match="the scale must be a finite number"):
            tiny.load_lora(files["good"], scale=scale)
    assert all(torch.equal(v, before[k]) for k, v in tiny.transformer.state_dict().items())
    assert tiny.loras == []
    with pytest.raises(FastSD35Error, match="has no lora_up/lora_B weight"):
        save_file({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 128)}, tmp_path / "half.safetensors")
        lora_layers(tmp_path / "half.safetensors")


def test_a_failure_while_fusing_restores_every_weight(tmp_path, tiny, monkeypatch):
    """All or nothing whatever fails inside: out of memory (or an interrupt) on the second layer of the second file,
    after the first file and a layer of the second were written, leaves the weights as they were."""
    import fastsd35.weights.lora as lora

    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    write_kohya_lora(first, tiny.transformer, modules=["final_layer.linear"])
    write_kohya_lora(second, tiny.transformer, modules=["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.mlp.fc1"])
    before = {k: v.clone() for k, v in tiny.transformer.state_dict().items()}
    real, calls = lora._delta, []

    def delta(*args):
        calls.append(args[1].target)
        if len(calls) == 6:  # 3 layers checked (calls 1-3), then applied: the third application fails
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lora, "_delta", delta)
    with pytest.raises(KeyboardInterrupt):
        lora.fuse_loras(tiny.transformer, [(first, 1.0), (second, 1.0)])
    assert len(calls) == 6
    assert all(torch.equal(v, before[k]) for k, v in tiny.transformer.state_dict().items())
    monkeypatch.setattr(lora, "_delta", real)
    assert [f.layers for f in lora.fuse_loras(tiny.transformer, [(first, 1.0), (second, 1.0)])] == [1, 2]
    assert not all(torch.equal(v, before[k]) for k, v in tiny.transformer.state_dict().items())


@pytest.mark.parametrize("call, message", [
    (lambda: Pipeline.from_pretrained("models", 123), "preset must be a preset name"),
    (lambda: Pipeline.from_pretrained("models", "tiny", controlnet=123), "controlnet must be a path (a str or Path, not empty, without NUL bytes), got 123"),
    (lambda: Pipeline.from_pretrained("models", "tiny", loras=None), "loras must be a list of (path, scale) pairs, got None"),
    (lambda: Pipeline.from_pretrained("models", "tiny", loras=["file"]), "loras[0] must be a (path, scale) pair, got 'file'"),
    (lambda: Pipeline.from_pretrained("models", "tiny", fast="yes"), "fast must be True or False"),
    (lambda: Pipeline.from_pretrained("models", "tiny", graphs=1), "graphs must be True, False or None, got 1"),
    (lambda: Pipeline.from_pretrained("models", "tiny", device=True), "unknown device True"),
    (lambda: Pipeline.from_pretrained("models", "tiny", dtype="fp64"), "dtype must be one of fp16, bf16, fp32, fp8"),
    (lambda: Pipeline.from_preset("tiny", loras=[(None, 1)]), "loras[0]'s path must be a path (a str or Path, not empty, without NUL bytes), got None"),
    (lambda: Pipeline.from_preset("tiny", loras=[("x.safetensors", "1")]), "the scale must be a finite number, got '1'"),
    (lambda: Pipeline.from_preset("tiny_random", seed="x"), "seed must be an integer in [0, 9223372036854775807], got 'x'"),
    (lambda: Pipeline.from_preset("tiny", seed=-1), "seed must be an integer"),
    (lambda: Pipeline.from_preset("nonsense"), "unknown preset 'nonsense'"),
    (lambda: Pipeline.from_preset("tiny_random", control_type=1.5, controlnet="x"), "control_type must be blur, canny or depth"),
])  # fmt: skip
def test_python_api_arguments_are_checked_before_anything_loads(call, message, monkeypatch):
    import fastsd35.weights.checkpoints

    monkeypatch.setattr(fastsd35.weights.checkpoints, "load_transformer", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(FastSD35Error) as info:
        call()
    assert message in str(info.value)


def test_cli_records_the_lora_and_from_png_honours_it(tmp_path, capsys):
    files = lora_files(tmp_path)
    args = ["--preset", "tiny_random", "--prompt", "a red cube", "--seed", 3, *FAST]
    assert run(*args, "--out", tmp_path / "plain") == 0
    assert run(*args, "--out", tmp_path / "lora", "--lora", f"{files['good']}:1.5") == 0
    [plain], [with_lora] = (sorted((tmp_path / d).glob("*.png")) for d in ("plain", "lora"))
    with Image.open(with_lora) as image:
        record = json.loads(image.info[METADATA_KEY])
        pixels = np.asarray(image)
    digest = hashlib.sha256(files["good"].read_bytes()).hexdigest()
    assert record["loras"] == [{"file": str(files["good"]), "scale": 1.5, "sha256": digest}]
    assert np.abs(pixels.astype(int) - np.asarray(Image.open(plain)).astype(int)).max() > 5  # the LoRA mattered
    assert run("--from-png", with_lora, "--out", tmp_path / "again") == 0
    [again] = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), pixels)
    with Image.open(again) as image:
        assert json.loads(image.info[METADATA_KEY])["loras"] == record["loras"]

    # A LoRA file that changed since is refused (its SHA-256 is in the record); --lora uses it on purpose.
    write_kohya_lora(files["good"], Pipeline.from_preset("tiny_random", device="cpu").transformer,
                     modules=["final_layer.linear"], seed=99)  # fmt: skip
    capsys.readouterr()
    fails(capsys, f"LoRA file {files['good']} is not the file the PNG was made with", "--from-png", with_lora,
          "--out", tmp_path / "changed", out=tmp_path)  # fmt: skip
    assert run("--from-png", with_lora, "--lora", f"{files['good']}:1.5", "--out", tmp_path / "changed") == 0


def test_loras_and_an_accelerated_diffusers_pipeline(tmp_path):
    """accelerate refuses unfused diffusers LoRA layers; after fuse_lora + unload_lora_weights it runs the fused
    weights, and fuse_lora on the accelerated transformer's model gives the same."""
    diffusers = require_diffusers()
    FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline = diffusers.FlowMatchEulerDiscreteScheduler, diffusers.StableDiffusion3Pipeline

    from fastsd35.diffusers import accelerate

    config = TINY_CONFIGS["sd35_medium"]
    model = make_model(config)

    def pipeline():
        none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                              "tokenizer_3"])  # fmt: skip
        return StableDiffusion3Pipeline(transformer=make_diffusers(model), scheduler=FlowMatchEulerDiscreteScheduler(),
                                        **none)  # fmt: skip

    path = tmp_path / "lora.safetensors"
    pipe = pipeline()
    write_diffusers_lora(path, pipe.transformer)
    pipe.load_lora_weights(str(path))
    with pytest.raises(ValueError, match=r"has diffusers LoRA layers .* run pipe.fuse_lora\(\) and pipe.unload_lora"):
        accelerate(pipe)
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    x, t, y, ctx = inputs(config)
    with torch.no_grad():
        expected = pipe.transformer(x, ctx, y, t).sample
        plain = pipeline().transformer(x, ctx, y, t).sample
        assert (expected - plain).abs().max() > 1e-2  # the LoRA matters
        torch.testing.assert_close(accelerate(pipe).transformer(x, ctx, y, t).sample, expected, atol=1e-4, rtol=0)
        fast = accelerate(pipeline()).transformer
        fuse_lora(fast.model, path, 0.8)
        torch.testing.assert_close(fast(x, ctx, y, t).sample, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("loras", ["style.safetensors", [{"file": 3, "scale": 1}], [{"file": "a", "scale": "1"}]])
def test_malformed_lora_record(tmp_path, capsys, loras):
    from fastsd35.app.outputs import png_bytes

    png = tmp_path / "crafted.png"
    png.write_bytes(png_bytes(Image.new("RGB", (8, 8)), {"prompt": "x", "preset": "tiny_random", "steps": 2, "sampler": "euler",
                                                          "cfg": 1.0, "seed": 1, "width": 64, "height": 48,
                                                          "shift": 3.0, "loras": loras}))  # fmt: skip
    fails(capsys, "the record.loras", "--from-png", png, "--out", tmp_path / "o", out=tmp_path)


def test_fp8_gets_its_loras_before_quantizing(tmp_path):
    """With dtype="fp8" the LoRA is fused into the full-precision weights, then quantized: the FP8 weights are those
    of the fused model; and a LoRA cannot be fused into weights that are already FP8."""
    from fastsd35.models.fp8 import FP8Linear

    plain = Pipeline.from_preset("tiny_random", device="cpu")
    path = tmp_path / "k.safetensors"
    write_kohya_lora(path, plain.transformer, modules=["joint_blocks.0.x_block.mlp.fc1"], rank=4, alpha=4.0)
    fused = Pipeline.from_preset("tiny_random", device="cpu", loras=[(path, 1.0)]).transformer
    fp8 = Pipeline.from_preset("tiny_random", device="cpu", dtype="fp8", loras=[(path, 1.0)])
    layer = fp8.transformer.joint_blocks[0].x_block.mlp.fc1
    assert isinstance(layer, FP8Linear)
    expected = FP8Linear.from_linear(fused.joint_blocks[0].x_block.mlp.fc1)
    assert torch.equal(layer.weight.float(), expected.weight.float())
    unfused = FP8Linear.from_linear(plain.transformer.joint_blocks[0].x_block.mlp.fc1)
    assert not torch.equal(layer.weight.float(), unfused.weight.float())
    with pytest.raises(FastSD35Error, match="cannot be fused into FP8 weights"):
        fp8.load_lora(path)
    # the same from a model folder (the checkpoint loaders' path)
    from fastsd35.tiny.family import write_tiny_model

    loaded = Pipeline.from_pretrained(write_tiny_model(tmp_path / "model"), "tiny_random", device="cpu", dtype="fp8",
                                      loras=[(path, 1.0)])  # fmt: skip
    layer = loaded.transformer.joint_blocks[0].x_block.mlp.fc1
    assert isinstance(layer, FP8Linear) and torch.equal(layer.weight.float(), expected.weight.float())
