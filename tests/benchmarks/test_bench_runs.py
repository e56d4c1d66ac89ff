"""`fastsd35 bench` runs that are cut short or split: outputs checked before anything is measured, the results file
rewritten after every contender, `--cases`/`--contenders` picking what runs, and runs merged contender by contender."""

import contextlib
import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from fastsd35.app import cli
from fastsd35.benchmarks import cases as bc
from fastsd35.benchmarks import suite as fb

ENV = fb.Environment(torch.device("cpu"), "Test CPU (1 thread)", "torch")


@contextlib.contextmanager
def constant(value, inputs):
    yield bc.Prepared(lambda: torch.full((4,), value))


def fake_case(name="op", contenders=("torch", "fast", "fp8")):
    made = [bc.Contender(c, partial(constant, 1.0), baseline=i == 0) for i, c in enumerate(contenders)]
    return bc.Case("kernels", name, "large", dict(B=1), made, contextlib.nullcontext, bytes=16)


def never(*args, **kwargs):
    raise AssertionError("measured before the outputs were checked")


# -- outputs checked first ----------------------------------------------------------------------------------------


def bad_outs(tmp_path: Path) -> dict:
    """--out values that could not take the results, and what the one line must say."""
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    taken = tmp_path / "taken"
    (taken / f"{fb.detect_environment('cpu').slug}.json").mkdir(parents=True)  # the results file's name is a folder
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    proc = {Path("/proc/fastsd35-bench"): "cannot write in /proc"} if Path("/proc/self").exists() else {}
    return proc | {
        tmp_path / "dangling": f"{tmp_path / 'dangling'} is a link to nothing",
        tmp_path / "a\0b": "a path cannot hold a NUL byte",
        tmp_path / "dangling" / "sub": f"{tmp_path / 'dangling'} is a link to nothing",
        tmp_path / "file": "is a file, not a folder",
        tmp_path / "fifo": "is a FIFO, not a folder",
        tmp_path / "file" / "sub": f"{tmp_path / 'file'} is a file, not a folder",
        tmp_path / ("n" * 300) / "x": "longer than the file system's limit",
        tmp_path.joinpath(*["d" * 200] * 21): "the path is longer than the system's limit",
        taken: "is a folder, not a file",
    }


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """Every --out that would fail at the end of the suite is one line, exit 2, before anything runs, and nothing is
    made or changed."""
    monkeypatch.setattr(fb, "run_contender", never)
    for out, why in bad_outs(tmp_path).items():
        before = sorted(p for p in tmp_path.rglob("*"))
        assert cli.main(["bench", "--only", "kernels", "--models", "large", "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("fastsd35: error: --out ") and err.count("\n") == 1 and why in err, err
        assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fb, "run_contender", never)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(["bench", "--only", "kernels", "--out", str(locked / "new")]) == 2
    assert "cannot write in" in capsys.readouterr().err


# -- written as it goes -------------------------------------------------------------------------------------------


def test_results_are_written_after_every_contender(tmp_path, monkeypatch):
    """A run killed outright (SIGKILL after a time limit's grace) keeps every contender measured before it: when
    contender k starts, the file already holds the k before it."""
    case = fake_case()
    monkeypatch.setattr(fb, "build_cases", lambda device, parts, models: [case])
    monkeypatch.setattr(fb, "detect_environment", lambda device=None: ENV)
    real, seen = fb.run_contender, []

    def run(case, contender, *args, **kwargs):
        path = tmp_path / f"{ENV.slug}.json"
        seen.append([r["contender"] for c in json.loads(path.read_text())["cases"] for r in c["results"]]
                    if path.exists() else [])  # fmt: skip
        return real(case, contender, *args, **kwargs)

    monkeypatch.setattr(fb, "run_contender", run)
    fb.run_suite(parts=("kernels",), out=tmp_path, quick=True)
    assert seen == [[], ["torch"], ["torch", "fast"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_results_file_that_cannot_be_written_mid_run_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fb, "build_cases", lambda device, parts, models: [fake_case()])
    monkeypatch.setattr(fb, "detect_environment", lambda device=None: ENV)
    monkeypatch.setattr(fb.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(fb.FastSD35Error, match=r"cannot write the results to .*cpu-test-cpu.json: No space left"):
        fb.run_suite(parts=("kernels",), out=tmp_path, quick=True)
    assert list(tmp_path.iterdir()) == []


# -- what runs, and merging -----------------------------------------------------------------------------------------


def test_select_cases_and_contenders():
    one, two = fake_case("a"), fake_case("b", ("torch", "other"))
    assert [(c.name, [x.name for x in run]) for c, run in fb.select([one, two])] == [
        ("a", ["torch", "fast", "fp8"]), ("b", ["torch", "other"])]  # fmt: skip
    assert [(c.name, [x.name for x in run]) for c, run in fb.select([one, two], ("large-b",), ("other", "fp8"))] == [
        ("b", ["other"])]  # fmt: skip
    assert [c.name for c, _ in fb.select([one, two], ("a", "b"), ("fp8",))] == ["a"]  # b has no fp8: dropped


def test_cli_runs_only_the_cases_and_contenders_named(tmp_path, capsys):
    """The CPU's reduced Large step, the reference ops alone: one case, one result, in the file and the table."""
    out = tmp_path / "new" / "results"
    assert cli.main(["bench", "--only", "transformer", "--models", "large", "--cases", "large-step-B2",
                     "--contenders", "torch", "--quick", "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(next(out.glob("*.json")).read_text())
    assert [(c["id"], [r["contender"] for r in c["results"]]) for c in record["cases"]] == [("large-step-B2", ["torch"])]
    assert record["cases"][0]["results"][0]["median_ms"] > 0
    assert "transformer step [large]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--cases", "large-step-B3"], "--cases 'large-step-B3': choose from "),
    (["--cases", ","], "--cases ',': choose from "),
    (["--contenders", "torch,tensorrt"], "--contenders 'torch,tensorrt': choose from torch, triton, diffusers, fastsd35,"),
    (["--cases", "large-step-B2", "--contenders", "triton"],
     "--cases large-step-B2 with --contenders triton: no case has those contenders"),
])  # fmt: skip
def test_bad_case_and_contender_names(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(fb, "run_contender", never)
    assert cli.main(["bench", "--only", "transformer,kernels", "--models", "large", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastsd35: error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_runs_merge_contender_by_contender(tmp_path, monkeypatch):
    """The step, then the FP8 step with its baseline measured again: the file holds the newest result of every
    contender in the case's order, each with the date and ratios of the run that measured it."""
    case = fake_case()
    first = fb.Results(ENV)
    first.date = "2025-01-01T00:00:00+00:00"
    first.add(case, fb.Result("torch", True, median_s=2.0, min_s=2.0, rounds=1, iterations=1))
    first.add(case, fb.Result("fast", False, median_s=1.0, min_s=1.0, rounds=1, iterations=1))
    first.write(tmp_path)
    second = fb.Results(ENV)
    second.date = "2025-01-01T00:05:00+00:00"
    second.add(case, fb.Result("torch", True, median_s=4.0, min_s=4.0, rounds=1, iterations=1))
    second.add(case, fb.Result("fp8", False, median_s=1.0, min_s=1.0, rounds=1, iterations=1))
    results = json.loads(second.write(tmp_path).read_text())["cases"][0]["results"]
    assert [(r["contender"], r["date"][14:16], r["ratios"]) for r in results] == [
        ("torch", "05", {}), ("fast", "00", {"torch": 2.0}), ("fp8", "05", {"torch": 4.0})]  # fmt: skip
