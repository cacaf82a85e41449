"""Triton kernels against the torch references in kernels/reference.py, and the engine on them.

CPU: the kernels run in Triton's interpreter, which TRITON_INTERPRET=1 turns on only if
it is set before triton is imported, and importing torch imports triton. So a plain
`pytest` on a machine without CUDA runs this file again in a child process with it set
(`test_cpu_cases_in_triton_interpreter`); `TRITON_INTERPRET=1 pytest ...` runs the CPU
cases in-process. Small shapes and a covering subset of the grid keep them quick.
CUDA (marked `cuda`, skipped without a GPU): the full grid, long contexts, no host sync.

Every case draws fresh random inputs; outputs and every cache slot not holding a live
token are NaN, so a kernel that reads or skips the wrong slot fails. The store must
match exactly; attention within TOLERANCE of the float32 reference on the same inputs.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton")

from pagedbatch.kernels import reference, triton_common  # noqa: E402
from pagedbatch.kernels.cascade_attention import DecodeCascade  # noqa: E402
from pagedbatch.kernels.decode_attention import (  # noqa: E402
    SplitWorkspace,
    decode_attention,
    num_splits_for,
)
from pagedbatch.kernels.prefill_attention import ExtendCascade, prefill_attention  # noqa: E402
from pagedbatch.kernels.store import store_kv  # noqa: E402

from pagedbatch import LLM, SamplingParams  # noqa: E402
from pagedbatch.engine.attention import PagedAttention, resolve_backend  # noqa: E402
from pagedbatch.engine.cascade import ANY_GROUP  # noqa: E402
from pagedbatch.engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402

# Triton 3.6's interpreter converts one-element arrays to ints, which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # rtol = atol
NAN = float("nan")

HAS_CUDA = torch.cuda.is_available() and not triton_common.INTERPRETED
ON_CPU = pytest.mark.skipif(
    not triton_common.INTERPRETED,
    reason="runs under Triton's interpreter (test_cpu_cases_in_triton_interpreter, no CUDA)",
)
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


@pytest.mark.skipif(
    triton_common.INTERPRETED or torch.cuda.is_available(), reason="the cases run in-process"
)
def test_cpu_cases_in_triton_interpreter():
    """This file again, in a child process whose environment turns the interpreter on."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


class Case(NamedTuple):
    device: str
    dtype: torch.dtype
    group: int  # query heads per KV head
    block_size: int
    head_dim: int

    @property
    def num_kv_heads(self) -> int:
        return 2 if self.device == "cpu" else 4

    @property
    def long(self) -> int:
        """A context spanning many blocks (interpreter: ~10 blocks; CUDA: thousands of tokens)."""
        return 9 * self.block_size + 5 if self.device == "cpu" else 3001


def _cases() -> list:
    """CPU: every pair of dtype, GQA ratio, block size, head dim; CUDA: every combination.

    Head dims 80 and 96 are masked tails of a 128 tile; 8 is padded up to tl.dot's 16.
    """
    sizes, dims = (8, 16, 32), (64, 128, 80)
    cpu = [
        Case("cpu", dtype, group, sizes[(a + b) % 3], dims[(a + 2 * b) % 3])
        for (a, dtype), (b, group) in itertools.product(enumerate(DTYPES), enumerate((1, 3, 8)))
    ] + [Case("cpu", torch.float32, 2, 16, 8)]
    cuda = [
        Case("cuda", *c)
        for c in itertools.product(DTYPES, (1, 2, 3, 4, 8), sizes, (64, 128, 80, 96, 8))
    ]
    if os.environ.get("PAGEDBATCH_KERNEL_GRID") == "quick":  # the CPU's pairs, on CUDA
        cuda = [Case("cuda", *c[1:]) for c in cpu] + [Case("cuda", torch.bfloat16, 4, 16, 96)]
    return [pytest.param(c, marks=ON_CPU, id=_case_id(c)) for c in cpu] + [
        pytest.param(c, marks=ON_CUDA, id=_case_id(c)) for c in cuda
    ]


def _case_id(c: Case) -> str:
    return f"{c.device}-{str(c.dtype)[6:]}-gqa{c.group}-bs{c.block_size}-d{c.head_dim}"


CASES = _cases()


