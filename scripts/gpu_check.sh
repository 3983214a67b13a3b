#!/usr/bin/env bash
# One prepared GPU check (issue 16): every figure the project owes a GPU, in one run of under 8 minutes on one
# H100 / H200, needing only torch, transformers, peft and torchao (the project's own dependencies).
#
#   scripts/gpu_check.sh             the 7B shape, random bf16 weights, on cuda
#   scripts/gpu_check.sh --dry-run   the same stages on the CPU with the tiny shape (CI time); also DRY_RUN=1
#
# Stages, each a `python -m bench ...` writing a JSON report, each under its own time limit (a stage that fails or
# runs out of time is recorded as such and the next one still runs):
#   train              training step, ours vs PEFT, Alpaca-like lengths (ours: batches grouped by length)
#   generate_eager     greedy decode at batch 1 and 8, ours eager vs PEFT generate
#   generate_compiled  the same with ours' decode step through torch.compile (CUDA graphs)
#   memory_nf4         NF4 7B training memory: predicted and measured peak
# Then `python -m bench.gpu_check` writes $OUT/gpu_check.json and $OUT/gpu_check.md and prints the table.
#
# Environment: OUT (default ./gpu_check_out), PY (default .venv/bin/python when present, else python3),
# LIMIT_TRAIN / LIMIT_EAGER / LIMIT_COMPILED / LIMIT_MEMORY: seconds per stage (defaults below sum to 8 minutes).
# Exit status: 0 when every stage succeeded, 1 otherwise (the table still shows what did), 2 on bad arguments.
set -uo pipefail

DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT" || exit 2
rm -f "$OUT"/*.json "$OUT/gpu_check.md"
: > "$OUT/stages.tsv"

if [ "$DRY_RUN" = 1 ]; then
    # Tiny shape, fp32 on one CPU thread, few steps; one batch size so the compiled stage compiles once.
    COMMON=(--device cpu --dtype float32 --shape tiny --threads 1)
    TRAIN=(--batch 4 --steps 2 --warmup 1)
    GENERATE=(--batch 2 --seq 16 --new-tokens 8 --steps 1 --warmup 1)
    MEMORY=(--shape tiny --quantize nf4 --batch 2 --seq 64 --measure --device cpu)
    DEFAULT_LIMITS=(300 120 300 120)
else
    # Defaults of `python -m bench` on cuda: train batch 8 of Alpaca-like rows, 10 timed steps after 3; generate
    # 256-token prompts, 128 new tokens, 3 timed generations after 1 (the warmup one compiles).
    COMMON=(--device cuda --dtype bfloat16 --shape 7b)
    TRAIN=()
    GENERATE=(--batch 1,8)
    MEMORY=(--shape 7b --quantize nf4 --measure --device cuda)
    DEFAULT_LIMITS=(100 100 200 80)
fi
LIMIT_TRAIN="${LIMIT_TRAIN:-${DEFAULT_LIMITS[0]}}"
LIMIT_EAGER="${LIMIT_EAGER:-${DEFAULT_LIMITS[1]}}"
LIMIT_COMPILED="${LIMIT_COMPILED:-${DEFAULT_LIMITS[2]}}"
LIMIT_MEMORY="${LIMIT_MEMORY:-${DEFAULT_LIMITS[3]}}"

# stage NAME LIMIT_S COMMAND...: run it under `timeout` (exit 124 when the limit ends it; the signal reaches the
# bench's worker processes too: timeout signals its whole process group) and append NAME, status, seconds.
stage() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s): $*" >&2
    local start tenths status
    start=$(date +%s%N)
    timeout --kill-after=15 "$limit" "$@"
    status=$?
    tenths=$((($(date +%s%N) - start) / 100000000))
    printf '%s\t%d\t%d.%d\n' "$name" "$status" $((tenths / 10)) $((tenths % 10)) >> "$OUT/stages.tsv"
}

stage train "$LIMIT_TRAIN" \
    "$PY" -m bench train "${COMMON[@]}" --lengths alpaca "${TRAIN[@]}" --json "$OUT/train_lengths.json"
stage generate_eager "$LIMIT_EAGER" \
    "$PY" -m bench generate "${COMMON[@]}" "${GENERATE[@]}" --json "$OUT/generate_eager.json"
stage generate_compiled "$LIMIT_COMPILED" \
    "$PY" -m bench generate "${COMMON[@]}" "${GENERATE[@]}" --compile --json "$OUT/generate_compiled.json"
stage memory_nf4 "$LIMIT_MEMORY" \
    "$PY" -m bench memory "${MEMORY[@]}" --json "$OUT/memory_nf4.json"

echo "== table ($OUT/gpu_check.md, $OUT/gpu_check.json)" >&2
"$PY" -m bench.gpu_check "$OUT"
