"""The one table `bench/gpu_check.sh` ends with: what its parts measured, as Markdown to paste into README as it is.

    python -m fastsd35.benchmarks.summary --results bench/results/<device>.json --kernels <device>-kernels.json \
        --tests <device>-gpu-tests.xml --parts <device>-gpu-check-parts.tsv --since 2025-01-01T00:00:00Z

Every input may be missing (a part that was skipped or stopped before writing): what is there is shown, and the
parts' outcomes (ok, stopped at its limit, its exit status, skipped) say why the rest is not. Only what was measured
since `--since` (the check's start) is shown: a results file keeps older runs' figures beside them, and the compile
report and test files of an earlier check are left where they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# gpu_check.sh's parts, in its order, and which of them a result of the results file belongs to.
PARTS = ("kernels-report", "step", "attention", "fp8", "tests", "e2e")


def check_part(case: dict, result: dict) -> str:
    if case["part"] == "kernels":
        return "attention"
    if case["part"] == "transformer":
        return "fp8" if "fp8" in result["contender"] else "step"
    return case["part"]


def _when(text) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _load_json(path: Path | None):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _rate(r: dict) -> str:
    for key, unit in (("tflop_s", "TFLOP/s"), ("gb_s", "GB/s"), ("images_per_s", "images/s")):
        if r.get(key):
            return f"{r[key]:.3g} {unit}"
    return ""


def _case_label(case: dict) -> str:
    shape = " ".join(f"{k}={v}" for k, v in case["shape"].items())
    return f"{case['model']} {case['name']} ({shape})"


def result_rows(record: dict | None, since: datetime.datetime | None) -> list[list[str]]:
    """One row per result measured since `since`: part, case, contender, median, rate, ratios, first call, notes."""
    rows = []
    for case in (record or {}).get("cases", []):
        for r in case.get("results", []):
            when = _when(r.get("date", case.get("date")))
            if since is not None and (when is None or when < since):
                continue
            part, extra = check_part(case, r), r.get("extra", {})
            notes = []
            if "error" in r:
                notes.append(f"FAILED: {r['error']}")
            elif "median_ms" not in r:
                notes.append(f"skipped: {r.get('skipped')}")
            if "eager_ms" in extra:
                notes.append(f"eager {_ms(extra['eager_ms'])} ms (launch +{extra['launch_overhead_us']:.0f} us)")
            if "stages_ms" in extra:
                notes.append(", ".join(f"{k} {_ms(v)}" for k, v in extra["stages_ms"].items()) + " ms")
            if "rel_error" in extra:
                limit = f" (tolerance {100 * extra['tolerance']:.1f}%)" if "tolerance" in extra else ""
                notes.append(f"error {100 * extra['rel_error']:.2f}%{limit}")
            if r.get("peak_mem_gib"):
                notes.append(f"peak {r['peak_mem_gib']:.1f} GiB")
            ratios = ", ".join(f"{v:.2f}x {b}" for b, v in r.get("ratios", {}).items())
            vs = "baseline" if r.get("baseline") and not ratios else ratios
            median = _ms(r["median_ms"]) if "median_ms" in r else "-"
            first = _ms(r["first_ms"]) if "first_ms" in r and case["part"] != "kernels" else ""
            rows.append([part, _case_label(case), r["contender"], median, _rate(r), vs, first, "; ".join(notes)])
    return sorted(rows, key=lambda row: PARTS.index(row[0]))  # stable: the results file's order within a part


def kernel_row(variants) -> list[str] | None:
    if not isinstance(variants, list) or not variants:
        return None
    failed = [v for v in variants if not v.get("ok")]
    archs = ", ".join(sorted({v.get("arch", "?") for v in variants}))
    dtypes = ", ".join(sorted({v.get("dtype", "?") for v in variants}))
    registers = max((v.get("registers") or 0 for v in variants), default=0)
    note = f"{len(failed)} failed" + "".join(f"; FAILED {v.get('kernel')} {v.get('config')}: {v.get('error') or 'spills'}"
                                             for v in failed[:3])  # fmt: skip
    return ["kernels-report", f"compile report {archs} {dtypes}", f"{len(variants)} variants", "", "", "", "",
            f"{note}; at most {registers} registers"]


def test_row(path: Path | None) -> list[str] | None:
    """The gpu tests' counts (and the first failures) from pytest's JUnit XML."""
    try:
        root = ElementTree.parse(path).getroot() if path else None
    except (OSError, ElementTree.ParseError):
        return None
    if root is None:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    note = f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"
    note += "".join(f"; FAILED {name}" for name in bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
    return ["tests", "pytest -m gpu", "", "", "", "", "", note]


def part_lines(path: Path | None) -> list[str]:
    """gpu_check.sh's record of each part it ran: "part outcome (N s of M s)"."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path else []
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split("\t")
        if len(fields) == 4:
            part, outcome, took, limit = fields
            out.append(f"{part} {outcome} ({took} s of {limit} s)")
    return out


def _fresh(path: Path | None, since: datetime.datetime | None) -> Path | None:
    """`path` when it was written at or after `since` (an earlier check's file is not this one's), else None."""
    try:
        written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc) if path else None
    except OSError:
        return None
    return path if written is not None and (since is None or written >= since) else None


def summary(results: Path | None, kernels: Path | None = None, tests: Path | None = None, parts: Path | None = None,
            since: str | None = None, budget: int | None = None) -> str:
    record = _load_json(results)
    start = _when(since) if since else None
    rows = result_rows(record if isinstance(record, dict) else None, start)
    extra_rows = [row for row in (kernel_row(_load_json(_fresh(kernels, start))), test_row(_fresh(tests, start))) if row]
    rows = sorted(extra_rows + rows, key=lambda row: PARTS.index(row[0]))
    head = []
    if isinstance(record, dict):
        v = record.get("versions", {})
        head.append(f"**{record.get('device', '?')}**: fastsd35 {v.get('fastsd35')}, torch {v.get('torch')} (CUDA "
                    f"{v.get('cuda')}), triton {v.get('triton')}, Python {v.get('python')}, diffusers "
                    f"{v.get('diffusers') or 'not installed'}")  # fmt: skip
    head.append(f"`bash bench/gpu_check.sh`{f' of {since}' if since else ''}{f', budget {budget} s' if budget else ''}; "
                "ratios: the baseline's median time over the contender's, measured in the same run")  # fmt: skip
    table = ["| part | case | contender | median ms | rate | vs baseline | first call ms | notes |",
             "|---|---|---|---:|---:|---|---:|---|"]  # fmt: skip
    table += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    if not rows:
        table.append("| - | nothing was measured | | | | | | |")
    done = part_lines(parts)
    tail = ["", "Parts: " + "; ".join(done)] if done else []
    return "\n".join(["\n\n".join(head), "", *table, *tail])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsd35.benchmarks.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="bench/results/<device>.json")
    parser.add_argument("--kernels", type=Path, help="the compile report's JSON")
    parser.add_argument("--tests", type=Path, help="the gpu tests' JUnit XML")
    parser.add_argument("--parts", type=Path, help="gpu_check.sh's parts file (part, outcome, seconds, limit)")
    parser.add_argument("--since", help="show results measured at or after this ISO time")
    parser.add_argument("--budget", type=int, help="the check's budget in seconds (shown)")
    args = parser.parse_args(argv)
    print(summary(args.results, args.kernels, args.tests, args.parts, args.since, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