class Paged(NamedTuple):
    """One layer's paged inputs: live slots random, every other slot NaN."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: list[int]
    query_start_loc: list[int]

    def device_lens(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.query.device
        return (
            torch.tensor(self.context_lens, dtype=torch.int32, device=device),
            torch.tensor(self.query_start_loc, dtype=torch.int32, device=device),
        )

    def reference(self, scale: float, window: int | None = None) -> torch.Tensor:
        """The float32 reference on the same (rounded) inputs."""
        return reference.paged_attention(
            self.query.float(), self.k_cache.float(), self.v_cache.float(), self.block_tables,
            self.context_lens, self.query_start_loc, scale, window,
        )  # fmt: skip


def paged_inputs(case: Case, context_lens: list[int], query_lens: list[int]) -> Paged:
    """Sequences on shuffled (non-contiguous) blocks of a pool with a few spare blocks."""
    bs, heads, dim = case.block_size, case.num_kv_heads, case.head_dim
    counts = [-(-n // bs) for n in context_lens]
    num_blocks = sum(counts) + 3
    ids = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n, count in zip(context_lens, counts):
        table, ids = ids[:count], ids[count:]
        tables.append(table + [0] * (max(counts) - count))
        slots += [table[p // bs] * bs + p % bs for p in range(n)]
    caches = []
    for _ in range(2):
        cache = torch.full((num_blocks, bs, heads, dim), NAN, dtype=case.dtype)
        cache.view(-1, heads, dim)[slots] = torch.randn(len(slots), heads, dim).to(case.dtype)
        caches.append(cache.to(case.device))
    starts = list(itertools.accumulate(query_lens, initial=0))
    query = torch.randn(starts[-1], heads * case.group, dim).to(case.device, case.dtype)
    block_tables = torch.tensor(tables, dtype=torch.int32, device=case.device)
    return Paged(query, *caches, block_tables, context_lens, starts)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def ragged(case: Case) -> list[int]:
    bs = case.block_size
    return [1, bs - 1, bs, bs + 1, case.long]


@pytest.mark.parametrize("case", CASES)
def test_store_kv_writes_exactly_the_reference_slots(case: Case):
    heads, dim = case.num_kv_heads, case.head_dim
    num_blocks = 7
    num_tokens = 2 * case.block_size + 3
    slots = torch.randperm(num_blocks * case.block_size)[:num_tokens]
    slots[::5] = -1  # padding
    # Strided like the engine's views of the attention projections.
    key = torch.randn(heads, num_tokens, dim).to(case.device, case.dtype).transpose(0, 1)
    value = torch.randn(heads, num_tokens, dim).to(case.device, case.dtype).transpose(0, 1)
    k_cache = torch.full((num_blocks, case.block_size, heads, dim), NAN, dtype=case.dtype)
    k_cache, v_cache = k_cache.to(case.device), k_cache.clone().to(case.device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = slots.to(case.device)

    store_kv(key, value, k_cache, v_cache, slots)

    reference.store_kv(key, value, expected_k, expected_v, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(case: Case):
    lens = ragged(case)
    paged = paged_inputs(case, lens, [1] * len(lens))
    context_lens, query_start_loc = paged.device_lens()
    # Several splits where the default would give one (the interpreter counts 1 SM):
    # chunks of whole key tiles, empty ones past a short sequence's end.
    num_splits = 4 if case.group != 3 else None
    out = torch.full_like(paged.query, NAN)

    decode_attention(
        paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
        query_start_loc, 0.125, max(lens), num_splits=num_splits, out=out,
    )  # fmt: skip

    assert_close(out, paged.reference(0.125), case.dtype)


def cascade_inputs(case: Case) -> tuple[Paged, DecodeCascade]:
    """Six decoding sequences: 0-2 share their first 3 blocks, 3-4 their first 2, 5 none."""
    bs = case.block_size
    lens = [3 * bs + 1, 4 * bs + 3, 3 * bs + 2, 2 * bs + 1, case.long, bs + 2]
    paged = paged_inputs(case, lens, [1] * len(lens))
    tables = paged.block_tables.clone()
    groups = [([0, 1, 2], 3), ([3, 4], 2)]
    for members, blocks in groups:  # the same pages, so the same keys and values
        tables[members[1:], :blocks] = tables[members[0], :blocks]
    paged = paged._replace(block_tables=tables)
    device, i32 = case.device, torch.int32
    starts = [0] * len(lens)
    for members, blocks in groups:
        for m in members:
            starts[m] = blocks * bs
    width = max(b for _, b in groups)
    prefix = [tables[m[0], :width].tolist() for m, _ in groups]
    cascade = DecodeCascade(
        starts=torch.tensor(starts, dtype=i32, device=device),
        prefix_tables=torch.tensor(prefix, dtype=i32, device=device),
        prefix_lens=torch.tensor([b * bs for _, b in groups], dtype=i32, device=device),
        members=torch.tensor([m + [0] * (3 - len(m)) for m, _ in groups], dtype=i32, device=device),
        num_members=torch.tensor([len(m) for m, _ in groups], dtype=i32, device=device),
        max_members=3,
    )
    return paged, cascade


@pytest.mark.parametrize("case", CASES)
def test_cascade_decode_reads_shared_prefixes_once_and_matches_reference(case: Case):
    paged, cascade = cascade_inputs(case)
    context_lens, query_start_loc = paged.device_lens()
    for num_splits in (1, 3):
        out = torch.full_like(paged.query, NAN)
        decode_attention(
            paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
            query_start_loc, 0.125, max(paged.context_lens), num_splits=num_splits, out=out,
            cascade=cascade,
        )  # fmt: skip
        assert_close(out, paged.reference(0.125), case.dtype)


def extend_cascade_inputs(case: Case) -> tuple[Paged, ExtendCascade, int]:
    """Six extending sequences: 0-2 share their first 3 blocks, 3-4 their first 2, 5 none;
    and the most new tokens of one."""
    bs = case.block_size
    # (context, new tokens): every shared block was cached before the step (context - new
    # tokens >= the prefix).
    seqs = [(3 * bs + 5, 4), (4 * bs + 2, bs + 1), (3 * bs + 3, 3), (2 * bs + 6, 5),
            (case.long, 7), (bs + 4, 4)]  # fmt: skip
    paged = paged_inputs(case, [c for c, _ in seqs], [q for _, q in seqs])
    tables = paged.block_tables.clone()
    groups = [([0, 1, 2], 3), ([3, 4], 2)]
    for members, blocks in groups:
        tables[members[1:], :blocks] = tables[members[0], :blocks]
    paged = paged._replace(block_tables=tables)
    qsl, device, i32 = paged.query_start_loc, case.device, torch.int32
    starts = [0] * len(seqs)
    token_rows = []
    for members, blocks in groups:
        token_rows.append([r for m in members for r in range(qsl[m], qsl[m + 1])])
        for m in members:
            starts[m] = blocks * bs
    most = max(map(len, token_rows))
    cascade = ExtendCascade(
        DecodeCascade(
            starts=torch.tensor(starts, dtype=i32, device=device),
            prefix_tables=torch.tensor(
                [tables[m[0], :3].tolist() for m, _ in groups], dtype=i32, device=device
            ),
            prefix_lens=torch.tensor([b * bs for _, b in groups], dtype=i32, device=device),
            members=torch.tensor(
                [r + [0] * (most - len(r)) for r in token_rows], dtype=i32, device=device
            ),
            num_members=torch.tensor([len(r) for r in token_rows], dtype=i32, device=device),
            max_members=most,
        ),
        rows=torch.tensor([r for rs in token_rows for r in rs], device=device),
    )
    return paged, cascade, max(q for _, q in seqs)


@pytest.mark.parametrize("case", CASES)
def test_cascade_extend_reads_shared_prefixes_once_and_matches_reference(case: Case):
    paged, cascade, max_query_len = extend_cascade_inputs(case)
    context_lens, query_start_loc = paged.device_lens()
    out = torch.full_like(paged.query, NAN)
    prefill_attention(
        paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
        query_start_loc, 0.125, max_query_len, out=out, cascade=cascade,
    )  # fmt: skip
    assert_close(out, paged.reference(0.125), case.dtype)


@pytest.mark.parametrize("case", CASES[:2])
def test_decode_reuses_one_split_workspace_and_writes_directly_with_one_split(case: Case):
    lens = ragged(case)
    paged = paged_inputs(case, lens, [1] * len(lens))
    context_lens, query_start_loc = paged.device_lens()
    args = (paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
            query_start_loc, 0.125, max(lens))  # fmt: skip
    workspace = SplitWorkspace(paged.query.device)
    for splits in (4, 2, 1):
        out = torch.full_like(paged.query, NAN)
        decode_attention(*args, num_splits=splits, out=out, workspace=workspace)
        assert_close(out, paged.reference(0.125), case.dtype)
        if splits == 4:
            storage = workspace.out.data_ptr()
    assert workspace.out.data_ptr() == storage, "a smaller call reallocated the workspace"
    assert workspace.out.shape[:3] == (len(lens), paged.query.shape[1], 4)


@pytest.mark.parametrize("case", CASES)
def test_prefill_matches_reference_with_cached_prefixes(case: Case):
    bs = case.block_size
    # (new tokens, context): whole prompts of ragged lengths, suffixes after a cached
    # prefix, and a single new token.
    pairs = [(1, 1), (bs - 1, bs - 1), (bs, bs), (bs + 1, bs + 1), (3, case.long),
             (2 * bs + 3, case.long + 7), (1, 2 * bs)]  # fmt: skip
    query_lens, lens = zip(*pairs)
    paged = paged_inputs(case, list(lens), list(query_lens))
    context_lens, query_start_loc = paged.device_lens()
    out = torch.full_like(paged.query, NAN)

    prefill_attention(
        paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
        query_start_loc, 0.125, max(query_lens), out=out,
    )  # fmt: skip

    assert_close(out, paged.reference(0.125), case.dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].head_dim == 64])
def test_mixed_batch_with_sliding_window(case: Case):
    """The engine's dispatch: decode rows by one kernel, the rest by the other, one output."""
    bs = case.block_size
    window = bs + 3
    pairs = [(1, case.long), (bs + 2, bs + 2), (1, 2), (5, case.long - 4), (1, window + 1)]
    query_lens, lens = zip(*pairs)
    paged = paged_inputs(case, list(lens), list(query_lens))
    context_lens, query_start_loc = paged.device_lens()
    args = (paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
            query_start_loc, 0.125)  # fmt: skip
    out = torch.full_like(paged.query, NAN)

    decode_attention(*args, max(lens), window, num_splits=3, out=out)
    prefill_attention(*args, max(query_lens), window, min_query_len=2, out=out)

    assert_close(out, paged.reference(0.125, window), case.dtype)


