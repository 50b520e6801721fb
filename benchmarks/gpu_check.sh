#!/usr/bin/env bash
# One-shot GPU check of rcgrpo: run from the repo root on any CUDA machine.
#
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-benchmarks/results/gpu-<date>}
#
# Needs python3 with torch (CUDA), triton, transformers, peft, accelerate, pytest, pytest-benchmark,
# nvidia-ml-py. diffusers may be missing: a carried wheel is installed (--no-deps) from $WHEELS,
# ./wheels, ./shared/wheels or ./shared. The repo is NOT pip-installed: a throw-away path shim maps
# `rcgrpo` -> rcgrpo/ and `rcgrpo_kernels` -> kernels/rcgrpo_kernels/ (the C++ backend is CPU-only, not needed).
#
# Stages (each logged to $OUT/logs/<stage>.log, each under its own `timeout`, all under one deadline
# of GPU_CHECK_BUDGET_S seconds, default 465 = 7 min 45 s; a failing stage is recorded and the
# script goes on):
#   env          nvidia-smi (+ -q), git commit, versions               -> nvidia-smi*.txt, versions.txt
#   diffusers    install the carried wheel if diffusers does not import
#   import       path shim; import rcgrpo, rcgrpo_kernels; backends, `python -m rcgrpo_kernels`
#                (auto mode, SDPA priority, fallbacks)                  -> versions.txt
#   gpu_tests    pytest -m gpu tests/  (the CUDA-only tests)            -> gpu-tests.xml
#   bench_*      pytest benchmarks/<suite> at GPU shapes, one JSON each -> bench-*.json
#   report       benchmarks/report.py over the JSONs                    -> gpu-report.md/.png
#   triton_tests the Triton test files on CUDA (all their small shapes), then every GPU autotune /
#                block config compiled and checked (tests/test_kernel_configs.py) -> triton-tests.xml
#   dryrun       rcgrpo dryrun at 512 px (short rollout) if it exists   -> dryrun.json
# Writes summary.md and stages.tsv. Exit status: 0 if at least one test/benchmark/dry-run stage
# ran (even with failures: read summary.md), 3 if nothing ran (e.g. no CUDA device).
#
# Knobs: OUT, WHEELS, PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_ALLOW_CPU=1 (run the
# stages without CUDA, to test this script), GPU_CHECK_STAGES=gpu_tests,bench_attention,... (run
# only those), GPU_CHECK_BENCH_K (pytest -k for the benchmarks), GPU_CHECK_DRYRUN_ARGS (replaces
# the dry run's size flags), RCGRPO_BENCH_* (see benchmarks/README.md).
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 3
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT/logs" || exit 3
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"
START_S=$(date +%s)
RAN=0
SUMMARY_ROWS=()
printf 'stage\tstatus\trc\tseconds\tlog\n' > "$OUT/stages.tsv"

log() { echo "[gpu_check +$(( $(date +%s) - START_S ))s] $*" | tee -a "$OUT/gpu_check.log"; }
remaining() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

record() {  # stage status rc seconds logfile
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$OUT/stages.tsv"
    SUMMARY_ROWS+=("| $1 | $2 | $3 | $4 | ${5:+logs/$(basename "$5")} |")
}

# run_stage NAME LIMIT_S COUNTS(yes|no) CMD...: run CMD under `timeout` (SIGINT first, so pytest
# still writes its reports; SIGKILL 10 s later) with min(LIMIT_S, time left); never aborts the script.
want() {  # GPU_CHECK_STAGES=a,b,c runs only those stages (default: all)
    [[ -z "${GPU_CHECK_STAGES:-}" ]] && return 0
    case "$1" in diffusers|pip_install) return 0 ;; esac  # set-up always runs
    [[ ",${GPU_CHECK_STAGES}," == *",$1,"* ]]
}

