"""`python -m pagedbatch.cli.kernel_bench`: the decode kernel's bandwidth as a table.

    python -m pagedbatch.cli.kernel_bench                # SmolLM2 and Llama-3.2-1B heads
    python -m pagedbatch.cli.kernel_bench --batch-sizes 64 256 --contexts 1024 4096 --shapes qwen3-0.6b
    python -m pagedbatch.cli.kernel_bench --kv-dtype auto fp8   # an fp8 cache beside bf16's

A line per head shape, batch size, context length and KV dtype: the Triton decode kernel and the
torch reference, each in microseconds per call, GB/s of the KV bytes decode must read and
% of the device's copy bandwidth; the last line says whether the goal is met. What is
measured, and how: pagedbatch/kernels/bench.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from pagedbatch.kernels.bench import (
    DTYPES,
    GOAL,
    KV_DTYPES,
    SHAPES,
    Goal,
    Result,
    bench_case,
    copy_bandwidth,
    goal_verdict,
)

HEADER = (
    f"{'shape':<14} {'kv':>4} {'batch':>5} {'context':>7} {'splits':>6} "
    f"{'triton us':>10} {'GB/s':>8} {'% copy':>8} {'torch us':>10} {'GB/s':>8} {'% copy':>8} "
    f"{'speedup':>8} {'max err':>9}"
)


def row(result: Result, copy_bw: float) -> str:
    """One line of the table (columns as HEADER)."""

    def rate(ms: float | None) -> str:
        if ms is None:
            return f"{'out of memory':>28}"
        bw = result.kv_bytes / (ms * 1e-3)
        return f"{ms * 1e3:10.1f} {bw / 1e9:8.0f} {bw / copy_bw:8.0%}"

    speedup = f"{result.torch_ms / result.triton_ms:7.1f}x" if result.torch_ms else f"{'':>8}"
    error = f"{result.max_error:9.1e}" if result.max_error is not None else f"{'':>9}"
    return (
        f"{result.shape:<14} {result.kv_dtype:>4} {result.batch:>5} {result.context:>7} {result.splits:>6} "
        f"{rate(result.triton_ms)} {rate(result.torch_ms)} {speedup} {error}"
    )


def goal_line(verdict: Goal | None) -> str:
    if verdict is None:
        return "goal: no case with batch >= 64 and context >= 1024 was run"
    worst = verdict.worst
    return (
        f"goal (Triton >= {GOAL:.0%} of copy bandwidth, batch >= 64, context >= 1024): "
        f"{'met' if verdict.met else 'NOT met'}; worst {verdict.fraction:.0%} at "
        f"{worst.shape} batch {worst.batch} context {worst.context}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pagedbatch.cli.kernel_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes", nargs="+", choices=SHAPES, default=["smollm2-135m", "llama-3.2-1b"]
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 64, 256, 512])
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 2048, 4096, 8192])
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--kv-dtype", nargs="+", choices=KV_DTYPES, default=["auto"],
        help="the cache's dtype: auto (--dtype's) and/or fp8 (float8 e4m3, scaled per KV head; "
        "compute capability 8.9+)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "pagedbatch.cli.kernel_bench needs a CUDA GPU, and torch sees none. On CPU the "
            "kernels are checked by `pytest tests/test_kernels.py` (Triton's interpreter).",
            file=sys.stderr,
        )
        return 1
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; dtype {args.dtype}, "
          f"block size {args.block_size}; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
          "(read + written)")  # fmt: skip
    print(HEADER)
    results = []
    for name in args.shapes:
        for batch in args.batch_sizes:
            for context, kv in itertools.product(args.contexts, args.kv_dtype):
                result = bench_case(
                    name, batch, context, DTYPES[args.dtype], args.block_size, device, kv
                )
                results.append(result)
                print(row(result, copy_bw), flush=True)
    print(goal_line(goal_verdict(results, copy_bw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
