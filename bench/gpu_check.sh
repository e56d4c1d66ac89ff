#!/usr/bin/env bash
# One command for a short GPU session: bash bench/gpu_check.sh [--dry-run] [--budget SECONDS] [--out DIR]
#
# Within --budget seconds (default 300: 5 minutes, of which 20 go to Python start-ups and the summary) it runs these
# parts in order of value, each under its own `timeout` (its share of the time left: what a part does not use goes to
# the parts after it), each writing its figures to bench/results/ the moment it has them:
#   1. kernels-report  `fastsd35 kernels --arch sm_XX --dtype bf16` for this GPU's arch on every CPU core: the
#                      compile report (spills, registers), which also fills Triton's cache for the parts after it
#   2. step            the SD3.5 Large transformer step (1024x1024, CFG batch 2, bf16): MMDiTX on the reference ops,
#                      FastMMDiTX eager and replayed from CUDA graphs
#   3. attention       the joint attention kernel against SDPA (flash) at SD3.5 Large and Medium shapes
#   4. fp8             the Large step with FP8 GEMMs (checked against the FP8 error model) beside the reference ops
#   5. tests           the `gpu`-marked tests
#   6. e2e             large_turbo end to end, eager and from CUDA graphs: first call (cold) and steady state
# Results (in --out, default bench/results/): <device>.json (every figure), <device>-kernels.json (the compile report),
# <device>-gpu-tests.xml (JUnit), <device>-gpu-check-parts.tsv and the log <device>-gpu-check.log. It ends with one Markdown table (ms, TFLOP/s or
# GB/s, ratios, first calls, what failed or was skipped and why) that can be pasted into README as it is, and exits 1
# if a part failed or ran out of time, 2 for bad arguments. Without CUDA it skips every part and exits 0; --dry-run
# prints the plan (the commands and their time limits) and runs nothing.
# Works from a bare checkout: torch, triton, transformers, safetensors, pytest; diffusers optional; no network.
# PYTHON picks the interpreter (default: python, else python3).
set -uo pipefail
export LC_ALL=C

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER="$PWD"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The compile report and the runs that follow must agree on Triton's cache key (this variable is part of it); Triton
# 3.9 also warns when it is unset.
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
OUT="$ROOT/bench/results"
DRY=0
BUDGET=300
MIN_BUDGET=60
MAX_BUDGET=86400
RESERVE=20  # seconds of the budget kept for Python start-ups and the summary

usage_error() { echo "gpu_check.sh: $1" >&2; exit 2; }

