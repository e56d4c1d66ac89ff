"""Mutation testing: plant one small bug at a time in the core modules and check that the tests catch it.

    python tools/mutation.py                        # every core module, up to 40 mutants each
    python tools/mutation.py --module sampling.py   # one module (a path under fastsd35/, or its file name)
    python tools/mutation.py --list                 # show the mutants without running anything
    python tools/mutation.py --sample 0             # every mutant (slow: minutes per module)
    python tools/mutation.py --module sampling.py --tests tests/pipeline/test_sampling.py   # only the module's own tests

How it works. Each module's source is parsed with `ast` and every place a realistic single-point bug could go is
listed: an arithmetic operator swapped (+ -, * /, // /, ** *), a comparison moved across its boundary (< <=, > >=,
== !=, is / is not, in / not in), `and` / `or` swapped, a `not` dropped, a number nudged (0 -> 1, n -> n + 1,
x -> 2x for floats), True / False flipped, a statement that only calls something (an in-place update, a check, a
`copy_`) replaced by `pass`, and a `raise` removed. Strings (messages, keys) are never mutated. A line ending in
`# pragma: no mutate` is skipped.

A deterministic sample of the mutants (`--sample`, `--seed`) is applied one at a time to a scratch copy of the
repository (the working tree is never touched). First the module's tests (MODULES below) run once under coverage
with per-test contexts (pytest-cov), which maps each line to the tests that execute it; then each mutant runs only
the tests covering its line, with `-x`. A line that no test runs in the pytest process (code a test runs in a child
process: the kernel report's cases, the torchrun ranks) gets the module's whole test list instead. A mutant is
*killed* when its tests fail or time out, *survived* when they pass. The report gives the score per module and every
survivor with its line, so each can be judged: a real gap (write the test) or an equivalent mutant (say why).

It does not run in CI (a run takes minutes per module on 2 cores): run it before closing work on a core module.
Needs pytest-cov: `pip install -e ".[test,dev]"`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# core module -> the tests that guard it (run with -x, in this order: fastest and most specific first)
MODULES: dict[str, list[str]] = {
    "fastsd35/pipeline/sampling.py": ["tests/pipeline/test_sampling.py", "tests/pipeline/test_runner.py"],
    "fastsd35/pipeline/runner.py": ["tests/pipeline/test_runner.py", "tests/pipeline/test_inputs.py",
                                    "tests/tiny/test_tiny_preset.py", "tests/app/test_cli.py",
                                    "tests/weights/test_fp8_files.py", "tests/weights/test_lora.py"],
    "fastsd35/pipeline/graphs.py": ["tests/pipeline/test_graphs.py", "tests/pipeline/test_caching.py"],
    "fastsd35/pipeline/caching.py": ["tests/pipeline/test_caching.py", "tests/pipeline/test_distributed.py"],
    "fastsd35/pipeline/control.py": ["tests/models/test_controlnet.py"],
    "fastsd35/app/jobs.py": ["tests/app/test_jobs.py", "tests/app/test_cli.py", "tests/pipeline/test_inputs.py",
                             "tests/pipeline/test_hub.py", "tests/pipeline/test_memory.py", "tests/weights/test_lora.py",
                             "tests/pipeline/test_distributed.py"],
    "fastsd35/app/outputs.py": ["tests/app/test_outputs.py", "tests/app/test_cli.py"],
    "fastsd35/weights/checkpoints.py": ["tests/weights/test_checkpoints.py", "tests/weights/test_checkpoint_headers.py",
                                       "tests/models/test_mmditx.py", "tests/weights/test_fp8_files.py"],
    "fastsd35/weights/controlnet.py": ["tests/models/test_controlnet.py"],
    "fastsd35/models/mmditx.py": ["tests/models/test_mmditx.py", "tests/models/test_fp8_layers.py"],
    "fastsd35/models/controlnet.py": ["tests/models/test_controlnet.py"],
    "fastsd35/tiny/scenes.py": ["tests/tiny/test_scenes.py"],
    "fastsd35/tiny/autoencoder.py": ["tests/tiny/test_train.py"],
    # the kernels' report cases (`@report_case`) run only in the compile report's child process: test_kernels_report
    "fastsd35/kernels/fused_adaln_modulate.py": ["tests/kernels/test_kernels_adaln.py", "tests/kernels/test_kernels_adaln_fp8.py",
                                                 "tests/kernels/test_kernels_degenerate.py",
                                                 "tests/kernels/test_kernels_report.py"],
    "fastsd35/kernels/rmsnorm_qk.py": ["tests/kernels/test_kernels_rmsnorm_qk.py", "tests/kernels/test_kernels_degenerate.py",
                                       "tests/kernels/test_kernels_report.py"],
    "fastsd35/kernels/joint_attention.py": ["tests/kernels/test_kernels_attention.py",
                                            "tests/kernels/test_kernels_degenerate.py",
                                            "tests/kernels/test_kernels_report.py"],
    "fastsd35/kernels/reference.py": ["tests/kernels/test_kernels_degenerate.py", "tests/kernels/test_kernels_adaln.py",
                                      "tests/kernels/test_kernels_rmsnorm_qk.py", "tests/kernels/test_kernels_attention.py",
                                      "tests/models/test_mmditx.py"],
}

_BINOP_SWAPS = {ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/", ast.Pow: "*",
                ast.Mod: "//"}  # fmt: skip
_BINOP_TOKENS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**",
                 ast.Mod: "%"}  # fmt: skip
_CMP_SWAPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
              ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
              ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    kind: str
    start: int  # character offsets into the module's source
    end: int
    replacement: str
    before: str  # the text replaced, for the report

    def apply(self, source: str) -> str:
        return source[: self.start] + self.replacement + source[self.end :]

    def describe(self, source: str) -> str:
        line = source.splitlines()[self.line - 1].strip()
        return f"{self.module}:{self.line}: {self.kind}: {self.before!r} -> {self.replacement!r}   | {line}"


class _Finder(ast.NodeVisitor):
    def __init__(self, module: str, source: str):
        self.module, self.source = module, source
        lines = source.splitlines(keepends=True)
        self.line_starts = [0]
        for text in lines:
            self.line_starts.append(self.line_starts[-1] + len(text))
        self.skipped_lines = {i + 1 for i, text in enumerate(lines) if "pragma: no mutate" in text}
        self.docstrings: set[int] = set()
        self.mutants: list[Mutant] = []

    def offset(self, line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets; our sources are ASCII apart from comments and strings, which we never
        # mutate, so byte and character offsets agree wherever a mutant goes.
        return self.line_starts[line - 1] + col

    def add(self, node, kind: str, start: int, end: int, replacement: str):
        if node.lineno in self.skipped_lines:
            return
        self.mutants.append(Mutant(self.module, node.lineno, kind, start, end, replacement, self.source[start:end]))

    def span(self, node) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    # -- operators ------------------------------------------------------------------------------------------------

    def _token_between(self, left, right, token: str) -> int | None:
        """Offset of `token` in the source between the end of `left` and the start of `right` (comments aside)."""
        a, b = self.span(left)[1], self.span(right)[0]
        text = self.source[a:b]
        i = text.find(token)
        while i >= 0:
            # `*` must not be half of `**`, `/` not half of `//`
            after = text[i + len(token) : i + len(token) + 1]
            before = text[i - 1 : i] if i else ""
            if token in "*/" and (after == token or before == token):
                i = text.find(token, i + 2)
                continue
            return a + i
        return None

    def visit_BinOp(self, node):
        op = type(node.op)
        if op in _BINOP_SWAPS:
            token = _BINOP_TOKENS[op]
            at = self._token_between(node.left, node.right, token)
            if at is not None:
                self.add(node, "operator", at, at + len(token), _BINOP_SWAPS[op])
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        op = type(node.op)
        if op in _BINOP_SWAPS:
            token = _BINOP_TOKENS[op] + "="
            at = self._token_between(node.target, node.value, token)
            if at is not None:
                self.add(node, "operator", at, at + len(token), _BINOP_SWAPS[op] + "=")
        self.generic_visit(node)

    def visit_Compare(self, node):
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            swap = _CMP_SWAPS.get(type(op))
            if swap:
                a, b = self.span(left)[1], self.span(right)[0]
                text = self.source[a:b]
                i = text.find(swap[0])
                if i >= 0:
                    self.add(node, "comparison", a + i, a + i + len(swap[0]), swap[1])
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        token, other = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        for left, right in zip(node.values, node.values[1:]):
            a, b = self.span(left)[1], self.span(right)[0]
            i = self.source[a:b].find(token)
            if i >= 0:
                self.add(node, "boolean", a + i, a + i + len(token), other)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            start = self.span(node)[0]
            after = len(self.source[start + 3 :]) - len(self.source[start + 3 :].lstrip(" "))
            self.add(node, "not dropped", start, start + 3 + after, "")
        self.generic_visit(node)

    # -- constants ------------------------------------------------------------------------------------------------

    def visit_Constant(self, node):
        value = node.value
        start, end = self.span(node)
        if isinstance(value, bool):
            self.add(node, "constant", start, end, str(not value))
        elif isinstance(value, int):
            self.add(node, "constant", start, end, "1" if value == 0 else str(value + 1))
        elif isinstance(value, float):
            self.add(node, "constant", start, end, "1.0" if value == 0 else repr(value * 2))

    # -- statements -----------------------------------------------------------------------------------------------

    def _body(self, body):
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            self.docstrings.add(id(body[0]))

    def visit_Module(self, node):
        self._body(node.body)
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        self._body(node.body)
        # decorators (@triton.jit, @dataclass(...)) and annotations are not visited: no test can pin them alone
        for stmt in node.body:
            self.visit(stmt)
        for arg in node.args.defaults + node.args.kw_defaults:
            if arg is not None:
                self.visit(arg)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._body(node.body)
        for stmt in node.body:
            self.visit(stmt)

    def visit_Expr(self, node):
        if id(node) in self.docstrings or isinstance(node.value, ast.Constant):
            return
        if isinstance(node.value, ast.Call):
            start, end = self.span(node)
            self.add(node, "call removed", start, end, "pass")
        self.generic_visit(node)

    def visit_Raise(self, node):
        start, end = self.span(node)
        self.add(node, "raise removed", start, end, "pass")
        # the exception's arguments are messages: not mutated

    def visit_JoinedStr(self, node):  # f-strings: messages
        return

    def visit_If(self, node):
        if (isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
                and node.test.left.id == "__name__"):  # fmt: skip
            return
        self.generic_visit(node)


def find_mutants(module: str) -> tuple[str, list[Mutant]]:
    source = (ROOT / module).read_text()
    finder = _Finder(module, source)
    finder.visit(ast.parse(source))
    unique = {(m.start, m.end, m.replacement): m for m in finder.mutants}
    mutants = sorted(unique.values(), key=lambda m: (m.start, m.end, m.replacement))
    return source, [m for m in mutants if _parses(m.apply(source))]  # a mutant that is not Python proves nothing


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def _pytest(workdir: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def tests_by_line(workdir: Path, module: str, tests: list[str], timeout: float) -> dict[int, set[str]] | None:
    """Line of `module` -> ids of the tests that execute it, from one coverage run of `tests` (None if they fail)."""
    import coverage

    data_file = workdir / ".coverage.mutation"
    done = _pytest(workdir, [f"--cov={workdir / 'fastsd35'}", "--cov-context=test", "--cov-report=",
                             *tests], timeout * 4)  # fmt: skip
    if done is None or done.returncode != 0:
        why = "timed out" if done is None else "fail without any mutation:\n" + "\n".join(done.stdout.splitlines()[-15:])
        print(f"{module}: its tests {why}; skipped", file=sys.stderr)
        return None
    shutil.move(workdir / ".coverage", data_file)
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    by_line = data.contexts_by_lineno(str(workdir / module))
    data_file.unlink()
    # contexts are "tests/test_x.py::test_name[param]|run" (or "|setup"/"|teardown"); the empty one is import time.
    # A line run only at import (a module constant, a default argument, a dataclass field) is guarded by every test
    # that imports the module, not by none: give it the whole list, or its mutants would "survive" untested.
    out = {}
    for line, contexts in by_line.items():
        out[line] = {c.rsplit("|", 1)[0] for c in contexts if c} or set(tests)
    return out


def _covering(by_line: dict[int, set[str]], line: int) -> set[str]:
    """The tests that run `line`; a continuation line of a multi-line statement is not in coverage's table, so the
    statement's first line (a few lines up) stands for it."""
    for candidate in range(line, max(line - 6, 0), -1):
        if candidate in by_line:
            return by_line[candidate]
    return set()


