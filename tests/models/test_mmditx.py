"""MMDiTX against diffusers' SD3Transformer2DModel (weights converted by diffusers' own converter)."""

import inspect
import re

import pytest
import torch
from helpers.models import TINY_CONFIGS, inputs, make_diffusers, make_model, run_diffusers

from fastsd35 import CheckpointError, kernels
from fastsd35.models.mmditx import CONFIGS, FastMMDiTX, MMDiTX, MMDiTXConfig


@torch.no_grad()
def test_matches_diffusers(tiny_config):
    model = make_model(tiny_config)
    ref = make_diffusers(model)
    x, t, y, ctx = inputs(tiny_config)
    out = model(x, t, y, ctx)
    expected = run_diffusers(ref, x, t, y, ctx)
    assert out.shape == x.shape
    assert expected.std() > 0.3  # outputs of order 1: the 1e-4 bound is meaningful
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_skip_layers_match_diffusers(tiny_config):
    model = make_model(tiny_config)
    ref = make_diffusers(model)
    x, t, y, ctx = inputs(tiny_config)
    out = model(x, t, y, ctx, skip_layers=[1])
    torch.testing.assert_close(out, run_diffusers(ref, x, t, y, ctx, skip_layers=[1]), atol=1e-4, rtol=0)
    assert (out - model(x, t, y, ctx)).abs().max() > 1e-2  # skipping a block changes the output


