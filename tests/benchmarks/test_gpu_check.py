"""bench/gpu_check.sh on a machine without a GPU: its plan, its arguments, and its run of the parts with a stand-in
Python that plays a GPU machine (every part's command recorded, some failing or stopped at their limit), down to the
summary table it ends with (fastsd35.benchmarks.summary)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsd35.app import cli
from fastsd35.benchmarks import summary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["kernels-report", "step", "attention", "fp8", "tests", "e2e"]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the script's CPU behaviour; on a GPU it runs minutes")


def run(*args, cwd, python=sys.executable, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHON=str(python), OMP_NUM_THREADS="1", **env))  # fmt: skip


def planned(stdout: str) -> dict:
    """{part: (time limit, command)} of the lines '== part (timeout Ns): command'."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("== ") and "(timeout " in line:
            head, command = line.split("): ", 1)
            found[head.split()[1]] = (int(head.split("(timeout ")[1].rstrip("s")), command)
    return found


def test_dry_run_is_the_five_minute_plan_with_the_large_step_first(tmp_path):
    """The compile report warms the cache, then the Large step; every part's limit fits 300 s less the 20 s kept for
    start-ups and the summary; nothing is written."""
    before = sorted((ROOT / "bench" / "results").iterdir())
    plan = run("--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    parts = planned(plan.stdout)
    assert list(parts) == PARTS
    assert "plan: 6 parts in 280s of the 300s budget" in plan.stdout
    assert sum(limit for limit, _ in parts.values()) <= 280
    assert "-m fastsd35 kernels --arch sm_XX --dtype bf16 --jobs " in parts["kernels-report"][1]
    assert parts["step"][1].endswith("--only transformer --models large --cases large-step-B2 "
                                     "--contenders torch,fastsd35,fastsd35+graphs")  # fmt: skip
    assert parts["attention"][1].endswith("--only kernels --models large,medium --cases joint_attention,x_attention")
    assert parts["fp8"][1].endswith("--cases large-step-B2 --contenders torch,fastsd35+graphs+fp8")
    assert "-m pytest -q -p no:cacheprovider -m gpu tests --junitxml " in parts["tests"][1]
    assert parts["e2e"][1].endswith("--only e2e")
    assert sorted((ROOT / "bench" / "results").iterdir()) == before

    bigger = planned(run("--dry-run", "--budget=600", cwd=tmp_path).stdout)  # --budget raises every part's share
    assert all(bigger[p][0] > parts[p][0] for p in PARTS) and sum(v[0] for v in bigger.values()) <= 580
    smaller = planned(run("--dry-run", "--budget", "0120", cwd=tmp_path).stdout)  # leading zeros: decimal
    assert sum(v[0] for v in smaller.values()) <= 100 and all(v[0] >= 10 for v in smaller.values())


def test_the_planned_bench_commands_are_valid(monkeypatch, tmp_path):
    """Each `fastsd35 bench` command of the plan passes the command's own checks (parts, cases, contenders, --out)."""
    plan = run("--dry-run", "--out", str(tmp_path / "results"), cwd=tmp_path)
    calls = []
    monkeypatch.setattr("fastsd35.benchmarks.suite.run_suite", lambda **kw: calls.append(kw) or ({"cases": []}, None))
    monkeypatch.setattr("fastsd35.benchmarks.suite.format_table", lambda record: "")
    for part in ("step", "attention", "fp8", "e2e"):
        argv = planned(plan.stdout)[part][1].split(" -m fastsd35 ", 1)[1].split()
        assert cli.main(argv) == 0, part
    assert [(c["parts"], c["cases"], c["contenders"]) for c in calls] == [
        (("transformer",), ("large-step-B2",), ("torch", "fastsd35", "fastsd35+graphs")),
        (("kernels",), ("joint_attention", "x_attention"), None),
        (("transformer",), ("large-step-B2",), ("torch", "fastsd35+graphs+fp8")),
        (("e2e",), None, None),
    ]


def test_without_cuda_every_part_is_skipped(tmp_path):
    plain = run("--out", str(tmp_path / "out"), cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    skipped = [line for line in plain.stdout.splitlines() if line.startswith("== skipped ")]
    assert [line.split()[2] for line in skipped] == [f"{p}:" for p in PARTS]
    assert all(line.endswith("no CUDA device (torch.cuda.is_available() is False)") for line in skipped)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--budget", "08"], "got '08'"),  # bash would read it as octal
    (["--budget", "99999999999999999999999"], "got '99999999999999999999999'"),
    (["--budget", ""], "got ''"),
    (["--budget"], "--budget needs a value"),
    (["--budget", "-5"], "got '-5'"),
    (["--budget", "1e3"], "got '1e3'"),
    (["--budget", " 300"], "got ' 300'"),
    (["--budget", "300\n"], "got '300\n'"),
    (["--budget", "59"], "got '59'"),
    (["--budget", "86401"], "got '86401'"),
    (["--budget=soon"], "got 'soon'"),
    (["--out"], "--out needs a folder"),
    (["--out", ""], "--out needs a folder"),
    (["--fast"], "unknown argument '--fast'"),
])  # fmt: skip
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    """The whole class: a budget that is not whole seconds in [60, 86400] (octal-looking, huge, empty, missing,
    negative, not a number, padded) and the other arguments: one line on stderr, exit 2, nothing run or written."""
    done = run("--dry-run", *args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.startswith("gpu_check.sh: ") and message in done.stderr, done.stderr
    if "\n" not in message:
        assert done.stderr.count("\n") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


# -- a run of the parts, with a stand-in GPU machine ----------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# A GPU machine for gpu_check.sh: what it asks Python, answered; each part's command recorded, and played.
printf '%s\\n' "$*" >> "$FAKE_LOG"
if [ "$1" = - ]; then cat > /dev/null; echo "yes sm_80,sm_90"; echo "cuda sm_90 fake-gpu Fake GPU 80GB"; exit 0; fi
case "$*" in
  *fastsd35.benchmarks.summary*) exec "$REAL_PYTHON" "$@" ;;
  *" kernels --arch "*) cp "$FAKE_DIR/kernels.json" "$OUT_DIR/fake-gpu-kernels.json" ;;
  *"--cases joint_attention"*) exit 124 ;;  # as `timeout` reports a part stopped at its limit
  *" pytest "*) cp "$FAKE_DIR/tests.xml" "$OUT_DIR/fake-gpu-gpu-tests.xml"; exit 1 ;;
  *"--contenders torch,fastsd35,fastsd35+graphs"*) cp "$FAKE_DIR/results.json" "$OUT_DIR/fake-gpu.json" ;;