def _fp8_cases() -> list:
    """An fp8 cache under a 16- and a 32-bit model. CPU: two cases; CUDA: 16-bit queries
    with every GQA ratio and head dim of the CPU grid, and float32 (the quick grid: the
    CPU's two)."""
    cpu = [Case("cpu", torch.bfloat16, 3, 8, 64), Case("cpu", torch.float32, 2, 16, 80)]
    cuda = [
        Case("cuda", dtype, group, 16, dim)
        for dtype, group, dim in itertools.product(
            (torch.bfloat16, torch.float16), (1, 3, 8), (64, 128, 80)
        )
    ] + [Case("cuda", torch.float32, 4, 16, 128)]
    if os.environ.get("PAGEDBATCH_KERNEL_GRID") == "quick":  # the CPU's, on CUDA
        cuda = [Case("cuda", *c[1:]) for c in cpu]
    return [pytest.param(c, marks=ON_CPU, id=f"fp8-{_case_id(c)}") for c in cpu] + [
        pytest.param(c, marks=ON_CUDA, id=f"fp8-{_case_id(c)}") for c in cuda
    ]


FP8_CASES = _fp8_cases()


def to_fp8(paged: Paged) -> tuple[Paged, dict[str, torch.Tensor]]:
    """`paged` with its caches quantized to fp8 by random scales of each KV head (a few
    entries saturate; slots holding no token stay NaN), and those scales."""
    heads, device = paged.k_cache.shape[2], paged.query.device
    scales = {n: (torch.rand(heads) / 100 + 0.004).to(device) for n in ("k_scale", "v_scale")}
    k8 = reference.quantize(paged.k_cache, scales["k_scale"])
    v8 = reference.quantize(paged.v_cache, scales["v_scale"])
    return paged._replace(k_cache=k8, v_cache=v8), scales


