#!/usr/bin/env bash
# One command for a GPU session: bash bench/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# Within --budget seconds (default 480: 8 minutes on an H100/H200) it runs, each part under its own `timeout`:
#   1. the `gpu`-marked tests (pytest -m gpu tests)
#   2. `python -m fastsd35 kernels --arch sm_XX` for this GPU's arch (the compile report; skipped when this checkout
#      has no such subcommand)
#   3. the kernel benchmarks at SD3.5 Large and Medium shapes (fastsd35 bench --only kernels)
#   4. the transformer step: Large, 1024x1024, CFG batch 2, bf16: FastMMDiTX eager and graphed, MMDiTX on the
#      reference ops, diffusers eager and compiled when diffusers is importable (pytest bench, step-B2)
#   5. the large_turbo generation end to end, first call (cold) and steady state (fastsd35 bench --only e2e)
# and leaves bench/results/<device>.json (every figure, merged across the parts), <device>-kernels.json (the compile
# report), <device>-pytest-benchmark.json and the log <device>-gpu-check.log. It prints what it skipped and why, and
# exits 1 if a part failed or ran out of time. Without CUDA (or with --dry-run) it prints the plan and exits 0.
# Works from a bare checkout: torch, triton, transformers, safetensors, pytest, pytest-benchmark; diffusers optional;
# no network. PYTHON picks the interpreter (default: python, else python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
OUT="$ROOT/bench/results"
DRY=0
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

# Part budgets in seconds (scaled down if --budget is below their sum, 460): they leave ~20 s of the 8 minutes
# for Python start-up and the summary. The step's torch.compile contender runs last so that a timeout loses only it.
PARTS=(tests kernels-report kernel-bench step e2e)
declare -A SECONDS_FOR=([tests]=100 [kernels-report]=70 [kernel-bench]=90 [step]=130 [e2e]=70)
SKIPPED=()
FAILED=()
START=$SECONDS

skip() { SKIPPED+=("$1: $2"); echo "== skipped $1: $2"; }

# One Python start-up finds out everything the plan depends on: line 1 what is there (yes/no for pytest,
# pytest-benchmark, `fastsd35 kernels`, its --dtype), line 2 the device ("cpu", or "cuda sm_XX <slug> <name>").
INFO="$("$PY" - 2>/dev/null <<'EOF'
import contextlib, importlib.util, io
import torch
from fastsd35.app import cli

def kernels_help():
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(["kernels", "--help"])
        except SystemExit as e:
            return text.getvalue() if e.code == 0 else ""
    return ""

help_text = kernels_help()
found = [importlib.util.find_spec(m) is not None for m in ("pytest", "pytest_benchmark")]
found += [bool(help_text), "--dtype" in help_text]
print(" ".join("yes" if f else "no" for f in found))
if torch.cuda.is_available():
    from fastsd35.benchmarks.suite import detect_environment
    env = detect_environment("cuda")
    major, minor = torch.cuda.get_device_capability()
    print(f"cuda sm_{major}{minor} {env.slug} {env.name}")
else:
    print("cpu")
EOF
)"
if [ "$(wc -l <<<"$INFO")" != 2 ]; then
  echo "gpu_check.sh: no Python with torch and this checkout's fastsd35 (set PYTHON)" >&2; exit 2
fi
read -r HAS_PYTEST HAS_BENCHMARK HAS_KERNELS HAS_KERNELS_DTYPE <<<"$(head -1 <<<"$INFO")"
read -r KIND ARCH SLUG NAME <<<"$(tail -1 <<<"$INFO")"
HAVE_CUDA=0; [ "$KIND" = cuda ] && HAVE_CUDA=1

if [ $HAVE_CUDA = 1 ] && [ $DRY = 0 ]; then
  mkdir -p "$OUT"
  LOG="$OUT/$SLUG-gpu-check.log"
  exec > >(tee "$LOG") 2>&1
  echo "gpu_check.sh on $NAME ($ARCH), $(date -u +%FT%TZ), budget ${BUDGET}s"
