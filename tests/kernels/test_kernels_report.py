"""`fastsd35 kernels` (kernels/report.py) and what the launchers hand the kernels at SD3.5 sizes.

Compiling needs Triton in compiled mode, and the tests run with TRITON_INTERPRET=1 (conftest.py), so the compiles and
the specialization probe run once per module in a subprocess without it. CI runs the quick report: the first variant
of each kernel and load style, bf16, for sm_80 and sm_90 (the full set takes tens of minutes on two cores).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsd35.app import cli
from fastsd35.kernels import checks, report

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"ln_modulate", "gated_residual_ln_modulate", "split_qkv_rmsnorm", "joint_attention"}


def compiled_mode_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    return env


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """The quick report in two compile processes (the pool's workers must end as quietly as they started)."""
    out = tmp_path_factory.mktemp("kernels") / "report.json"
    cmd = [sys.executable, "-m", "fastsd35", "kernels", "--arch", "sm_80,sm_90", "--dtype", "bf16", "--quick",
           "--jobs", "2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=compiled_mode_env(), cwd=ROOT, timeout=600)
    rows = json.loads(out.read_text()) if out.exists() else None
    return proc, rows


def test_quick_report_exits_0_with_every_kernel(quick_report):
    proc, rows = quick_report
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert {"kernel", "arch", "dtype", "config", "registers", "stack_bytes", "shared_bytes", "wgmma", "tma", "ok"} <= set(r)
        assert r["ok"] and r["stack_bytes"] == 0 and r["spill_stores"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= r["shared_limit"], r
    # The table: a header and one line per variant; on stderr what is compiled and the count, nothing else (no
    # worker's traceback when the pool ends its processes).
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["kernel", "arch", "dtype", "config"] and len(lines) == len(rows) + 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and err[0] == f"compiling {len(rows)} kernel variants for sm_80, sm_90 ...", proc.stderr
    assert re.fullmatch(rf"{len(rows)} variants, 0 failed, \d+ s", err[1]), proc.stderr


def test_quick_report_instructions(quick_report):
    """Hopper's attention uses wgmma, Ampere's mma.sync; the TMA form exists on sm_90 only and uses TMA loads."""
    _, rows = quick_report
    attention = [r for r in rows if r["kernel"] == "joint_attention"]
    by_form = {(r["arch"], "USE_TMA=True" in r["config"]): r for r in attention}
    assert set(by_form) == {("sm_80", False), ("sm_90", False), ("sm_90", True)}
    assert by_form["sm_80", False]["mma"] and not by_form["sm_80", False]["wgmma"]
    assert by_form["sm_90", False]["wgmma"] and by_form["sm_90", False]["cp_async"] and not by_form["sm_90", False]["tma"]
    assert by_form["sm_90", True]["wgmma"] and by_form["sm_90", True]["tma"]
    assert not any(r["wgmma"] or r["mma"] for r in rows if r["kernel"] != "joint_attention")


# -- the specialization the launchers give the kernels -------------------------------------------------------------


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "specialization_probe.py")], capture_output=True,
                          text=True, env=compiled_mode_env(), cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_model_launches_keep_divisibility(probe):
    """SD3.5 Large, SD3.5 Medium and SD3 Medium forwards (1024x1024, batch 1 and 2, 154 and 333 context tokens) hand
    every kernel pointers and strides that the JIT specializes as divisible by 16."""
    assert set(probe["launches"]) == {f"_{k}_kernel" for k in KERNELS}
    assert probe["violations"] == []


def test_probe_catches_a_padded_stride(probe):
    """The check can fail: attention outputs with a row stride of D + 8 lose the attribute on exactly those strides."""
    assert probe["planted"] == ["stride_cl", "stride_xl"]


# -- the command's own logic, without compiling ----------------------------------------------------------------------


def _variant(**kw):
    base = dict(kernel="k", arch="sm_90", dtype="bf16", config="c", registers=32, stack_bytes=0, spill_stores=0,
                shared_bytes=0, shared_limit=report.SHARED_LIMIT[90])  # fmt: skip
    v = report.Variant(**{**base, **kw})
    v.ok = not v.problems()
    return v


def test_variant_problems():
    assert _variant().problems() == []
    assert "spills" in _variant(stack_bytes=16).problems()[0]
    assert "spills" in _variant(spill_stores=2).problems()[0]
    assert "shared memory" in _variant(shared_bytes=report.SHARED_LIMIT[90] + 1).problems()[0]
    assert _variant(error="CompilationError: x").problems() == ["CompilationError: x"]


@pytest.mark.parametrize("found, status", [([_variant()], 0), ([_variant(), _variant(stack_bytes=8)], 1)])
def test_exit_status_and_json(monkeypatch, tmp_path, capsys, found, status):
    monkeypatch.setattr(checks, "INTERPRET", False)
    monkeypatch.setattr(report, "plan", lambda archs, dtypes, quick: [])
    monkeypatch.setattr(report, "compile_all", lambda jobs, workers: found)
    out = tmp_path / "r.json"
    assert cli.main(["kernels", "--json", str(out)]) == status
    rows = json.loads(out.read_text())
    assert [r["ok"] for r in rows] == [v.ok for v in found]
    assert ("FAIL: spills" in capsys.readouterr().out) == (status == 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "sm_75"], "--arch 'sm_75': choose from sm_80, sm_90"),
        (["--arch", ""], "--arch '': choose from"),
        (["--dtype", "fp8"], "--dtype 'fp8': choose from fp16, bf16, fp32"),
        (["--jobs", "0"], "--jobs 0: must be at least 1"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    assert cli.main(["kernels", *argv]) == 2
    assert message in capsys.readouterr().err


def _json_targets(tmp_path: Path) -> dict:
    """--json values that cannot be written, and the reason each must give."""
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "r.json")
    proc = {"/proc/r.json": "cannot write in /proc"} if Path("/proc/self").exists() else {}  # even for root
    return proc | {
        str(tmp_path / "dangling"): f"{tmp_path / 'dangling'} is a link to nothing",
        str(tmp_path / "r\0.json"): "a path cannot hold a NUL byte",
        str(tmp_path): "is a folder, not a file",
        str(tmp_path / "missing" / "r.json"): f"the folder {tmp_path / 'missing'} does not exist",
        str(tmp_path / "file" / "r.json"): f"{tmp_path / 'file'} is a file, not a folder",
        str(tmp_path / "fifo"): "is a FIFO, not a file",
        str(tmp_path / ("n" * 300 + ".json")): "",  # the file system's name limit
        str(tmp_path / ("n" * 300) / "r.json"): "",
    }


