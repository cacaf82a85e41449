#!/usr/bin/env bash
# How torch's CPU thread count changes a `pagedbatch run` job, on an idle machine and
# with one core kept busy by another process (a shared CI runner, a second job).
# Usage: scripts/bench_threads.sh [RECORDS [THREADS...]]   (default: 24 records; 1, 2, default)
# Prints one line per run: load, --threads, wall seconds of the whole process.
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${1:-24}
shift || true
THREADS=("$@")
[ ${#THREADS[@]} -gt 0 ] || THREADS=(1 2 default)
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; kill "${BUSY:-0}" 2>/dev/null || true' EXIT
head -n "$RECORDS" examples/label_job.jsonl >"$WORK/in.jsonl"

run_once() {  # run_once LOAD THREADS
    local flags=() TIMEFORMAT="$1 threads=$2 %1R s"
    [ "$2" = default ] || flags=(--threads "$2")
    time "$PY" -m pagedbatch run "$WORK/in.jsonl" -o "$WORK/out.jsonl" --overwrite \
        --no-progress --device cpu --max-tokens 16 "${flags[@]}" >/dev/null 2>&1
}

"$PY" -m pagedbatch run "$WORK/in.jsonl" -o "$WORK/out.jsonl" --overwrite --no-progress \
    --device cpu --max-tokens 1 >/dev/null 2>&1  # warm: model conversion cached, files read
for t in "${THREADS[@]}"; do run_once idle "$t"; done
"$PY" -c "while True: pass" &
BUSY=$!
sleep 2
for t in "${THREADS[@]}"; do run_once busy "$t"; done