def fp8_reference(paged: Paged, scales: dict, window: int | None = None) -> torch.Tensor:
    """The torch reference's fp8 path (dequantized into float32) on the same inputs."""
    return reference.paged_attention(
        paged.query.float(), paged.k_cache, paged.v_cache, paged.block_tables,
        paged.context_lens, paged.query_start_loc, 0.125, window, **scales,
    )  # fmt: skip


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_store_writes_the_reference_bytes(case: Case):
    """Quantized as the reference quantizes: ties to even, subnormals, saturation, -0."""
    heads, dim, device = case.num_kv_heads, case.head_dim, case.device
    num_blocks, num_tokens = 5, 2 * case.block_size + 3
    slots = torch.randperm(num_blocks * case.block_size)[:num_tokens]
    slots[::5] = -1  # padding
    spread = torch.logspace(-3, 1.5, heads)[None, :, None]  # tiny to saturating, per head
    key = (torch.randn(heads, num_tokens, dim) * spread.transpose(0, 1)).transpose(0, 1)
    value = torch.randn(num_tokens, heads, dim) * spread
    key[0, 0, :2] = torch.tensor([-0.0, 1e9])
    scales = {n: (torch.rand(heads) / 10 + 0.01).to(device) for n in ("k_scale", "v_scale")}
    # Every e4m3 value times the scale, and every midpoint between two (ties): in head 0.
    grid = torch.arange(256, dtype=torch.uint8).view(reference.FP8).float()
    grid = grid[grid.isfinite()].unique()
    exact = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]) * scales["v_scale"][0].cpu()
    head0 = value[:, 0].flatten()
    head0[: exact.numel()] = exact[: head0.numel()]
    value[:, 0] = head0.view(num_tokens, dim)
    key, value = key.to(device, case.dtype), value.to(device, case.dtype)
    cache = torch.full((num_blocks, case.block_size, heads, dim), 0x7F, dtype=torch.uint8)
    caches = [cache.clone().to(device).view(reference.FP8) for _ in range(4)]
    slots = slots.to(device)

    store_kv(key, value, *caches[:2], slots, **scales)

    reference.store_kv(key, value, *caches[2:], slots, **scales)
    for got, want in zip(caches[:2], caches[2:]):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_decode_and_prefill_match_the_references_fp8_path(case: Case):
    """A mixed batch with a sliding window, and the prefill of whole prompts."""
    bs = case.block_size
    window = bs + 3
    pairs = [(1, case.long), (bs + 2, bs + 2), (1, 2), (5, case.long - 4), (1, window + 1)]
    query_lens, lens = zip(*pairs)
    paged, scales = to_fp8(paged_inputs(case, list(lens), list(query_lens)))
    context_lens, query_start_loc = paged.device_lens()
    args = (paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
            query_start_loc, 0.125)  # fmt: skip
    for seen in (window, None):
        out = torch.full_like(paged.query, NAN)
        decode_attention(*args, max(lens), seen, num_splits=3, out=out, **scales)
        prefill_attention(*args, max(query_lens), seen, min_query_len=2, out=out, **scales)
        assert_close(out, fp8_reference(paged, scales, seen), case.dtype)


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_cascade_decode_and_extend_match_the_references_fp8_path(case: Case):
    paged, cascade = cascade_inputs(case)
    paged, scales = to_fp8(paged)
    context_lens, query_start_loc = paged.device_lens()
    out = torch.full_like(paged.query, NAN)
    decode_attention(
        paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
        query_start_loc, 0.125, max(paged.context_lens), num_splits=3, out=out,
        cascade=cascade, **scales,
    )  # fmt: skip
    assert_close(out, fp8_reference(paged, scales), case.dtype)

    paged, cascade, max_query_len = extend_cascade_inputs(case)
    paged, scales = to_fp8(paged)
    context_lens, query_start_loc = paged.device_lens()
    out = torch.full_like(paged.query, NAN)
    prefill_attention(
        paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
        query_start_loc, 0.125, max_query_len, out=out, cascade=cascade, **scales,
    )  # fmt: skip
    assert_close(out, fp8_reference(paged, scales), case.dtype)