run_stage() {
    local name="$1" limit="$2" counts="$3"; shift 3
    if ! want "$name"; then
        record "$name" "not selected (GPU_CHECK_STAGES)" "-" 0 ""
        return 0
    fi
    local left; left=$(( $(remaining) - 20 ))
    local t=$(( limit < left ? limit : left ))
    local logf="$OUT/logs/$name.log"
    if (( t < 20 )); then
        log "$name: SKIPPED (only ${left}s of the ${BUDGET_S}s budget left)"
        record "$name" "skipped: no time left" "-" 0 ""
        return 0
    fi
    log "$name: start (limit ${t}s): $*"
    local t0; t0=$(date +%s)
    timeout -s INT -k 10 "$t" "$@" > "$logf" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local status
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${t}s" ;;
        *) status="failed (rc $rc)" ;;
    esac
    # pytest: rc 1 = some tests failed (they ran), 5 = nothing collected/selected.
    if [[ "$counts" == yes ]] && { (( rc == 0 )) || (( rc == 1 )) || grep -qE '[0-9]+ (passed|failed)' "$logf"; }; then
        RAN=$(( RAN + 1 ))
    fi
    if [[ "$counts" == yes && -n "${STAGE_PRODUCT:-}" && -s "${STAGE_PRODUCT:-}" ]] && (( rc != 0 && rc != 1 )); then
        RAN=$(( RAN + 1 ))  # e.g. a benchmark suite cut by its timeout still wrote its JSON
        status="$status; $(basename "$STAGE_PRODUCT") written"
    fi
    log "$name: $status in ${dt}s; last lines:"
    tail -n 4 "$logf" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    record "$name" "$status" "$rc" "$dt" "$logf"
    return 0
}

write_summary() {
    {
        echo "# rcgrpo GPU check — $(date -u +%FT%TZ)"
        echo
        echo "- repo commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
        echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1 || echo 'no nvidia-smi')"
        echo "- total time: $(( $(date +%s) - START_S ))s of a ${BUDGET_S}s budget; stages that ran tests/benchmarks: $RAN"
        echo
        echo "| stage | status | rc | seconds | log |"
        echo "|---|---|---:|---:|---|"
        printf '%s\n' "${SUMMARY_ROWS[@]}"
        if [[ -f "$OUT/gpu-report.md" ]]; then
            echo
            echo "Benchmark report: [gpu-report.md](gpu-report.md)"
        fi
    } > "$OUT/summary.md"
}

SHIM="$(mktemp -d "${TMPDIR:-/tmp}/rcgrpo-shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT

log "repo $REPO, python $(command -v "$PY" || echo "$PY missing"), results in $OUT, budget ${BUDGET_S}s"

# ---------------------------------------------------------------- env
{
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
} > "$OUT/nvidia-smi.txt"
nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || true
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '?')"
    git status --short 2>/dev/null | head -n 50 | sed 's/^/  git: /'
    echo "nproc: $(nproc 2>/dev/null)"
    "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "diffusers", "transformers", "peft", "accelerate", "pytest", "pytest_benchmark", "pynvml", "numpy"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
try:
    import torch
    print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
except Exception as exc:
    print("torch.cuda check failed:", exc)
EOF
} > "$OUT/versions.txt"
record env ok 0 "$(( $(date +%s) - START_S ))" ""
log "env: $(grep -E '^(torch|triton|device|diffusers) ' "$OUT/versions.txt" | tr '\n' ';')"

# ---------------------------------------------------------------- diffusers
mkdir -p "$SHIM/site"
export PYTHONPATH="$SHIM:$SHIM/site${PYTHONPATH:+:$PYTHONPATH}"
# Scripts are run by path, so their folder, not the repo root, is sys.path[0]; kernels/ holds no
# __init__.py either way, so it can never shadow Hugging Face's `kernels` (SPEC section 1).
export PYTHONSAFEPATH=1
if "$PY" -c "import diffusers" > /dev/null 2>&1; then
    log "diffusers: already importable"
    record diffusers "present" 0 0 ""