else
  ARCH="${ARCH:-sm_XX}"; SLUG="${SLUG:-<device>}"
  [ $HAVE_CUDA = 0 ] && echo "gpu_check.sh: no CUDA device here: nothing runs (the plan follows)"
  [ $DRY = 1 ] && echo "gpu_check.sh --dry-run: the plan, nothing runs"
fi

# Why a part cannot run here ("" when it can). A dry run plans as if CUDA were there.
why_not() {
  [ $HAVE_CUDA = 1 ] || [ $DRY = 1 ] || { echo "no CUDA device (torch.cuda.is_available() is False)"; return; }
  case "$1" in
    tests) [ "$HAS_PYTEST" = yes ] || echo "pytest is not installed" ;;
    kernels-report) [ "$HAS_KERNELS" = yes ] \
        || echo "this checkout has no 'fastsd35 kernels' subcommand (fastsd35 kernels --help failed)" ;;
    step) [ "$HAS_PYTEST" = yes ] && [ "$HAS_BENCHMARK" = yes ] \
        || echo "pytest and pytest-benchmark are needed for the step" ;;
  esac
}

command_for() {
  case "$1" in
    tests) echo "$PY -m pytest -q -p no:cacheprovider -m gpu tests" ;;
    kernels-report)  # bf16 only when it can: the production dtype, and the full report takes minutes per dtype
      echo "$PY -m fastsd35 kernels --arch $ARCH$([ "$HAS_KERNELS_DTYPE" = yes ] && echo " --dtype bf16") --json $OUT/$SLUG-kernels.json" ;;
    kernel-bench) echo "$PY -m fastsd35 bench --only kernels --models large,medium --out $OUT" ;;
    step) echo "$PY -m pytest bench/test_transformer.py -q -p no:cacheprovider --bench-quick --bench-models large -k large-step-B2 --bench-out $OUT --benchmark-json $OUT/$SLUG-pytest-benchmark.json" ;;
    e2e) echo "$PY -m fastsd35 bench --only e2e --out $OUT" ;;
  esac
}

TOTAL=0; for p in "${PARTS[@]}"; do TOTAL=$((TOTAL + SECONDS_FOR[$p])); done
for part in "${PARTS[@]}"; do
  limit=$((SECONDS_FOR[$part] * BUDGET / (TOTAL > BUDGET ? TOTAL : BUDGET) ))
  left=$((BUDGET - (SECONDS - START)))
  [ $limit -gt $left ] && limit=$left
  reason="$(why_not "$part")"
  if [ -n "$reason" ]; then skip "$part" "$reason"; continue; fi
  if [ $limit -lt 10 ]; then skip "$part" "out of time (${left}s of the ${BUDGET}s budget left)"; continue; fi
  cmd="$(command_for "$part")"
  echo "== $part (timeout ${limit}s): $cmd"
  [ $DRY = 1 ] && continue
  t0=$SECONDS
  # SIGINT first: pytest and fastsd35 bench stop on it and still write what they measured; KILL 15 s later.
  timeout -s INT -k 15 "$limit" $cmd
  rc=$?
  echo "== $part: exit $rc after $((SECONDS - t0))s"
  if [ $rc = 124 ] || [ $rc = 137 ] || [ $rc = 130 ]; then FAILED+=("$part: stopped at its ${limit}s limit")
  elif [ $rc != 0 ]; then FAILED+=("$part: exit status $rc"); fi
done

if [ $HAVE_CUDA = 1 ] && [ $DRY = 0 ] && [ -f "$OUT/$SLUG.json" ]; then
  "$PY" - "$OUT/$SLUG.json" <<'EOF'
import json, sys
record = json.load(open(sys.argv[1]))
for case in record["cases"]:
    for r in case["results"]:
        if "skipped" in r:
            print(f"== skipped {case['part']}/{case['id']} {r['contender']}: {r['skipped']}")
EOF
  echo "results: $OUT/$SLUG.json; log: $LOG"
fi
echo "gpu_check.sh: done in $((SECONDS - START))s; ${#SKIPPED[@]} part(s) skipped, ${#FAILED[@]} failed"
for line in "${SKIPPED[@]}"; do echo "  skipped $line"; done
for line in "${FAILED[@]}"; do echo "  FAILED $line"; done
[ ${#FAILED[@]} = 0 ]