@pytest.mark.skipif(not (HAS_CUDA or triton_common.INTERPRETED), reason="no Triton device here")
def test_fp8_calls_without_their_scales_are_value_errors():
    case = Case("cuda" if HAS_CUDA else "cpu", torch.bfloat16, 2, 16, 64)
    paged = paged_inputs(case, [5], [5])
    fp8, scales = to_fp8(paged)
    context_lens, query_start_loc = paged.device_lens()
    tail = (paged.block_tables, context_lens, query_start_loc, 0.125, 5)
    with pytest.raises(ValueError, match="an fp8 cache is read and written with its scales"):
        prefill_attention(fp8.query, fp8.k_cache, fp8.v_cache, *tail)
    with pytest.raises(ValueError, match="k_scale and v_scale are an fp8 cache's"):
        decode_attention(paged.query, paged.k_cache, paged.v_cache, *tail, **scales)
    with pytest.raises(ValueError, match=r"k_scale and v_scale must be \[2\] float32"):
        store_kv(paged.query[:, :2], paged.query[:, :2], fp8.k_cache, fp8.v_cache,
                 torch.arange(5, device=case.device), k_scale=scales["k_scale"][:1],
                 v_scale=scales["v_scale"][:1])  # fmt: skip


@pytest.mark.skipif(not (HAS_CUDA or triton_common.INTERPRETED), reason="no Triton device here")
def test_bad_calls_are_value_errors():
    case = Case("cuda" if HAS_CUDA else "cpu", torch.float32, 2, 16, 64)
    paged = paged_inputs(case, [5], [5])
    context_lens, query_start_loc = paged.device_lens()
    tail = (paged.block_tables, context_lens, query_start_loc, 0.125, 5)
    with pytest.raises(ValueError, match="k_cache is torch.float32, expected torch.bfloat16"):
        prefill_attention(paged.query.bfloat16(), paged.k_cache, paged.v_cache, *tail)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of . KV heads"):
        prefill_attention(paged.query[:, :3], paged.k_cache, paged.v_cache, *tail)
    big = torch.zeros(2, 16, 2, 320, device=case.device)
    with pytest.raises(ValueError, match="head_dim must be in 1..256"):
        decode_attention(torch.zeros(5, 4, 320, device=case.device), big, big, *tail)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        decode_attention(paged.query, paged.k_cache, paged.v_cache, *tail, 0)


