"""The benchmark suite: FLOP and byte counts against hand computation and torch's FLOP counter, the CPU form of
`fastsd35 bench` end to end (table, JSON schema, skipped contenders with their reasons), the Triton contenders fed the
same arguments as the torch ones, and the results file. No timing is asserted: figures are only checked to exist."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastsd35 import kernels
from fastsd35.app import cli
from fastsd35.benchmarks import cases as bc
from fastsd35.benchmarks import suite as fb
from fastsd35.models.mmditx import MMDiTX, MMDiTXConfig

from helpers.diffusers_ref import diffusers_available

ROOT = Path(__file__).resolve().parents[2]
SMALL = MMDiTXConfig(depth=2, context_dim=8, adm_in_channels=4, pos_embed_max_size=8, qk_norm="rms",
                     x_block_self_attn_layers=(0,))  # fmt: skip


@contextlib.contextmanager
def one_thread():
    """The CPU suite on one thread: on a small shared CI machine, waking a second thread for each small op costs
    milliseconds at random and makes the run slow (figures are not checked, only their presence)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def counted_flops(config, batch, n_ctx, latent_hw):
    model = bc.random_weights_(MMDiTX(config))
    x = torch.randn(batch, config.in_channels, *latent_hw)
    args = (x, torch.full((batch,), 3.0), torch.randn(batch, config.adm_in_channels or 1), torch.randn(batch, n_ctx, config.context_dim))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(*args[:2], args[2] if config.adm_in_channels else None, args[3])  # the math SDPA is made of counted bmms
    return counter.get_total_flops()


# -- work ---------------------------------------------------------------------------------------------------------


def test_mmditx_flops_by_hand():
    """depth 2 (D 128, 2 heads, MLP 512), block 0 with the x-only attention, batch 1, 3 context and 6 latent tokens."""
    D, ctx, x, mlp = 128, 3, 6, 512
    embed = 2 * x * 64 * D + 2 * (256 * D + D * D) + 2 * (4 * D + D * D) + 2 * ctx * 8 * D  # patch, t, y, context
    stream = lambda n: 2 * n * D * 3 * D + 2 * n * D * D + 2 * 2 * n * D * mlp  # noqa: E731  qkv, proj, fc1 + fc2
    joint = 4 * 2 * (ctx + x) ** 2 * 64
    block0 = stream(ctx) + stream(x) + joint + (2 * x * D * 3 * D + 2 * x * D * D) + 4 * 2 * x * x * 64  # + attn2
    block1 = 2 * ctx * D * 3 * D + stream(x) + joint  # the last context stream stops after its qkv
    adaln = 2 * D * (6 + 9 + 2 + 6 + 2) * D  # all modulation vectors from one GEMM
    final = 2 * x * D * 2 * 2 * 16
    assert embed + block0 + block1 + adaln + final == 8_235_008
    assert bc.mmditx_flops(SMALL, batch=1, n_ctx=ctx, n_x=x) == 8_235_008
    assert counted_flops(SMALL, 1, ctx, (4, 6)) == 8_235_008


@pytest.mark.parametrize("config", [MMDiTXConfig(depth=3, context_dim=16, adm_in_channels=None, pos_embed_max_size=8),
                                    bc.REDUCED["medium"]], ids=["sd3-like", "reduced-medium"])  # fmt: skip
def test_mmditx_flops_match_torch_flop_counter(config):
    assert bc.mmditx_flops(config, batch=2, n_ctx=5, n_x=4 * 4) == counted_flops(config, 2, 5, (8, 8))