# --budget: whole seconds, checked as text before any arithmetic (bash reads 08 as octal and wraps huge numbers).
budget_value() {
  local v="$1"
  [[ "$v" =~ ^[0-9]{1,9}$ ]] || usage_error "--budget must be whole seconds from $MIN_BUDGET to $MAX_BUDGET, got '$v'"
  v=$((10#$v))
  [ "$v" -ge $MIN_BUDGET ] && [ "$v" -le $MAX_BUDGET ] \
    || usage_error "--budget must be whole seconds from $MIN_BUDGET to $MAX_BUDGET, got '$1'"
  echo "$v"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget)
      [ $# -ge 2 ] || usage_error "--budget needs a value: whole seconds from $MIN_BUDGET to $MAX_BUDGET"
      BUDGET="$(budget_value "$2")" || exit 2; shift ;;
    --budget=*) BUDGET="$(budget_value "${1#--budget=}")" || exit 2 ;;
    --out)
      [ $# -ge 2 ] && [ -n "$2" ] || usage_error "--out needs a folder"
      case "$2" in /*) OUT="$2" ;; *) OUT="$CALLER/$2" ;; esac
      shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown argument '$1' (use --dry-run, --budget SECONDS, --out DIR)" ;;
  esac
  shift
done

PARTS=(kernels-report step attention fp8 tests e2e)
declare -A SHARE=([kernels-report]=35 [step]=70 [attention]=35 [fp8]=40 [tests]=60 [e2e]=40)
SKIPPED=()
FAILED=()
START=$SECONDS
STARTED_AT="$(date -u +%FT%TZ)"

skip() { SKIPPED+=("$1: $2"); echo "== skipped $1: $2"; }

# One Python start-up finds out what the plan depends on: line 1 whether pytest is there and the architectures the
# compile report can target, line 2 the device ("cpu", or "cuda sm_XX <slug> <name>").
INFO="$("$PY" - 2>/dev/null <<'EOF'
import importlib.util
import torch

try:
    from fastsd35.kernels.report import available_archs
    archs = ",".join(available_archs())
except Exception:  # no triton: the report cannot run
    archs = "-"
print("yes" if importlib.util.find_spec("pytest") else "no", archs)
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
read -r HAS_PYTEST ARCHS <<<"$(head -1 <<<"$INFO")"
read -r KIND ARCH SLUG NAME <<<"$(tail -1 <<<"$INFO")"
HAVE_CUDA=0; [ "$KIND" = cuda ] && HAVE_CUDA=1
CORES="$(nproc 2>/dev/null || echo 1)"

if [ $HAVE_CUDA = 1 ] && [ $DRY = 0 ]; then
  mkdir -p -- "$OUT" 2>/dev/null && [ -w "$OUT" ] || usage_error "--out $OUT: cannot make or write that folder"
  LOG="$OUT/$SLUG-gpu-check.log"
  exec > >(tee "$LOG") 2>&1
  echo "gpu_check.sh on $NAME ($ARCH), $STARTED_AT, budget ${BUDGET}s"
else
  ARCH="${ARCH:-sm_XX}"; SLUG="${SLUG:-<device>}"
  [ $HAVE_CUDA = 0 ] && echo "gpu_check.sh: no CUDA device here: nothing runs (the plan follows)"
  [ $DRY = 1 ] && echo "gpu_check.sh --dry-run: the plan, nothing runs"
fi
STATUS="$OUT/$SLUG-gpu-check-parts.tsv"  # part, outcome, seconds, limit: read by the summary

# Why a part cannot run here ("" when it can). A dry run plans as if CUDA were there.
why_not() {
  [ $HAVE_CUDA = 1 ] || [ $DRY = 1 ] || { echo "no CUDA device (torch.cuda.is_available() is False)"; return; }
  case "$1" in
    tests) [ "$HAS_PYTEST" = yes ] || echo "pytest is not installed" ;;
    kernels-report)
      [ "$ARCHS" != - ] || { echo "triton cannot be imported"; return; }
      [ $HAVE_CUDA = 0 ] || [[ ",$ARCHS," == *",$ARCH,"* ]] \
        || echo "this Triton's compile report targets $ARCHS, not this GPU's $ARCH" ;;
  esac
}

# The part's command, as the array CMD (paths may hold spaces).
set_command() {
  local bench=("$PY" -m fastsd35 bench --out "$OUT")
  case "$1" in
    kernels-report) CMD=("$PY" -m fastsd35 kernels --arch "$ARCH" --dtype bf16 --jobs "$CORES" --json "$OUT/$SLUG-kernels.json") ;;
    step) CMD=("${bench[@]}" --only transformer --models large --cases large-step-B2 --contenders torch,fastsd35,fastsd35+graphs) ;;
    attention) CMD=("${bench[@]}" --only kernels --models large,medium --cases joint_attention,x_attention) ;;
    fp8) CMD=("${bench[@]}" --only transformer --models large --cases large-step-B2 --contenders torch,fastsd35+graphs+fp8) ;;
    tests) CMD=("$PY" -m pytest -q -p no:cacheprovider -m gpu tests --junitxml "$OUT/$SLUG-gpu-tests.xml") ;;
    e2e) CMD=("${bench[@]}" --only e2e) ;;
  esac
}

[ $DRY = 1 ] || [ $HAVE_CUDA = 0 ] || : > "$STATUS"
SHARES_LEFT=0; for p in "${PARTS[@]}"; do SHARES_LEFT=$((SHARES_LEFT + SHARE[$p])); done
PLANNED=0  # a dry run's elapsed time: each part as if it used its whole limit
echo "plan: ${#PARTS[@]} parts in $((BUDGET - RESERVE))s of the ${BUDGET}s budget (${RESERVE}s for start-ups and the summary)"
for part in "${PARTS[@]}"; do
  share=${SHARE[$part]}
  elapsed=$((DRY == 1 ? PLANNED : SECONDS - START))
  left=$((BUDGET - RESERVE - elapsed))
  limit=$((left > 0 ? share * left / SHARES_LEFT : 0))
  SHARES_LEFT=$((SHARES_LEFT - share))
  reason="$(why_not "$part")"
  if [ -n "$reason" ]; then skip "$part" "$reason"; continue; fi
  if [ $limit -lt 10 ]; then skip "$part" "out of time (${left}s of the ${BUDGET}s budget left)"; continue; fi
  set_command "$part"
  echo "== $part (timeout ${limit}s): ${CMD[*]}"
  if [ $DRY = 1 ]; then PLANNED=$((PLANNED + limit)); continue; fi
  t0=$SECONDS
  # SIGINT first: pytest and fastsd35 bench stop on it (and have written what they measured); KILL 10 s later.
  timeout -s INT -k 10 "$limit" "${CMD[@]}"
  rc=$?
  took=$((SECONDS - t0))
  echo "== $part: exit $rc after ${took}s"
  if [ $rc = 124 ] || [ $rc = 137 ] || [ $rc = 130 ]; then outcome="stopped at its ${limit}s limit"
  elif [ $rc != 0 ]; then outcome="exit status $rc"
  else outcome=ok; fi
  [ "$outcome" = ok ] || FAILED+=("$part: $outcome")
  printf '%s\t%s\t%s\t%s\n' "$part" "$outcome" "$took" "$limit" >> "$STATUS"
done

if [ $HAVE_CUDA = 1 ] && [ $DRY = 0 ]; then
  echo
  "$PY" -m fastsd35.benchmarks.summary --results "$OUT/$SLUG.json" --kernels "$OUT/$SLUG-kernels.json" \
    --tests "$OUT/$SLUG-gpu-tests.xml" --parts "$STATUS" --since "$STARTED_AT" --budget "$BUDGET" \
    || FAILED+=("summary: could not be made")
  echo
  echo "results: $OUT/$SLUG.json; log: $LOG"
fi
echo "gpu_check.sh: done in $((SECONDS - START))s; ${#SKIPPED[@]} part(s) skipped, ${#FAILED[@]} failed"
for line in "${SKIPPED[@]}"; do echo "  skipped $line"; done
for line in "${FAILED[@]}"; do echo "  FAILED $line"; done
[ ${#FAILED[@]} = 0 ]