else
    WHEEL=""
    for d in "${WHEELS:-}" ./wheels ./shared/wheels ./shared; do
        [[ -n "$d" && -d "$d" ]] || continue
        WHEEL="$(ls -1 "$d"/diffusers-*.whl 2>/dev/null | sort -V | tail -n1)"
        [[ -n "$WHEEL" ]] && break
    done
    if [[ -z "$WHEEL" ]]; then
        log "diffusers: MISSING and no diffusers-*.whl in \$WHEELS, ./wheels, ./shared/wheels, ./shared"
        record diffusers "missing, no wheel" 1 0 ""
    else
        run_stage diffusers 90 no "$PY" -m pip install --no-deps --no-index --disable-pip-version-check \
            --target "$SHIM/site" "$WHEEL"
    fi
fi

# ---------------------------------------------------------------- import (path shim)
ln -s "$REPO/rcgrpo" "$SHIM/rcgrpo"
ln -s "$REPO/kernels/rcgrpo_kernels" "$SHIM/rcgrpo_kernels"
IMPORT_CHECK='import rcgrpo_kernels, torch
print("rcgrpo_kernels from", rcgrpo_kernels.__file__)
print("backends", rcgrpo_kernels.available_backends())
try:
    import rcgrpo, diffusers
    print("rcgrpo from", rcgrpo.__file__, "diffusers", diffusers.__version__)
except Exception as exc:
    print("rcgrpo/diffusers import failed:", type(exc).__name__, exc)'
if ! "$PY" -c "$IMPORT_CHECK" > "$OUT/logs/import.log" 2>&1; then
    log "import: path shim failed; trying pip install --no-deps --no-build-isolation -e . (RCGRPO_NO_EXT=1)"
    rm -f "$SHIM/rcgrpo" "$SHIM/rcgrpo_kernels"
    RCGRPO_NO_EXT=1 run_stage pip_install 120 no "$PY" -m pip install --no-deps --no-build-isolation \
        --disable-pip-version-check -e .
    "$PY" -c "$IMPORT_CHECK" >> "$OUT/logs/import.log" 2>&1
fi
"$PY" -m rcgrpo_kernels >> "$OUT/logs/import.log" 2>&1 || echo "python -m rcgrpo_kernels failed" >> "$OUT/logs/import.log"
cat "$OUT/logs/import.log" >> "$OUT/versions.txt"
if grep -q '^backends' "$OUT/logs/import.log"; then
    record import ok 0 0 "$OUT/logs/import.log"
    log "import: $(grep -E '^(rcgrpo_kernels from|backends|rcgrpo from|rcgrpo/diffusers)' "$OUT/logs/import.log" | tr '\n' ';')"
else
    record import "FAILED" 1 0 "$OUT/logs/import.log"
    log "import: FAILED (see logs/import.log)"
fi

# ---------------------------------------------------------------- CUDA?
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
    if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
        log "no CUDA device: GPU stages skipped (GPU_CHECK_ALLOW_CPU=1 runs them on CPU to test this script)"
        for s in gpu_tests bench_attention bench_dists bench_grpo report triton_tests dryrun; do
            record "$s" "skipped: no CUDA device" "-" 0 ""
        done
        write_summary
        log "nothing ran: exit 3"
        exit 3
    fi
    log "no CUDA device, GPU_CHECK_ALLOW_CPU=1: running the stages on CPU (Triton providers skip)"
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rsfE)

# ---------------------------------------------------------------- GPU tests
run_stage gpu_tests 100 yes "${PYTEST[@]}" -m gpu tests/ --junitxml="$OUT/gpu-tests.xml"

# ---------------------------------------------------------------- benchmarks (one JSON per suite)
BENCH_K=()
[[ -n "${GPU_CHECK_BENCH_K:-}" ]] && BENCH_K=(-k "$GPU_CHECK_BENCH_K")
STAGE_PRODUCT="$OUT/bench-attention.json" run_stage bench_attention 150 yes "${PYTEST[@]}" benchmarks/test_bench_acd_attention.py ${BENCH_K[@]+"${BENCH_K[@]}"} \
    --benchmark-json="$OUT/bench-attention.json"