def controlnet_states(model, x, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    return [0.5 * torch.randn(x.shape[0], tokens, model.config.hidden_size, generator=g) for _ in range(n)]


@torch.no_grad()
def test_controlnet_residuals_match_diffusers_except_last_block():
    """Residual k goes after blocks i with i // (depth // n) == k. The reference adds one after the last block too;
    diffusers does not (context_pre_only), so the two agree exactly when the last block's residual is zero."""
    config = TINY_CONFIGS["sd35_medium"]  # depth 3, three residuals: block i gets hs[i]
    model = make_model(config)
    ref = make_diffusers(model)
    x, t, y, ctx = inputs(config)
    hs = controlnet_states(model, x, 3)
    hs[2] = torch.zeros_like(hs[2])
    out = model(x, t, y, ctx, controlnet_hidden_states=hs)
    torch.testing.assert_close(out, run_diffusers(ref, x, t, y, ctx, block_controlnet_hidden_states=hs), atol=1e-4, rtol=0)
    assert (out - model(x, t, y, ctx)).abs().max() > 1e-2

    # The last block's residual is applied by us (reference behaviour) and ignored by diffusers.
    hs[2] = controlnet_states(model, x, 1, seed=9)[0]
    out_last = model(x, t, y, ctx, controlnet_hidden_states=hs)
    assert (out_last - out).abs().max() > 1e-2
    torch.testing.assert_close(
        run_diffusers(ref, x, t, y, ctx, block_controlnet_hidden_states=hs), run_diffusers(ref, x, t, y, ctx,
        block_controlnet_hidden_states=[*hs[:2], torch.zeros_like(hs[2])]), atol=0, rtol=0)


@torch.no_grad()
def test_controlnet_residual_spacing_and_skip():
    """depth 2 with one residual: hs[0] after both blocks; a skipped block drops its residual (reference)."""
    config = TINY_CONFIGS["sd3"]
    model = make_model(config)
    x, t, y, ctx = inputs(config)
    hs = controlnet_states(model, x, 1)
    # Skipping block 0 and adding hs[0] after block 1 only equals running with hs on block 1 only, which we get
    # by passing two states [0, hs] (block i uses hs[i]).
    one = model(x, t, y, ctx, controlnet_hidden_states=hs, skip_layers=[0])
    two = model(x, t, y, ctx, controlnet_hidden_states=[torch.zeros_like(hs[0]), hs[0]], skip_layers=[0])
    torch.testing.assert_close(one, two, atol=0, rtol=0)
    both = model(x, t, y, ctx, controlnet_hidden_states=[hs[0], hs[0]])
    torch.testing.assert_close(model(x, t, y, ctx, controlnet_hidden_states=hs), both, atol=0, rtol=0)


def test_bad_controlnet_state_count():
    model = make_model(TINY_CONFIGS["sd35_medium"])  # depth 3
    x, t, y, ctx = inputs(model.config)
    with pytest.raises(ValueError, match="2 ControlNet states cannot be spread over 3 blocks"):
        model(x, t, y, ctx, controlnet_hidden_states=controlnet_states(model, x, 2))


def reference_kwargs(config: MMDiTXConfig):
    """The keyword arguments the reference's BaseModel passes to mmditx.MMDiTX."""
    return dict(
        input_size=None,
        pos_embed_scaling_factor=None,
        pos_embed_offset=None,
        pos_embed_max_size=config.pos_embed_max_size,
        patch_size=config.patch_size,
        in_channels=16,
        depth=config.depth,
        num_patches=config.pos_embed_max_size**2,
        adm_in_channels=config.adm_in_channels,
        context_embedder_config={
            "target": "torch.nn.Linear",
            "params": {"in_features": config.context_dim, "out_features": config.hidden_size},
        },
        qk_norm=config.qk_norm,
        x_block_self_attn_layers=list(config.x_block_self_attn_layers),
        dtype=torch.float32,
        device="cpu",
        verbose=False,
    )


def test_reference_constructor(tiny_config):
    model = MMDiTX(**reference_kwargs(tiny_config))
    assert model.config == tiny_config
    ours = MMDiTX(tiny_config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_reference_constructor_defaults_are_the_references():
    """Arguments left out take mmditx.MMDiTX's defaults (its __init__ signature in Stability AI's sd3.5 repository):
    depth 28, patch 2, 4 input channels, mlp ratio 4, qkv bias, no qk norm, no x-only attention layers."""
    reference_defaults = dict(input_size=32, patch_size=2, in_channels=4, depth=28, mlp_ratio=4.0, learn_sigma=False,
                              adm_in_channels=None, context_embedder_config=None, register_length=0, rmsnorm=False,
                              scale_mod_only=False, swiglu=False, out_channels=None, pos_embed_scaling_factor=None,
                              pos_embed_offset=None, pos_embed_max_size=None, num_patches=None, qk_norm=None,
                              qkv_bias=True, verbose=False)  # fmt: skip
    signature = inspect.signature(MMDiTXConfig.from_reference_kwargs).parameters
    assert {k: signature[k].default for k in reference_defaults} == reference_defaults
    assert tuple(signature["x_block_self_attn_layers"].default) == ()
    config = MMDiTX(pos_embed_max_size=8, device="meta").config  # every other argument left at its default
    assert (config.depth, config.patch_size, config.in_channels, config.mlp_ratio) == (28, 2, 4, 4.0)
    assert config.qkv_bias and config.qk_norm is None and config.x_block_self_attn_layers == ()


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_from_state_dict_keeps_the_weights_dtype_unless_told(dtype):
    weights = {k: v.to(torch.bfloat16) for k, v in make_model(TINY_CONFIGS["sd3"]).state_dict().items()}
    model = FastMMDiTX.from_state_dict(weights, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype or torch.bfloat16}


@pytest.mark.parametrize("option, value", [("swiglu", True), ("rmsnorm", True), ("register_length", 4), ("scale_mod_only", True)])
def test_reference_constructor_rejects_unreleased_options(option, value):
    kwargs = reference_kwargs(TINY_CONFIGS["sd3"]) | {option: value}
    with pytest.raises(ValueError, match=option):
        MMDiTX(**kwargs)


@pytest.mark.parametrize("layers", [(-1,), (3,), (0, 4)], ids=str)
def test_config_rejects_second_attention_outside_the_blocks(layers):
    """x_block_self_attn_layers must name blocks 0 .. depth-2 (the last block's context stream is pre-only); the
    edges 0 and depth-2 are fine."""
    with pytest.raises(ValueError, match=r"x_block_self_attn_layers \[.*\] outside blocks 0\.\.2"):
        MMDiTXConfig(depth=4, x_block_self_attn_layers=layers)
    assert MMDiTXConfig(depth=4, x_block_self_attn_layers=(2, 0)).x_block_self_attn_layers == (0, 2)


def test_released_configs_are_the_spec_table():
    """SPEC.md section 3.2, row by row (the model tests run reduced depths, so only this pins the released ones)."""
    rows = {  # depth, hidden, heads, pos_embed max, qk_norm, x_block_self_attn_layers, MLP hidden
        "sd3_medium": (24, 1536, 24, 192, None, (), 6144),
        "sd3.5_medium": (24, 1536, 24, 384, "rms", tuple(range(13)), 6144),
        "sd3.5_large": (38, 2432, 38, 192, "rms", (), 9728),
    }
    assert set(CONFIGS) == set(rows)
    for name, (depth, hidden, heads, max_size, qk, attn2, mlp) in rows.items():
        c = CONFIGS[name]
        assert (c.depth, c.hidden_size, c.num_heads, c.pos_embed_max_size, c.qk_norm) == (depth, hidden, heads, max_size, qk)
        assert c.x_block_self_attn_layers == attn2 and round(c.hidden_size * c.mlp_ratio) == mlp
        assert (c.patch_size, c.in_channels, c.out_channels, c.adm_in_channels, c.context_dim) == (2, 16, 16, 2048, 4096)


def test_official_key_layout_and_variants():
    """State dict keys are the official ones (SPEC.md §4); the released configs are recognised from shapes alone."""
    with torch.device("meta"):
        large = MMDiTX("sd3.5_large")
    keys = set(large.state_dict())
    assert "joint_blocks.37.context_block.adaLN_modulation.1.weight" in keys
    assert large.state_dict()["joint_blocks.37.context_block.adaLN_modulation.1.weight"].shape == (2 * 2432, 2432)
    assert large.state_dict()["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (6 * 2432, 2432)
    assert "joint_blocks.37.context_block.attn.proj.weight" not in keys
    assert "joint_blocks.37.context_block.attn.qkv.weight" in keys
    assert large.state_dict()["final_layer.linear.weight"].shape == (64, 2432)
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in MMDiTX(config).state_dict().items()}
        assert MMDiTXConfig.from_shapes(shapes) == config
        assert config.variant == name
    odd = shapes | {"x_embedder.proj.weight": (2400, 16, 2, 2)}  # 2400 = 37.5 heads of 64
    with pytest.raises(CheckpointError, match="sd3x: hidden size 2400 is not a multiple of 64"):
        MMDiTXConfig.from_shapes(odd, source="sd3x")
    with torch.device("meta"):
        medium = MMDiTX("sd3.5_medium").state_dict()
    assert medium["pos_embed"].shape == (1, 147456, 1536)
    assert medium["joint_blocks.12.x_block.adaLN_modulation.1.weight"].shape == (9 * 1536, 1536)
    assert "joint_blocks.13.x_block.attn2.qkv.weight" not in medium


@torch.no_grad()
def test_adaln_fusion_survives_conversion_and_assign():
    """One GEMM gives all modulations: each block's adaLN Linear is a slice of one matrix, and stays so through
    .to(dtype), to_empty and load_state_dict(assign=True)."""
    config = TINY_CONFIGS["sd35_medium"]
    model = make_model(config)
    x, t, y, ctx = inputs(config)
    expected = model(x, t, y, ctx)
    assert model._adaln_is_fused()
    w = model._adaln_w
    first = model.joint_blocks[0].context_block.adaLN_modulation[1].weight
    assert first.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    n_mods = (6 + 9) + (6 + 9) + (2 + 6) + 2  # blocks 0-1 with attn2, the last block, the final layer
    assert w.shape == (n_mods * config.hidden_size, config.hidden_size)

    model.double()
    assert model._adaln_is_fused() and model._adaln_w.dtype == torch.float64
    model.float()
    torch.testing.assert_close(model(x, t, y, ctx), expected, atol=0, rtol=0)

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = MMDiTX.empty(config, dtype=torch.float32, device="cpu")
    fresh.load_state_dict(sd, assign=True)
    assert not fresh._adaln_is_fused()
    torch.testing.assert_close(fresh(x, t, y, ctx), expected, atol=0, rtol=0)
    assert fresh._adaln_is_fused()

    # converted while not fused (assigned, no forward yet): the assigned weights are converted, not a stale matrix
    fresh = MMDiTX.empty(config, dtype=torch.float32, device="cpu")
    fresh.load_state_dict(sd, assign=True)
    fresh.double()
    assert all(v.dtype == torch.float64 for v in fresh.state_dict().values())
    torch.testing.assert_close(fresh.float()(x, t, y, ctx), expected, atol=0, rtol=0)


@torch.no_grad()
def test_modulations_are_one_gemm(monkeypatch):
    config = TINY_CONFIGS["sd35_large"]
    model = make_model(config)
    calls = []
    real = torch.nn.functional.linear

    def counting(inp, weight, bias=None):
        calls.append(tuple(weight.shape))
        return real(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    model(*inputs(config))
    D = config.hidden_size
    n_mods = (6 + 6) + (2 + 6) + 2  # block 0: ctx + x; last block: pre-only ctx + x; final layer
    assert calls.count((n_mods * D, D)) == 1
    assert not any(shape[0] in (6 * D, 2 * D) and shape[1] == D for shape in calls)


def test_input_errors():
    model = make_model(TINY_CONFIGS["sd3"])  # pos_embed_max_size 16, patch 2 -> latent up to 32
    x, t, y, ctx = inputs(model.config)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(x[:, :, :15], t, y, ctx)
    with pytest.raises(ValueError, match="larger than this model's position table"):
        model(torch.randn(1, 16, 34, 8), t[:1], y[:1], ctx[:1])
    with pytest.raises(ValueError, match="context is required"):
        model(x, t, y)
    assert x.shape[0] == 2
    for wrong in (t[:1], t[:, None], torch.cat([t, t])):  # one timestep per image, as a (B,) vector
        with pytest.raises(ValueError, match=rf"t must be \(B,\) = \(2,\), got {re.escape(str(tuple(wrong.shape)))}"):
            model(x, wrong, y, ctx)


@torch.no_grad()
@pytest.mark.parametrize("config", [42, 2.5, {"depth": 2}], ids=repr)
def test_constructor_rejects_a_config_of_the_wrong_type(config):
    with pytest.raises(TypeError, match=r"config must be an MMDiTXConfig or one of \['sd3_medium'"):
        MMDiTX(config)


def test_timestep_and_pooled_change_output():
    model = make_model(TINY_CONFIGS["sd3"])
    x, t, y, ctx = inputs(model.config)
    base = model(x, t, y, ctx)
    assert (model(x, t + 100, y, ctx) - base).abs().max() > 1e-2
    assert (model(x, t, y + 1, ctx) - base).abs().max() > 1e-2


# -- FastMMDiTX: the same model on the Triton ops ---------------------------------------------------------------


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def test_fast_mmditx_matches_mmditx(tiny_config):
    """Same state dict, same forward, the Triton ops (compiled on CUDA, interpreted on the CPU): equal outputs, with
    skip_layers and with ControlNet residuals. A small latent keeps the interpreter quick."""
    assert kernels.backend(DEVICE) in ("triton", "triton-interpreter")  # never a silent torch fallback here
    model = make_model(tiny_config).to(DEVICE)
    fast = FastMMDiTX.from_state_dict(model.state_dict())
    assert type(fast) is FastMMDiTX and fast.ops(DEVICE) is kernels.TRITON_OPS and model.ops(DEVICE) is kernels.REFERENCE_OPS
    x, t, y, ctx = (v.to(DEVICE) for v in inputs(tiny_config, h=6, w=4))
    hs = [h.to(DEVICE) for h in controlnet_states(model, x, tiny_config.depth)]
    for kwargs in ({}, {"skip_layers": [1]}, {"controlnet_hidden_states": hs}):
        expected = model(x, t, y, ctx, **kwargs)
        torch.testing.assert_close(fast(x, t, y, ctx, **kwargs), expected, atol=1e-4, rtol=0)


def test_from_mmditx_converts_in_place_without_copying():
    model = make_model(TINY_CONFIGS["sd3"])
    first = model.joint_blocks[0].x_block.attn.qkv.weight
    fast = FastMMDiTX.from_mmditx(model)
    assert fast is model and type(fast) is FastMMDiTX
    assert fast.joint_blocks[0].x_block.attn.qkv.weight is first and fast._adaln_is_fused()
    with pytest.raises(TypeError, match="from_mmditx expects a fastsd35 MMDiTX"):
        FastMMDiTX.from_mmditx(torch.nn.Linear(2, 2))


def test_fast_mmditx_takes_the_same_constructor_arguments():
    config = TINY_CONFIGS["sd35_medium"]
    assert FastMMDiTX(**reference_kwargs(config)).config == config
    assert {k: v.shape for k, v in FastMMDiTX(config).state_dict().items()} == {
        k: v.shape for k, v in MMDiTX(config).state_dict().items()
    }