def test_json_that_cannot_be_written_is_refused_before_compiling(capsys, tmp_path, monkeypatch):
    """Every --json that could not be written at the end is one line and exit 2 before anything is planned or
    compiled (the full report takes minutes), and nothing is created."""
    monkeypatch.setattr(checks, "INTERPRET", False)

    def never(*args, **kwargs):
        raise AssertionError("planned or compiled before --json was checked")

    monkeypatch.setattr(report, "plan", never)
    monkeypatch.setattr(report, "compile_all", never)
    for target, why in _json_targets(tmp_path).items():
        before = sorted(tmp_path.iterdir())
        assert cli.main(["kernels", "--json", target]) == 2, target
        err = capsys.readouterr().err
        assert err.startswith("fastsd35: error: --json ") and err.count("\n") == 1, err
        assert why in err, err
        assert sorted(tmp_path.iterdir()) == before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_compile_workers_do_not_inherit_the_cli_signal_handlers(monkeypatch):
    """The pool ends its workers with SIGTERM when it closes: a worker with the CLI's handler (SIGTERM raises, for the
    clean-up of `fastsd35 run`) printed a traceback then, on every successful run that raced it. Workers take the
    default SIGTERM/SIGHUP and ignore SIGINT (the parent stops the pool)."""
    def probe(job):  # runs in the worker
        return tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT))

    monkeypatch.setattr(report, "_compile", probe)
    with cli.signals_as_interrupts():
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        found = report.compile_all([None] * 4, workers=2)
    assert set(found) == {(signal.SIG_DFL, signal.SIG_DFL, signal.SIG_IGN)}


# A SIGTERM that arrives while the pool forks its workers: sent from an at-fork callback, where a raising handler's
# exception is printed and ignored (the logging module has such a callback): the signal must not be lost.
SIGTERM_WHILE_FORKING = """
import os, signal, sys
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
from fastsd35.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sigterm_while_the_pool_forks_is_not_lost(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-c", SIGTERM_WHILE_FORKING, "kernels", "--arch", "sm_80", "--dtype", "bf16", "--jobs", "2",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=compiled_mode_env(), cwd=ROOT, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 143, lines
    assert lines[1:] == ["fastsd35: SIGTERM received: stopped, nothing partial written"], lines
    assert not out.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sigterm_while_compiling_in_workers(tmp_path):
    """SIGTERM while forked workers compile: one line, exit 143, no worker traceback, no JSON, nothing left running."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "fastsd35", "kernels", "--jobs", "2", "--json", str(out)]  # all 306 variants: minutes
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=compiled_mode_env(), cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    seen, deadline = b"", time.monotonic() + 300
    while not re.search(rb"^compiling .*\n", seen, re.M):  # planned (the whole line): the pool starts its workers
        chunk = proc.stderr.read1(4096)
        assert chunk and time.monotonic() < deadline, seen.decode()
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = (seen + err).decode().strip().splitlines()
    assert proc.returncode == 143, lines
    assert lines[1:] == ["fastsd35: SIGTERM received: stopped, nothing partial written"], lines
    assert not out.exists()
    # The workers are ended with it; a compiler (ptxas) one of them had started finishes its one compile and exits.
    deadline = time.monotonic() + 120
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


