#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call of at most 540 s (520 s of limits
# below, Triton compiles included; kernel-compile runs beside kernels-tests), for a
# session that is lent one. Each check has its
# own time limit; a summary line per check is printed at the end even when a check fails
# or times out. Reports go to $OUT (default ./gpu-reports):
#   kernels-tests.txt   CUDA cases of tests/test_kernels.py (the quick grid: the CPU's pairs)
#   kernel-compile.txt  tests/test_kernel_compile.py: every launch compiled for sm_90 and
#                       sm_80 (registers, shared memory, spills); needs no GPU, so it runs on
#                       the CPUs beside kernels-tests, whose results do not depend on timing
#   engine-tests.txt    greedy tokens on CUDA: triton vs transformers (float32), CUDA-graph
#                       decode vs eager vs transformers, triton vs torch in bf16; whole
#                       steps under set_sync_debug_mode("error") (tests/test_host_copies.py)
#   kernel-bench.txt    decode kernel GB/s and % of copy bandwidth, bf16 and fp8 caches
#                       (batch 256, contexts 1024 and 4096: 8 cases, as many as before)
#   host-overhead.txt   host ms per step by phase at 256 sequences, sharing on (CUDA, graphs)
#   bench-share.txt     share workload, llama-1b-random bf16: pagedbatch (CUDA graphs) vs
#                       transformers generate and generate_batch in one run, % of the HBM
#                       floor per step
#   bench-cascade.txt   the same workload without CUDA graphs (eager decode), pagedbatch
#                       with and without cascade attention: KV reads saved, ms and K/V MB
#                       read per decode step (goal: MB/step down >= 3x, ms/step with it)
#   structured.txt      structured output on CUDA (skipped where xgrammar is not installed:
#                       the GPU image lacks it): constrained greedy tokens with CUDA graphs
#                       equal the CPU's; label workload, smollm2-135m-random, every output
#                       under a regex against unconstrained in one run: decode ms/step
#                       (goal: equal, the mask filled on the host while the forward runs)
#                       and the masks' host ms per step
# The GPU machines carry torch, triton, transformers, typer, rich, pytest; not datasets/gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-reports}
mkdir -p "$OUT"
SUMMARY=()

check() {  # check NAME SECONDS COMMAND...: run it, report to $OUT/NAME.txt, remember a line
    local name=$1 limit=$2 started rc
    shift 2
    started=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    local took=$(( $(date +%s) - started )) verdict=ok
    [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${limit}s" || { [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"; }
    SUMMARY+=("$(printf '%-15s %-24s %4ss  %s' "$name" "$verdict" "$took" "$(tail -n 1 "$OUT/$name.txt" | cut -c1-110)")")
}

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1
nvidia-smi -L >"$OUT/device.txt" 2>&1

(  # its own summary line comes back through a file: this runs in a subshell
    check kernel-compile 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_kernel_compile.py
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/kernel-compile.summary"
) &
compiling=$!
PAGEDBATCH_KERNEL_GRID=quick check kernels-tests 100 \
    python3 -m pytest -q -p no:cacheprovider -m cuda -x tests/test_kernels.py
wait "$compiling"
SUMMARY+=("$(cat "$OUT/kernel-compile.summary")")
check engine-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
    tests/test_host_copies.py::test_cuda_engine_steps_never_synchronise_but_on_their_readback
check kernel-bench 45 python3 -m pagedbatch.cli.kernel_bench --batch-sizes 256 --contexts 1024 4096 \
    --kv-dtype auto fp8
check host-overhead 55 python3 -m pagedbatch bench --host-overhead --device cuda --json
check bench-share 100 python3 -m pagedbatch bench --workload share --model llama-1b-random \
    --config gpu --num-prompts 256 --skip pagedbatch-no-cascade
check bench-cascade 60 python3 -m pagedbatch bench --workload share --model llama-1b-random \
    --config gpu --num-prompts 256 --no-cuda-graphs --skip pagedbatch-no-sharing \
    --skip generate --skip generate_batch
check structured 40 bash -c 'python3 -c "import xgrammar" 2>/dev/null || {
    echo "skipped: xgrammar is not installed"; exit 0; }
    python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_structured.py &&
    python3 -m pagedbatch bench --workload label --model smollm2-135m-random --config gpu \
        --num-prompts 256 --regex "(positive|negative|mixed)( [a-z]{1,8}){0,3}" \
        --skip pagedbatch-no-cascade --skip pagedbatch-no-sharing --skip generate \
        --skip generate_batch'

echo "== pagedbatch GPU checks ($(head -n 1 "$OUT/device.txt"))"
printf '%s\n' "${SUMMARY[@]}"
