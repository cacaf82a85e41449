"""Decode attention on CUDA: the Triton kernel beside the torch reference, against copy
bandwidth, as plain data (`python -m pagedbatch.cli.kernel_bench` prints it).

First the device's copy bandwidth: a 1 GiB device-to-device copy, bytes read + written
per second. Then for each head shape, batch size and context length (every sequence
that long, its blocks shuffled through the pool): time per call (median,
triton.testing.do_bench, L2 flushed between calls) of the Triton decode kernel and of
the torch reference (gather pages, then SDPA), each as GB/s of the bytes decode must
read (K and V of every context token, once) and as a percent of copy bandwidth.
`goal_verdict` judges the goal: Triton >= 70% of copy bandwidth for batch >= 64 and
context >= 1024, on a cache in the queries' dtype. An fp8 cache (`kv_dtype` "fp8": float8
e4m3 with a scale per KV head) is timed the same way, both sides reading fp8 (the
reference dequantizes after its gather, the kernel in registers): its GB/s count its own
bytes, half of bfloat16's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SHAPES = {  # query heads, KV heads, head dim
    "smollm2-135m": (9, 3, 64),
    "llama-3.2-1b": (32, 8, 64),
    "qwen3-0.6b": (16, 8, 128),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
KV_DTYPES = ("auto", "fp8")  # the queries' dtype, or float8 e4m3
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
    kv_dtype: str = "auto"


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * COPY_BYTES / (ms * 1e-3)


def bench_case(
    name: str, batch: int, context: int, dtype: torch.dtype, block_size: int, device: torch.device,
    kv_dtype: str = "auto",
) -> Result:  # fmt: skip
    from pagedbatch.kernels import reference
    from pagedbatch.kernels.decode_attention import decode_attention, num_splits_for
    from triton.testing import do_bench

    num_heads, num_kv_heads, head_dim = SHAPES[name]
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    scales = {}
    if kv_dtype == "fp8":
        scales = {
            n: torch.full((num_kv_heads,), 1 / 64, device=device) for n in ("k_scale", "v_scale")
        }
        k_cache = reference.quantize(k_cache, scales["k_scale"])
        v_cache = reference.quantize(v_cache, scales["v_scale"])
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    lens_host, starts_host = [context] * batch, list(range(batch + 1))
    lens = torch.tensor(lens_host, dtype=torch.int32, device=device)
    starts = torch.tensor(starts_host, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5

    def run_triton() -> torch.Tensor:
        return decode_attention(
            query, k_cache, v_cache, tables, lens, starts, scale, context, **scales
        )

    def run_torch() -> torch.Tensor:
        return reference.paged_attention(
            query, k_cache, v_cache, tables, lens_host, starts_host, scale, **scales
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
    return Result(name, batch, context, splits, triton_ms, torch_ms, error, kv_bytes, kv_dtype)


class Goal(NamedTuple):
    """The goal's verdict: the judged case (batch >= 64, context >= 1024) whose Triton
    kernel came least close to copy bandwidth, and that fraction."""

    worst: Result
    fraction: float  # its KV bytes per second / copy bandwidth

    @property
    def met(self) -> bool:
        return self.fraction >= GOAL


def goal_verdict(results: list[Result], copy_bw: float) -> Goal | None:
    """The goal's verdict over `results` (None when no case is judged; fp8 caches are not)."""
    judged = [r for r in results if r.batch >= 64 and r.context >= 1024 and r.kv_dtype == "auto"]
    if not judged:
        return None
    worst = min(judged, key=lambda r: r.kv_bytes / r.triton_ms)
    return Goal(worst, worst.kv_bytes / (worst.triton_ms * 1e-3) / copy_bw)