def run_mutant(workdir: Path, tests: set[str], timeout: float) -> str:
    """"killed" (a test failed or the run timed out) or "survived" (they passed)."""
    if not tests:
        return "survived"
    done = _pytest(workdir, ["-x", *sorted(tests)], timeout)
    return "killed" if done is None or done.returncode != 0 else "survived"


def scratch_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="fastsd35-mutation-"))
    for name in ("fastsd35", "tests", "pytest.ini", "setup.py"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, work / name)
    return work


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="module to mutate (default: all of MODULES)")
    parser.add_argument("--sample", type=int, default=40, help="mutants per module, 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run before it counts as killed")
    parser.add_argument("--tests", action="append", help="test file to use instead of the module's list (repeat)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, help="write every result as JSON")
    args = parser.parse_args(argv)

    modules = list(MODULES)
    if args.module:
        wanted = []
        for name in args.module:
            match = [m for m in MODULES if m == name or m.endswith("/" + name) or m == f"fastsd35/{name}"]
            if not match:
                parser.error(f"unknown module {name}: choose from {', '.join(MODULES)}")
            wanted += match
        modules = wanted

    plan = {}
    for module in modules:
        source, mutants = find_mutants(module)
        chosen = mutants
        if args.sample and len(mutants) > args.sample:
            chosen = sorted(random.Random(f"{args.seed}:{module}").sample(mutants, args.sample), key=lambda m: m.start)
        plan[module] = (source, chosen, len(mutants))
        if args.list:
            print(f"# {module}: {len(chosen)} of {len(mutants)} mutants")
            for m in chosen:
                print("  " + m.describe(source))
    if args.list:
        return 0

    work = scratch_copy()
    results, scores = [], {}
    try:
        for module, (source, chosen, total) in plan.items():
            # the unmutated tests must pass first, or every mutant would count as killed
            tests = args.tests or [t for t in MODULES[module] if (work / t).exists()]
            by_line = tests_by_line(work, module, tests, args.timeout)
            if by_line is None:
                continue
            target = work / module
            killed = 0
            for i, m in enumerate(chosen, 1):
                target.write_text(m.apply(source))
                started = time.perf_counter()
                # a line no test runs in-process may still run in a test's child process: give it every test
                outcome = run_mutant(work, _covering(by_line, m.line) or set(tests), args.timeout)
                target.write_text(source)
                killed += outcome == "killed"
                results.append({**asdict(m), "outcome": outcome, "seconds": round(time.perf_counter() - started, 1)})
                mark = "killed  " if outcome == "killed" else "SURVIVED"
                print(f"[{i}/{len(chosen)}] {mark} {m.describe(source)}", flush=True)
            scores[module] = (killed, len(chosen), total)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nmodule                                      killed / sampled (of all mutants)   score")
    for module, (killed, n, total) in scores.items():
        print(f"{module:<44}{killed:>6} / {n:<7} ({total:>4})            {killed / max(n, 1):6.1%}")
    survivors = [r for r in results if r["outcome"] == "survived"]
    if survivors:
        print("\nsurvivors (each is a missing test or an equivalent mutant):")
        for r in survivors:
            print(f"  {r['module']}:{r['line']}: {r['kind']}: {r['before']!r} -> {r['replacement']!r}")
    if args.json:
        args.json.write_text(json.dumps({"scores": scores, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