STAGE_PRODUCT="$OUT/bench-dists.json" run_stage bench_dists 80 yes "${PYTEST[@]}" benchmarks/test_bench_region_sq_dists.py ${BENCH_K[@]+"${BENCH_K[@]}"} \
    --benchmark-json="$OUT/bench-dists.json"
STAGE_PRODUCT="$OUT/bench-grpo.json" run_stage bench_grpo 70 yes "${PYTEST[@]}" benchmarks/test_bench_grpo_iteration.py ${BENCH_K[@]+"${BENCH_K[@]}"} \
    --benchmark-json="$OUT/bench-grpo.json"

# ---------------------------------------------------------------- report
shopt -s nullglob
JSONS=("$OUT"/bench-*.json)
shopt -u nullglob
if (( ${#JSONS[@]} )); then
    run_stage report 40 no "$PY" benchmarks/report.py "${JSONS[@]}" --baseline sdpa --out "$OUT" --name gpu-report
else
    log "report: no benchmark JSON to report"
    record report "skipped: no JSON" "-" 0 ""
fi

# ---------------------------------------------------------------- dry run (if the command exists)
# `rcgrpo dryrun --help` succeeds even where the command is missing: look for its module first.
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('rcgrpo.dryrun') else 1)" \
        > "$OUT/logs/dryrun-help.log" 2>&1 \
   && "$PY" -m rcgrpo.cli dryrun --help >> "$OUT/logs/dryrun-help.log" 2>&1; then
    HELP="$(cat "$OUT/logs/dryrun-help.log")"
    DRY=("$PY" -m rcgrpo.cli dryrun)
    [[ "$HELP" == *"--arch"* ]] && DRY+=(--arch flux-kontext-dev)
    [[ "$HELP" == *"--resolution"* ]] && DRY+=(--resolution 512)
    [[ "$HELP" == *"--json"* ]] && DRY+=(--json "$OUT/dryrun.json")
    [[ "$HELP" == *"--output-dir"* ]] && DRY+=(--output-dir "$OUT/dryrun")
    # Full width and depth at 512 px, but a short rollout and update so it fits the stage budget
    # (GPU_CHECK_DRYRUN_ARGS replaces these; flags this build lacks are dropped).
    read -r -a EXTRA <<< "${GPU_CHECK_DRYRUN_ARGS:---group 12 --anchors 4 --steps 4 --train-steps 2 --gradient-checkpointing}"
    i=0
    while (( i < ${#EXTRA[@]} )); do
        flag="${EXTRA[$i]}"; value=""
        if (( i + 1 < ${#EXTRA[@]} )) && [[ "${EXTRA[$((i + 1))]}" != --* ]]; then value="${EXTRA[$((i + 1))]}"; i=$(( i + 1 )); fi
        i=$(( i + 1 ))
        if [[ "$HELP" == *"$flag"* ]]; then
            DRY+=("$flag"); [[ -n "$value" ]] && DRY+=("$value")
        else
            log "dryrun: this build has no $flag; dropped"
        fi
    done
    run_stage dryrun 150 yes "${DRY[@]}"
else
    log "dryrun: 'rcgrpo dryrun' is not available in this build (no module rcgrpo.dryrun)"
    record dryrun "skipped: command not available" "-" 0 "$OUT/logs/dryrun-help.log"
fi

# ---------------------------------------------------------------- Triton tests on CUDA (whatever time is left)
run_stage triton_tests 120 yes "${PYTEST[@]}" tests/test_acd_attention_triton.py tests/test_region_sq_dists_triton.py \
    tests/test_kernel_configs.py -m "not gpu" --junitxml="$OUT/triton-tests.xml"

nvidia-smi > "$OUT/nvidia-smi-end.txt" 2>&1 || true
write_summary
log "done in $(( $(date +%s) - START_S ))s; summary: $OUT/summary.md"
cat "$OUT/summary.md"
if (( RAN == 0 )); then
    log "nothing ran: exit 3"
    exit 3
fi
exit 0