def test_kernel_work_at_sd35_large_shapes():
    cases = {c.id: c for c in bc.build_cases("cpu", ("kernels",), ("large",), dtype=torch.bfloat16, full=True)}
    assert sorted(cases) == sorted(["large-ln_modulate", "large-gated_residual_ln_modulate", "large-gated_residual",
                                    "large-split_qkv_rmsnorm", "large-joint_attention-ctx154",
                                    "large-joint_attention-ctx333"])  # fmt: skip
    assert cases["large-joint_attention-ctx154"].flops == 4 * 2 * 38 * 4250 * 4250 * 64
    assert cases["large-joint_attention-ctx333"].shape == dict(B=2, ctx=333, L=4429, H=38, Dh=64)
    rows, vectors = 2 * 4096 * 2432, 2 * 2432  # bf16: 2 bytes each
    assert cases["large-ln_modulate"].bytes == 2 * (2 * rows + 2 * vectors)  # read x, write y; shift, scale
    assert cases["large-gated_residual_ln_modulate"].bytes == 2 * (4 * rows + 3 * vectors)
    assert cases["large-split_qkv_rmsnorm"].bytes == 2 * (6 * rows + 2 * 64)
    medium = {c.id for c in bc.build_cases("cpu", ("kernels",), ("medium",), full=True)}
    assert {"medium-ln_modulate2", "medium-x_attention"} <= medium  # MMDiT-X only


def test_e2e_context_length_is_the_counted_one():
    """The end-to-end FLOPs count 77 + 77 context tokens: what the (tiny) tokenizers give the benchmark prompt."""
    from fastsd35.tiny.family import tiny_text_encoders

    context, _ = tiny_text_encoders(0).encode([bc.PROMPT])
    assert context.shape[1] == 154 == bc.CONTEXT_LENGTHS[0]


def test_random_weights_scale_and_determinism():
    model = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300))
    bc.random_weights_(model, seed=3)
    assert abs(model[0].weight.std().item() * math.sqrt(400) - 1) < 0.05
    assert abs(model[1].weight.mean().item() - 1) < 0.05 and model[0].bias.abs().max() < 1
    again = bc.random_weights_(torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300)), seed=3)
    assert torch.equal(model[0].weight, again[0].weight) and not model[0].weight.requires_grad


# -- the Triton contenders' arguments -----------------------------------------------------------------------------


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in (value or ()) for t in _tensors(v)] if isinstance(value, (tuple, list)) else []


@pytest.mark.parametrize("model", ["large", "medium"])
def test_kernel_contenders_compute_the_same(model, monkeypatch):
    """Each kernel case's Triton contender, given the case's inputs, produces what its torch contender produces (on
    the CPU through Triton's interpreter, at a small geometry): the benchmark times the same work on both sides."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kernels.backend(device) == "torch":
        pytest.skip("needs the Triton kernels (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    monkeypatch.setattr(bc, "_need_triton", lambda device: None)  # the benchmark itself never times the interpreter
    config = MMDiTXConfig(depth=2, qk_norm="rms", x_block_self_attn_layers=(0,) if model == "medium" else ())
    dtype, tol = (torch.bfloat16, 2e-2) if device == "cuda" else (torch.float32, 1e-4)  # SDPA flash needs 16 bits
    geo = bc.Geometry(model, config, latent=8, device=torch.device(device), dtype=dtype)
    for case in bc.kernel_cases(geo, contexts=(7, 40)):
        torch_op, triton_op = case.contenders
        with case.inputs() as sets:
            args = sets[0]
            before = [t.clone() for t in _tensors(args)]
            outputs = []
            for contender in (torch_op, triton_op):
                for t, saved in zip(_tensors(args), before):
                    t.copy_(saved)  # written buffers start from the same state
                with contender.build(sets) as prepared:
                    outputs.append([t.clone() for t in _tensors(prepared.fn()) + _tensors(args)])
            for a, b in zip(*outputs):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=True, msg=case.id)


def test_kernel_inputs_rotate_through_four_l2s_on_cuda():
    """On CUDA a kernel case holds enough copies of its inputs to cover 4x an H100's 50 MB L2 (the timing rotates
    through them); on the CPU one. The count comes from the bytes of one set (its written buffers included)."""
    assert bc.ROTATE_BYTES == 4 * 50 * 2**20
    medium_x = 2 * 4096 * 1536 * 2  # one (B, L, D) bf16 activation of SD3.5 Medium: 25 MB
    for set_bytes in (medium_x, 2 * medium_x, 3 * 2 * 38 * 4250 * 64 * 2, 1000):
        n = bc.input_sets(set_bytes, "cuda")
        assert n * set_bytes >= bc.ROTATE_BYTES or n == bc.MAX_INPUT_SETS
        assert n == 1 or (n - 1) * set_bytes < bc.ROTATE_BYTES  # no more than needed
    assert bc.input_sets(medium_x, "cpu") == 1


def test_step_contenders_get_the_same_sigma_and_timestep():
    """fastsd35's passes take the sigma, diffusers the timestep the pass derives from it: 0.75 and 750, finite."""
    from fastsd35.pipeline.sampling import model_timestep

    geo = bc.geometry("large", "cpu")
    with bc._step_inputs(geo, 2, 7) as inp:
        assert inp.sigma.tolist() == [0.75, 0.75] and inp.t.tolist() == [750.0, 750.0]
        assert torch.equal(model_timestep(inp.sigma), inp.t)


