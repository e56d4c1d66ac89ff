"""The FP8 contender's output check (fastsd35.benchmarks.precision): its error model against a fresh measurement, the
correct FP8 step passing it, and broken FP8 paths (wrong scales, a transposed weight) failing it. On the CPU the
contender runs FastMMDiTX on the reference ops with FP8 GEMMs (torch._scaled_mm), the same numerics as the GPU's."""

import importlib.util
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from fastsd35.benchmarks import cases as bc
from fastsd35.benchmarks import precision
from fastsd35.benchmarks import suite as fb
from fastsd35.models import fp8

ROOT = Path(__file__).resolve().parents[2]


def test_error_model_grows_with_depth():
    depths = [1, 2, 3, 4, 6, 8, 12, 16, 24, 38, 60]
    errors = [precision.fp8_error(d) for d in depths]
    assert errors == sorted(errors) and errors[0] > 0
    assert all(precision.fp8_error(d) == pytest.approx(e) for d, e in precision.FP8_ERROR.items())
    assert precision.fp8_tolerance(38) == pytest.approx(precision.FP8_MARGIN * precision.FP8_ERROR[38])
    # why the contender needs its own model: at SD3.5 Large's depth FP8 alone is past bf16's tolerance
    assert precision.fp8_error(38) > fb.TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError, match="depth must be at least 1"):
        precision.fp8_error(0)


def test_the_tool_measures_what_the_model_says():
    """tools/fp8_error.py at depth 2 and width 512 again gives the table's value (the same draws)."""
    spec = importlib.util.spec_from_file_location("fp8_error", ROOT / "tools" / "fp8_error.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclass looks its module up
    try:
        spec.loader.exec_module(tool)
    finally:
        del sys.modules[spec.name]
    at_512 = tool.measure(2, heads=8)
    assert at_512["fp8_vs_bf16"] == pytest.approx(precision.FP8_ERROR[2], abs=5e-4)
    assert at_512["bf16"] < at_512["fp8_weights"] < at_512["fp8"]  # both quantizations cost; bf16 much less


GEO = bc.geometry("large", "cpu")  # the CPU benchmark's Large step: depth 3, fp32, latent 32x32, CFG batch 2
(CASE,) = [c for c in bc.transformer_cases(GEO) if c.tag == "B2"]
FP8 = bc.Contender("fastsd35+fp8", partial(bc._fastsd35_fp8_step, False, GEO))  # eager: graphs need CUDA


@pytest.fixture
def fp8_on_the_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # FastMMDiTX on the reference ops (with the FP8 GEMMs)
    monkeypatch.setattr(bc, "_need_triton", lambda device: None)  # the suite itself never times the CPU's FP8 step


def test_the_correct_fp8_step_passes_within_the_model(fp8_on_the_cpu):
    """Timed through the suite (run_contender): the contender's tolerance reaches the check, its error is recorded."""
    check = fb.OutputCheck()
    with CASE.inputs() as inputs:
        reference, fast = (fb.run_contender(CASE, c, inputs, device="cpu", quick=True, check=check)
                           for c in (CASE.contenders[0], FP8))  # fmt: skip
    assert reference.contender == "torch" and reference.median_s
    assert fast.error is None and fast.median_s, fast.error
    error, tolerance = fast.extra["rel_error"], fast.extra["tolerance"]
    assert tolerance == precision.fp8_tolerance(3)
    assert precision.fp8_error(3) / 2 < error <= precision.fp8_error(3)


@pytest.fixture(scope="module")
def reference_outputs():
    """The reference ops' outputs of the step (one call, untimed), once for the planted bugs."""
    with CASE.inputs() as inputs, CASE.contenders[0].build(inputs) as prepared:
        return [t.clone() for t in prepared.outputs(prepared.fn())]


def _scales_times(factor):
    def plant(layer):
        layer.weight_scale.mul_(factor)

    return plant


def _scales_reversed(layer):  # each output channel dequantized with another channel's scale
    layer.weight_scale.copy_(layer.weight_scale.flip(0))


def _square_transposed(layer):  # the attention output projections (D x D): the weight's transpose
    if layer.weight.shape[0] == layer.weight.shape[1]:
        layer.weight.copy_(layer.weight.t().clone())


@pytest.mark.parametrize("plant", [_scales_times(1.25), _scales_times(1.1), _scales_reversed, _square_transposed],
                         ids=["scales x1.25", "scales x1.1", "scales of other channels", "proj transposed"])  # fmt: skip
def test_a_broken_fp8_path_fails_the_check(fp8_on_the_cpu, reference_outputs, monkeypatch, plant):
    """Each layer quantized, then broken: the check the suite makes (with the contender's own tolerance) fails."""
    real = fp8.FP8Linear.from_linear.__func__

    def broken(cls, linear, **kwargs):
        layer = real(cls, linear, **kwargs)
        with torch.no_grad():
            plant(layer)
        return layer

    monkeypatch.setattr(fp8.FP8Linear, "from_linear", classmethod(broken))
    check = fb.OutputCheck()
    check("torch", reference_outputs)
    with CASE.inputs() as inputs, FP8.build(inputs) as prepared:
        with pytest.raises(fb.Mismatch, match=r"^fastsd35\+fp8 disagrees with torch: output 0 relative error ") as e:
            check(FP8.name, prepared.outputs(prepared.fn()), prepared.tolerance)
    found, limit = (float(v) for v in str(e.value).split("relative error ")[1].split(" > "))
    assert limit == pytest.approx(precision.fp8_tolerance(3), rel=1e-3) and found > limit