def test_refuses_the_interpreter(capsys):
    """Under TRITON_INTERPRET the kernels are not compiled-mode functions: one clear error, not a traceback."""
    assert checks.INTERPRET  # conftest.py asks for the interpreter
    assert cli.main(["kernels"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err


def test_pointer_alignment_follows_the_view():
    """A view's address is the allocation's (512-byte aligned) plus its offset, as on the GPU."""
    base = torch.empty(4, 100, dtype=torch.bfloat16, device="meta")
    assert report._Pointer(base).data_ptr() % 16 == 0
    assert report._Pointer(base[:, 8:]).data_ptr() % 16 == 0  # 16 bytes in
    assert report._Pointer(base[:, 4:]).data_ptr() % 16 == 8


@pytest.fixture(scope="module")
def planned():
    """Every planned variant for sm_80 and sm_90, bf16 and fp32, as [kernel, arch, dtype, config]. (The plan only:
    nothing is compiled. Compiled mode, in a child process: the interpreter has no kernels to plan.)"""
    code = (
        "import json, torch\n"
        "from fastsd35.kernels import report\n"
        "jobs = report.plan([80, 90], [torch.bfloat16, torch.float32])\n"
        "print(json.dumps([[j.variant.kernel, j.variant.arch, j.variant.dtype, j.variant.config] for j in jobs]))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env=compiled_mode_env(), cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_fp8_output_variants_are_planned_for_16_bit_on_fp8_gpus_only(planned):
    """The FP8 path's row kernels (FP8_OUT) are in the report for bf16/fp16 on sm_89+ (the GPUs with FP8 GEMMs), both
    kinds of row op, one and two outputs; never for fp32 (FP8 runs take 16-bit activations) or for sm_80."""
    fp8 = [row for row in planned if "FP8_OUT=True" in row[3]]
    assert {(k, a, d) for k, a, d, _ in fp8} == {("ln_modulate", "sm_90", "bf16"),
                                                 ("gated_residual_ln_modulate", "sm_90", "bf16")}
    assert {"TWO=True" in c for k, _, _, c in fp8 if k == "ln_modulate"} == {True, False}
    assert {"HAS_Y2=True" in c for k, _, _, c in fp8 if k == "gated_residual_ln_modulate"} == {True, False}


def test_every_launch_form_the_model_uses_is_planned(planned):
    """Per arch and dtype, each kernel's constexpr switches (tile sizes and warps aside) take every combination the
    model launches: one and two modulations, the residual with and without y2 and norm, q/k with and without RMSNorm,
    both released hidden sizes (BLOCK_D 2048 for Medium's 1536, 4096 for Large's 2432), TMA on sm_90 16-bit only."""
    def switches(config):
        return tuple(t for t in config.split() if re.fullmatch(r"(BLOCK_D|TWO|HAS_Y2|NORM|NORM_Q|NORM_K|USE_TMA)=\w+", t))

    forms = {}
    for kernel, arch, dtype, config in planned:
        if "FP8_OUT=True" not in config:
            forms.setdefault((kernel, arch, dtype), set()).add(switches(config))
    blocks = ("BLOCK_D=2048", "BLOCK_D=4096")
    for arch in ("sm_80", "sm_90"):
        for dtype in ("bf16", "fp32"):
            assert forms["ln_modulate", arch, dtype] == {(b, f"TWO={t}") for b in blocks for t in (False, True)}
            assert forms["gated_residual_ln_modulate", arch, dtype] == {
                (b, f"HAS_Y2={y2}", f"NORM={norm}") for b in blocks for y2, norm in ((False, False), (False, True), (True, True))
            }
            assert forms["split_qkv_rmsnorm", arch, dtype] == {("NORM_K=False", "NORM_Q=False"), ("NORM_K=True", "NORM_Q=True")}
            tma = arch == "sm_90" and dtype == "bf16"
            assert forms["joint_attention", arch, dtype] == {("USE_TMA=False",)} | ({("USE_TMA=True",)} if tma else set())