esac
exit 0
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="30"><testcase classname="tests.kernels.test_kernels_attention" name="test_real_size_gpu"><failure
message="boom"/></testcase></testsuite></testsuites>"""


def fake_results(date: str) -> dict:
    def result(contender, median, baseline=False, ratios=None, **extra):
        r = {"contender": contender, "baseline": baseline, "median_ms": median, "min_ms": median, "rounds": 10,
             "iterations": 1, "first_ms": 10 * median, "tflop_s": 1000 / median, "peak_mem_gib": 17.25,
             "ratios": ratios or {}, "date": date}  # fmt: skip
        return r | ({"extra": extra} if extra else {})

    step = {"part": "transformer", "id": "large-step-B2", "name": "step", "model": "large",
            "shape": {"B": 2, "latent": "128x128", "ctx": 154}, "date": date, "baselines": ["torch"],
            "results": [result("torch", 600.0, True), result("fastsd35", 450.0, ratios={"torch": 600 / 450}),
                        result("fastsd35+graphs", 400.0, ratios={"torch": 1.5}),
                        result("fastsd35+graphs+fp8", 300.0, ratios={"torch": 2.0}, rel_error=0.071, tolerance=0.19),
                        {"contender": "diffusers", "baseline": True, "skipped": "diffusers not installed",
                         "date": date},
                        result("old", 1.0, date="2020-01-01T00:00:00+00:00")]}  # fmt: skip
    step["results"][-1]["date"] = "2020-01-01T00:00:00+00:00"  # an earlier run's: not this check's
    return {"device": "Fake GPU 80GB", "versions": {"fastsd35": "0.1.0", "torch": "2.11.0", "cuda": "12.8",
                                                    "triton": "3.6.0", "python": "3.12.3", "diffusers": None},
            "cases": [step]}  # fmt: skip


def test_a_run_records_every_part_and_ends_with_the_summary(tmp_path):
    """All six parts run in order, each under its limit; a part stopped at its limit or failing does not stop the
    next ones; the summary shows what was measured in this run (not an earlier run's figures) and what failed; the
    exit status is 1."""
    fake, out = tmp_path / "fake", tmp_path / "results"
    fake.mkdir()
    out.mkdir()
    python = fake / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (fake / "kernels.json").write_text(json.dumps([{"kernel": "joint_attention", "arch": "sm_90", "dtype": "bf16",
                                                    "config": "c", "registers": 220, "ok": True}] * 78))
    (fake / "tests.xml").write_text(JUNIT)
    (fake / "results.json").write_text(json.dumps(fake_results("2099-01-01T00:00:00+00:00")))
    log = tmp_path / "calls.txt"
    done = run("--out", str(out), cwd=tmp_path, python=python, FAKE_LOG=str(log), FAKE_DIR=str(fake),
               OUT_DIR=str(out), REAL_PYTHON=sys.executable)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 8 and calls[0] == "-" and "fastsd35.benchmarks.summary" in calls[-1]
    assert ["kernels --arch sm_90" in calls[1], "large-step-B2 --contenders torch,fastsd35," in calls[2],
            "joint_attention" in calls[3], "fastsd35+graphs+fp8" in calls[4], "-m gpu tests" in calls[5],
            "--only e2e" in calls[6]] == [True] * 6  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[-3:] == ["gpu_check.sh: done in " + lines[-3].split(" in ")[1], "  FAILED attention: stopped at its "
                          + lines[-2].split(" at its ")[1], "  FAILED tests: exit status 1"]  # fmt: skip
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| part | case | contender | median ms | rate | vs baseline | first call ms | notes |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [(r[0], r[2]) for r in rows] == [("kernels-report", "78 variants"), ("step", "torch"), ("step", "fastsd35"),
                                            ("step", "fastsd35+graphs"), ("step", "diffusers"),
                                            ("fp8", "fastsd35+graphs+fp8"), ("tests", "")]  # fmt: skip
    assert rows[3][3:6] == ["400.0", "2.5 TFLOP/s", "1.50x torch"] and rows[1][5] == "baseline"
    assert "skipped: diffusers not installed" in rows[4][7]
    assert "error 7.10% (tolerance 19.0%)" in rows[5][7]
    assert rows[6][7] == "27 passed, 1 failed, 2 skipped; FAILED tests.kernels.test_kernels_attention::test_real_size_gpu"
    assert rows[0][7] == "0 failed; at most 220 registers"
    parts = [line for line in lines if line.startswith("Parts: ")][0]
    assert "kernels-report ok (0 s of 35 s)" in parts and "attention stopped at its " in parts and "tests exit status 1 (" in parts
    assert lines[0].startswith("gpu_check.sh on Fake GPU 80GB (sm_90)")
    assert (out / "fake-gpu-gpu-check.log").read_text().splitlines()[0] == lines[0]


def test_summary_without_inputs_says_nothing_was_measured(tmp_path):
    text = summary.summary(tmp_path / "missing.json", tmp_path / "k.json", tmp_path / "t.xml", tmp_path / "p.tsv")
    assert "| - | nothing was measured | | | | | | |" in text


def test_summary_leaves_out_an_earlier_checks_files(tmp_path):
    """A compile report or test file written before this check started (its part skipped or stopped this time) is
    not shown as this check's."""
    kernels, tests = tmp_path / "k.json", tmp_path / "t.xml"
    kernels.write_text(json.dumps([{"kernel": "k", "arch": "sm_90", "dtype": "bf16", "ok": True, "registers": 1}]))
    tests.write_text(JUNIT)
    os.utime(kernels, (1e9, 1e9))
    os.utime(tests, (1e9, 1e9))
    text = summary.summary(None, kernels, tests, since="2020-01-01T00:00:00Z")
    assert "nothing was measured" in text
    text = summary.summary(None, kernels, tests, since="2000-01-01T00:00:00Z")
    assert "| kernels-report | compile report sm_90 bf16 | 1 variants |" in text and "| tests | pytest -m gpu |" in text