def test_output_check_fails_loudly():
    check = fb.OutputCheck()
    ref = torch.randn(64, 64)
    check("torch", [ref, ref.bfloat16()])
    check("close", [ref + 1e-5, ref.bfloat16() * 1.01])  # within fp32's and bf16's tolerances
    with pytest.raises(fb.Mismatch, match=r"^nan: output 1 has 1 non-finite values of 4096$"):
        bad = ref.bfloat16()
        bad[3, 5] = float("inf")
        check("nan", [ref, bad])
    with pytest.raises(fb.Mismatch, match=r"^off disagrees with torch: output 0 relative error 0.00[0-9]+ > 0.001$"):
        check("off", [ref * 1.003, ref.bfloat16()])
    with pytest.raises(fb.Mismatch, match="has shape"):
        check("shape", [ref[:8], ref.bfloat16()])
    with pytest.raises(fb.Mismatch, match="gives 1 outputs"):
        check("count", [ref])


def test_a_contender_that_disagrees_is_an_error_and_the_command_fails(tmp_path, monkeypatch, capsys):
    @contextlib.contextmanager
    def build(value, inputs):
        yield bc.Prepared(lambda: torch.full((4,), value))

    @contextlib.contextmanager
    def dies(inputs):
        def call():
            raise bc.Failed("rank 1 stopped (killed by signal 9) without a report")

        yield bc.Prepared(call)

    contenders = [bc.Contender("torch", partial(build, 1.0), baseline=True), bc.Contender("fast", partial(build, 2.0)),
                  bc.Contender("nan", partial(build, float("nan"))), bc.Contender("dead", dies)]  # fmt: skip
    case = bc.Case("kernels", "op", "large", dict(B=1), contenders, contextlib.nullcontext, bytes=16)
    env = fb.Environment(torch.device("cpu"), "Test CPU (1 thread)", "torch")
    results, check = fb.Results(env), fb.OutputCheck()
    for contender in contenders:
        results.add(case, fb.run_contender(case, contender, None, device="cpu", quick=True, check=check))
    records = {r["contender"]: r for r in results.record()["cases"][0]["results"]}
    assert records["torch"]["median_ms"] > 0 and records["torch"]["first_ms"] > 0
    assert records["fast"] == {"contender": "fast", "baseline": False, "date": results.date,
                               "error": "fast disagrees with torch: output 0 relative error 1 > 0.001"}  # fmt: skip
    assert records["nan"]["error"] == "nan: output 0 has 4 non-finite values of 4"
    assert records["dead"]["error"] == "stopped while running: rank 1 stopped (killed by signal 9) without a report"
    assert "FAILED: fast disagrees with torch" in fb.format_table(results.record())

    monkeypatch.setattr(fb, "run_suite", lambda **kw: (results.record(), tmp_path / "x.json"))
    assert cli.main(["bench", "--only", "kernels"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["fastsd35: benchmark failed: kernels/large-op fast: fast disagrees with torch: output 0 relative "
                   "error 1 > 0.001",
                   "fastsd35: benchmark failed: kernels/large-op nan: nan: output 0 has 4 non-finite values of 4",
                   "fastsd35: benchmark failed: kernels/large-op dead: stopped while running: rank 1 stopped (killed "
                   "by signal 9) without a report"]  # fmt: skip


# -- the CPU suite ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`fastsd35 bench --quick --out <tmp>` once: (exit status, stdout, stderr, results folder)."""
    out = tmp_path_factory.mktemp("bench")
    stdout, stderr = io.StringIO(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(["bench", "--quick", "--out", str(out)])
    return status, stdout.getvalue(), stderr.getvalue(), out


def results_file(out: Path) -> dict:
    files = list(out.glob("*.json"))
    assert [f.name for f in files] == [f"{fb.detect_environment('cpu').slug}.json"]
    record = json.loads(files[0].read_text())
    assert record["device"].startswith(fb._cpu_name() + " (") and record["device_type"] == "cpu"
    return record


def test_cli_bench_quick_prints_the_table(quick_run):
    status, stdout, _, out = quick_run
    assert status == 0
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"wrote {out / (fb.detect_environment('cpu').slug + '.json')}"
    assert lines[0].startswith(results_file(out)["device"])
    assert lines[1].split() == ["case", "shape", "contender", "median", "ms", "rate", "peak", "GiB", "vs", "baselines"]
    body = lines[3:-1]
    assert len(body) == sum(len(c["results"]) for c in results_file(out)["cases"])
    step = [line for line in body if line.startswith("transformer step [large]") and "B=2" in line]
    contenders = ["torch", "diffusers", "fastsd35", "fastsd35+graphs", "fastsd35+graphs+fp8", "diffusers+compile"]
    assert [line.split()[8] for line in step] == contenders  # torch.compile last
    if diffusers_available():
        assert "TFLOP/s" in step[0] and "x diffusers" in step[0] and "x torch" in step[1]
    else:
        assert "TFLOP/s" in step[0] and "diffusers not installed" in step[1]
    assert any("GB/s" in line for line in body if line.startswith("kernels ln_modulate"))
    assert "skipped: Triton's interpreter is not timed" in stdout
    e2e = [line for line in body if line.startswith("e2e tiny")]
    assert "baseline; encode " in e2e[0] and ", sample " in e2e[0] and ", decode " in e2e[0]
    assert " ms; first call " in e2e[0] and "; first call " in step[0]


def test_cpu_results_schema(quick_run):
    record = results_file(quick_run[3])
    assert {"torch", "triton", "diffusers", "fastsd35", "python"} <= set(record["versions"])
    assert record["versions"]["torch"] == torch.__version__
    assert [c["part"] for c in record["cases"]][-2:] == ["multigpu"] * 2  # all skipped: see test_benchmark_multi
    assert {c["part"] for c in record["cases"]} == {"kernels", "transformer", "e2e", "multigpu"}
    for case in [c for c in record["cases"] if c["part"] != "multigpu"]:
        assert {"part", "id", "name", "model", "shape", "flops", "bytes", "date", "baselines", "results"} <= set(case)
        assert not [r for r in case["results"] if "error" in r], case  # finite, and the contenders agree
        medians = {r["contender"]: r["median_ms"] for r in case["results"] if "median_ms" in r}
        assert medians and all(m > 0 and math.isfinite(m) for m in medians.values()), case["id"]
        for r in case["results"]:
            if "median_ms" not in r:
                assert r["skipped"], (case["id"], r)
                continue
            assert r["rounds"] >= 1 and r["iterations"] >= 1 and r["first_ms"] > 0
            assert ("tflop_s" if case["flops"] else "gb_s") in r
            expected = {b: medians[b] / r["median_ms"] for b in case["baselines"] if b in medians and b != r["contender"]}
            assert r["ratios"] == pytest.approx(expected)

    by_id = {(c["part"], c["id"]): {r["contender"]: r for r in c["results"]} for c in record["cases"]}
    step = by_id[("transformer", "large-step-B2")]
    if not diffusers_available():
        assert step["diffusers"]["skipped"] == "diffusers not installed" and step["torch"]["ratios"] == {}
    else:
        assert step["diffusers"]["ratios"].keys() == {"torch"} and step["torch"]["ratios"].keys() == {"diffusers"}
        assert step["torch"]["extra"]["params"] == step["diffusers"]["extra"]["params"]  # the same model on both sides
    assert step["fastsd35"]["skipped"] == step["fastsd35+graphs"]["skipped"] == bc.NOT_INTERPRETED
    assert step["fastsd35+graphs+fp8"]["skipped"] == bc.NOT_INTERPRETED
    assert ("torch.compile" if diffusers_available() else "diffusers not installed") in step["diffusers+compile"]["skipped"]
    assert by_id[("kernels", "medium-ln_modulate2")]["triton"]["skipped"] == bc.NOT_INTERPRETED
    e2e = by_id[("e2e", "tiny-tiny_random")]
    assert set(e2e["eager"]["extra"]["stages_ms"]) == {"encode", "sample", "decode"}
    assert e2e["graphs"]["skipped"] == "CUDA graphs need CUDA"


def test_diffusers_contenders_skipped_without_diffusers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with one_thread():
        record, path = fb.run_suite(parts=("transformer",), models=("large",), quick=True, out=tmp_path)
    assert record["versions"]["diffusers"] is None
    for case in record["cases"]:
        results = {r["contender"]: r for r in case["results"]}
        assert results["diffusers"]["skipped"] == results["diffusers+compile"]["skipped"] == "diffusers not installed"
        assert results["torch"]["median_ms"] > 0 and results["torch"]["ratios"] == {}
    assert json.loads(path.read_text())["cases"] == record["cases"]


def test_bad_bench_arguments(capsys):
    assert cli.main(["bench", "--only", "kernel"]) == 2
    err = capsys.readouterr().err
    assert err == "fastsd35: error: --only 'kernel': choose from kernels, transformer, e2e, multigpu, cache, serve (comma-separated)\n"
    assert cli.main(["bench", "--models", "large,xl"]) == 2
    assert "--models 'large,xl': choose from large, medium" in capsys.readouterr().err


# -- the results file ---------------------------------------------------------------------------------------------


def fake_case(name, flops=None, nbytes=None):
    contenders = [bc.Contender("torch", None, baseline=True), bc.Contender("fast", None)]
    return bc.Case("kernels", name, "large", dict(B=2), contenders, None, flops=flops, bytes=nbytes)


def test_ratios_rates_and_merging(tmp_path, monkeypatch):
    env = fb.Environment(torch.device("cpu"), "Test CPU (1 thread)", "torch")
    first = fb.Results(env)
    a = fake_case("a", flops=6e12)
    first.add(a, fb.Result("torch", True, median_s=2.0, min_s=2.0, rounds=3, iterations=1))
    first.add(a, fb.Result("fast", False, median_s=0.5, min_s=0.4, rounds=3, iterations=1))
    results = first.record()["cases"][0]["results"]
    assert results[0]["ratios"] == {} and results[1]["ratios"] == {"torch": 4.0}
    assert (results[0]["tflop_s"], results[1]["tflop_s"]) == (3.0, 12.0)
    assert first.write(tmp_path) == tmp_path / "cpu-test-cpu.json"

    second = fb.Results(env)
    second.add(fake_case("b", nbytes=1e9), fb.Result("torch", True, median_s=0.01, min_s=0.01, rounds=1, iterations=1))
    second.add(fake_case("b", nbytes=1e9), fb.Result("fast", False, skipped="no GPU"))
    record = json.loads(second.write(tmp_path).read_text())
    assert [c["id"] for c in record["cases"]] == ["large-a", "large-b"]  # a kept from the first run
    assert record["cases"][1]["results"][0]["gb_s"] == 100.0
    assert record["cases"][1]["results"][1] == {"contender": "fast", "baseline": False, "skipped": "no GPU",
                                                "date": second.date}  # fmt: skip

    monkeypatch.setattr(fb, "versions", lambda: {"torch": "another"})
    third = fb.Results(env)
    third.add(fake_case("c"), fb.Result("torch", True, median_s=1.0, min_s=1.0, rounds=1, iterations=1))
    assert [c["id"] for c in json.loads(third.write(tmp_path).read_text())["cases"]] == ["large-c"]  # not merged


# -- the pytest-benchmark front end -------------------------------------------------------------------------------


def test_pytest_bench_suite_runs(tmp_path):
    """`python -m pytest bench` on one case (CI runs tests/ only; this keeps bench/ from rotting)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--bench-quick",
           "--bench-models", "large", "-k", "large-gated_residual-", "--bench-out", str(tmp_path / "results"),
           "--benchmark-json", str(tmp_path / "pytest-benchmark.json")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 1 skipped" in done.stdout and "fastsd35 bench: ratios to the baselines" in done.stdout
    record = results_file(tmp_path / "results")
    assert [(c["part"], c["id"]) for c in record["cases"]] == [("kernels", "large-gated_residual")]
    saved = json.loads((tmp_path / "pytest-benchmark.json").read_text())["benchmarks"]
    assert {b["options"]["timer"] for b in saved} == {"synchronized_timer"}
    assert all("median_ms" in b["extra_info"] for b in saved)


# -- interrupted runs ---------------------------------------------------------------------------------------------


def test_an_interrupted_suite_keeps_what_it_measured(tmp_path, monkeypatch):
    """A time limit stops `fastsd35 bench` with SIGINT (bench/gpu_check.sh): the cases measured so far are written."""
    real = fb.run_contender
    done = []

    def stop_at_the_second(case, contender, *args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(contender.name)
        return real(case, contender, *args, **kwargs)

    monkeypatch.setattr(fb, "run_contender", stop_at_the_second)
    logged = []
    with one_thread(), pytest.raises(KeyboardInterrupt):
        fb.run_suite(parts=("kernels",), models=("large",), quick=True, out=tmp_path, log=logged.append)
    record = results_file(tmp_path)
    assert [r["contender"] for c in record["cases"] for r in c["results"]] == done == ["torch", "triton"]
    assert logged[-1] == f"interrupted: wrote what was measured to {tmp_path / (record['device_slug'] + '.json')}"


def test_the_step_cache_part_checks_its_contenders(monkeypatch):
    """`--only cache`: off, threshold 0 (checked to be the same images exactly), the defaults and every skip allowed
    (checked within the cache's tolerance); a cache that reuses garbage fails the check. Not in the default parts."""
    assert "cache" in bc.PARTS and "cache" not in bc.DEFAULT_PARTS
    [case] = bc.build_cases("cpu", ("cache",))
    assert [c.name for c in case.contenders] == ["off", "cache, threshold 0", "cache, default", "cache, every skip"]
    monkeypatch.setattr(bc, "_cached_generate", partial(_fewer_steps, bc._cached_generate))
    with case.inputs() as inputs:
        check = fb.OutputCheck()
        results = [fb.run_contender(case, c, inputs, device="cpu", quick=True, check=check,
                                    timer=lambda fn, **kw: [0.001]) for c in case.contenders]  # fmt: skip
        assert [r.error for r in results] == [None] * 4, [r.error for r in results]
        assert results[1].extra["rel_error"] == 0.0 and results[3].extra["computed"] < results[3].extra["passes"]

        import fastsd35.pipeline.runner as runner

        monkeypatch.setattr(runner.TransformerPass, "reuse", lambda self, head, tail, *, hw: torch.zeros(
            head["x"].shape[0], 16, *hw))  # a reuse that makes nothing of the kept residual
        broken = fb.run_contender(case, case.contenders[3], inputs, device="cpu", quick=True, check=check,
                                  timer=lambda fn, **kw: [0.001])  # fmt: skip
        assert broken.error and "disagrees with off" in broken.error


def _fewer_steps(build, preset, graphs, threshold, tolerance, steps, size, components):
    return build(preset, graphs, threshold, tolerance, 8, 32, components)
