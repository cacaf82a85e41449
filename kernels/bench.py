"""Decode attention on CUDA: the Triton kernel beside the torch reference, against copy bandwidth.

    python -m pagedbatch.kernels.bench                       # SmolLM2 and Llama-3.2-1B heads
    python -m pagedbatch.kernels.bench --batch-sizes 64 256 --contexts 1024 4096 --shapes qwen3-0.6b

First the device's copy bandwidth: a 1 GiB device-to-device copy, bytes read + written
per second. Then for each head shape, batch size and context length (every sequence
that long, its blocks shuffled through the pool): time per call (median,
triton.testing.do_bench, L2 flushed between calls) of the Triton decode kernel and of
the torch reference (gather pages, then SDPA), each as GB/s of the bytes decode must
read (K and V of every context token, once) and as a percent of copy bandwidth. The
last line checks the goal: Triton >= 70% of copy bandwidth for batch >= 64 and
context >= 1024.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import torch

SHAPES = {  # query heads, KV heads, head dim
    "smollm2-135m": (9, 3, 64),
    "llama-3.2-1b": (32, 8, 64),
    "qwen3-0.6b": (16, 8, 128),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GOAL = 0.70  # of copy bandwidth, for batch >= 64 and context >= 1024
COPY_BYTES = 2**30


class Result(NamedTuple):
    shape: str
    batch: int
    context: int
    splits: int
    triton_ms: float
    torch_ms: float | None  # None: the reference ran out of memory
    max_error: float | None
    kv_bytes: int


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * COPY_BYTES / (ms * 1e-3)


def bench_case(
    name: str, batch: int, context: int, dtype: torch.dtype, block_size: int, device: torch.device
) -> Result:
    from pagedbatch.kernels import reference
    from pagedbatch.kernels.decode_attention import decode_attention, num_splits_for
    from triton.testing import do_bench

    num_heads, num_kv_heads, head_dim = SHAPES[name]
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    lens_host, starts_host = [context] * batch, list(range(batch + 1))
    lens = torch.tensor(lens_host, dtype=torch.int32, device=device)
    starts = torch.tensor(starts_host, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5

    def run_triton() -> torch.Tensor:
        return decode_attention(query, k_cache, v_cache, tables, lens, starts, scale, context)

    def run_torch() -> torch.Tensor:
        return reference.paged_attention(
            query, k_cache, v_cache, tables, lens_host, starts_host, scale
        )

    triton_ms = do_bench(run_triton, return_mode="median")
    try:
        expected = run_torch()
        error = (run_triton().float() - expected.float()).abs().max().item()
        del expected
        torch_ms = do_bench(run_torch, return_mode="median")
    except torch.OutOfMemoryError:
        torch_ms = error = None
    splits = num_splits_for(batch, num_kv_heads, context, device)
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
    return Result(name, batch, context, splits, triton_ms, torch_ms, error, kv_bytes)


def report(result: Result, copy_bw: float) -> str:
    def rate(ms: float | None) -> str:
        if ms is None:
            return f"{'out of memory':>28}"
        bw = result.kv_bytes / (ms * 1e-3)
        return f"{ms * 1e3:10.1f} {bw / 1e9:8.0f} {bw / copy_bw:8.0%}"

    speedup = f"{result.torch_ms / result.triton_ms:7.1f}x" if result.torch_ms else f"{'':>8}"
    error = f"{result.max_error:9.1e}" if result.max_error is not None else f"{'':>9}"
    return (
        f"{result.shape:<14} {result.batch:>5} {result.context:>7} {result.splits:>6} "
        f"{rate(result.triton_ms)} {rate(result.torch_ms)} {speedup} {error}"
    )


HEADER = (
    f"{'shape':<14} {'batch':>5} {'context':>7} {'splits':>6} "
    f"{'triton us':>10} {'GB/s':>8} {'% copy':>8} {'torch us':>10} {'GB/s':>8} {'% copy':>8} "
    f"{'speedup':>8} {'max err':>9}"
)


def goal_line(results: list[Result], copy_bw: float) -> str:
    judged = [r for r in results if r.batch >= 64 and r.context >= 1024]
    if not judged:
        return "goal: no case with batch >= 64 and context >= 1024 was run"
    worst = min(judged, key=lambda r: r.kv_bytes / r.triton_ms)
    fraction = worst.kv_bytes / (worst.triton_ms * 1e-3) / copy_bw
    verdict = "met" if fraction >= GOAL else "NOT met"
    return (
        f"goal (Triton >= {GOAL:.0%} of copy bandwidth, batch >= 64, context >= 1024): "
        f"{verdict}; worst {fraction:.0%} at {worst.shape} batch {worst.batch} "
        f"context {worst.context}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pagedbatch.kernels.bench",
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "pagedbatch.kernels.bench needs a CUDA GPU, and torch sees none. On CPU the "
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
            for context in args.contexts:
                result = bench_case(
                    name, batch, context, DTYPES[args.dtype], args.block_size, device
                )
                results.append(result)
                print(report(result, copy_bw), flush=True)
    print(goal_line(results, copy_bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