def test_split_count_is_host_arithmetic_on_shapes():
    cpu = torch.device("cpu")  # counts as one SM: PROGRAMS_PER_SM programs wanted
    assert num_splits_for(1, 1, 100, cpu) == 1  # too short to split
    assert num_splits_for(1, 1, 8192, cpu) == 4
    assert num_splits_for(2, 2, 8192, cpu) == 1  # enough programs already


def test_triton_attention_without_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(triton_common, "INTERPRETED", False)
    cache = KVCache(KVCacheSpec(1, 2, 16, 8, torch.float32), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 in the environment"):
        PagedAttention(cache, "triton")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def _greedy(model_dir, prompts: list[list[int]], **config) -> list[list[int]]:
    llm = LLM(model_dir, num_blocks=64, **config)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8))
    return [list(out.completions[0].token_ids) for out in outputs]


ENGINE_DEVICES = [
    pytest.param("cpu", marks=ON_CPU, id="cpu"),
    pytest.param("cuda", marks=ON_CUDA, id="cuda"),
]


@pytest.mark.parametrize("device", ENGINE_DEVICES)
@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: the sliding-window path
def test_engine_greedy_tokens_match_torch_attention(tiny_model_dirs, arch, device):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (3, 17, 40, 70)]
    # 32 tokens a step: long prompts are prefilled in chunks, later chunks extend a cached prefix.
    config = {"device": device, "dtype": "float32", "max_batch_tokens": 32}
    expected = _greedy(tiny_model_dirs[arch], prompts, attention="torch", **config)
    assert _greedy(tiny_model_dirs[arch], prompts, attention="triton", **config) == expected


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_engine_cascade_on_triton_matches_torch(tiny_model_dirs, device):
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 400, (37,), generator=gen).tolist()  # 2 whole blocks of 16
    prompts = [
        shared + torch.randint(3, 400, (n,), generator=gen).tolist() for n in (2, 9, 20, 5, 12)
    ]
    model = tiny_model_dirs["qwen3"]
    config = {"device": device, "dtype": "float32", "block_size": 16}
    params = SamplingParams(max_tokens=6, n=2, temperature=0.8, seed=5)  # forks share pages too

    cascaded = {"decode": 0, "extend": 0}

    def run(**changes):
        llm = LLM(model, num_blocks=64, **config, **changes)
        attention = llm.engine.attention
        if attention.backend == "triton":  # count the launches that cascaded (they still run)
            for name, kind in (("_decode", "decode"), ("_prefill", "extend")):
                setattr(attention, name, _spy(getattr(attention, name), kind, cascaded))
        outputs = llm.generate(prompts, params)
        tokens = [[list(c.token_ids) for c in o.completions] for o in outputs]
        return tokens, llm.stats().cascade_saved_token_reads

    expected, _ = run(attention="torch", cascade=False)
    tokens, saved = run(attention="triton")
    assert tokens == expected
    assert saved > 0
    # Decode steps of the forks, and the extend step of the records that waited for the
    # shared prefix to be cached, read it once per group.
    assert cascaded["decode"] > 0 and cascaded["extend"] > 0, cascaded
    assert run(attention="triton", cascade=False) == (expected, 0)


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_engine_choices_and_logprobs_on_triton_match_torch(tiny_model_dirs, device):
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 400, (21,), generator=gen).tolist()  # a whole block of 16
    prompts = [shared + torch.randint(3, 400, (n,), generator=gen).tolist() for n in (2, 7)]
    config = {"device": device, "dtype": "float32", "block_size": 16, "num_blocks": 64}
    choices = SamplingParams(choices=("the cat sat", "the dog", "a"))  # 6, 4 and 1 tokens
    logprobs = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2)

    def run(attention: str):
        llm = LLM(tiny_model_dirs["qwen2"], attention=attention, **config)
        assert llm.engine.attention.backend == attention
        llm.engine.runner.cascade_rule = ANY_GROUP  # torch's own rule skips short prefixes
        scored = llm.generate(prompts, choices)
        generated = llm.generate(prompts, logprobs)
        assert llm.stats().cascade_saved_token_reads > 0
        return (
            [[c.logprob for c in o.choices] for o in scored],
            [[(t.token_id, t.logprob) for t in o.completions[0].logprobs] for o in generated],
        )

    (scores, entries), (want_scores, want_entries) = run("triton"), run("torch")
    for got, want in zip(scores, want_scores, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    for got, want in zip(entries, want_entries, strict=True):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_engine_fp8_cache_on_triton_matches_torch(tiny_model_dirs, device):
    """Store, decode, extend, cascade, forks (copy-on-write) and the choice scorer on an
    fp8 cache: the same scales, the same greedy tokens and scores as the torch backend."""
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 400, (37,), generator=gen).tolist()  # 2 whole blocks of 16
    prompts = [shared + torch.randint(3, 400, (n,), generator=gen).tolist() for n in (2, 9)]
    config = {"device": device, "dtype": "float32", "kv_dtype": "fp8", "block_size": 16,
              "num_blocks": 64, "max_batch_tokens": 32}  # fmt: skip
    greedy = SamplingParams(max_tokens=4, n=2, ignore_eos=True)
    choices = SamplingParams(choices=("the cat", "a"))

    def run(attention: str, scales: tuple | None = None):
        llm = LLM(tiny_model_dirs["llama"], attention=attention, **config)
        assert llm.engine.attention.backend == attention and llm.kv_cache.quantized
        measured = (llm.kv_cache.k_scale.clone(), llm.kv_cache.v_scale.clone())
        if scales is not None:  # measured by the other backend: rounding apart, the same
            torch.testing.assert_close(measured, scales, rtol=1e-4, atol=0)
            llm.kv_cache.set_scales(*scales, "the torch backend's")
        llm.engine.runner.cascade_rule = ANY_GROUP
        tokens = [[list(c.token_ids) for c in o.completions] for o in llm.generate(prompts, greedy)]
        scores = [c.logprob for o in llm.generate(prompts, choices) for c in o.choices]
        assert llm.stats().cascade_saved_token_reads > 0
        return tokens, scores, measured

    want_tokens, want_scores, scales = run("torch")
    tokens, scores, _ = run("triton", scales)
    assert tokens == want_tokens
    assert scores == pytest.approx(want_scores, abs=1e-4)


def _spy(launch, kind: str, counts: dict):
    def counted(*args, cascade=None, **kwargs):
        counts[kind] += cascade is not None
        return launch(*args, cascade=cascade, **kwargs)

    return counted


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_launches_never_synchronise_with_the_host():
    case = Case("cuda", torch.bfloat16, 3, 16, 64)
    paged = paged_inputs(case, [1, 700, 2000], [1, 1, 30])
    context_lens, query_start_loc = paged.device_lens()
    args = (paged.query, paged.k_cache, paged.v_cache, paged.block_tables, context_lens,
            query_start_loc, 0.125)  # fmt: skip
    out = torch.empty_like(paged.query)
    decode_attention(*args, 2000, out=out)  # compile outside the checked region
    prefill_attention(*args, 30, min_query_len=2, out=out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_attention(*args, 2000, out=out)
        prefill_attention(*args, 30, min_query_len=2, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, paged.reference(0.125), case.dtype)
