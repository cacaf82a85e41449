#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (about 10 minutes on an H100), for a
# session that is lent one. Writes its reports to $OUT (default ./gpu-reports):
#   kernels-tests.txt  the CUDA cases of tests/test_kernels.py (full grid, no host sync)
#   engine-tests.txt   greedy tokens: triton vs torch attention, and vs transformers, on CUDA
#   kernel-bench.txt   decode kernel vs torch reference, GB/s and % of copy bandwidth
#   bench-*.txt        pagedbatch bench workloads on the random-weight presets
# The GPU machines carry torch, triton, transformers, typer and rich, not datasets/gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-reports}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1
nvidia-smi -L >"$OUT/device.txt" 2>&1

timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda -x tests/test_kernels.py \
    >"$OUT/kernels-tests.txt" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
    >"$OUT/engine-tests.txt" 2>&1
timeout 120 python3 -m pagedbatch.kernels.bench >"$OUT/kernel-bench.txt" 2>&1
for model in llama-1b-random smollm2-135m-random; do
    timeout 90 python3 -m pagedbatch bench --workload share --model "$model" --config gpu \
        --num-prompts 256 >"$OUT/bench-share-$model.txt" 2>&1
done
timeout 90 python3 -m pagedbatch bench --workload label --model llama-1b-random --config gpu \
    >"$OUT/bench-label-llama-1b-random.txt" 2>&1
tail -n 3 "$OUT"/*.txt
