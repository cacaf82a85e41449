"""The torch paged store and attention against dense causal attention on random data."""

from __future__ import annotations

import pytest
import torch
from pagedbatch.kernels.reference import cascade_attention, paged_attention, store_kv


def dense_attention(q, k, v, scale, window=None):
    """Causal attention of the last q.shape[0] positions over k, v: [L, H, D] per sequence."""
    num_q, length = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(length - num_q, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def fill_pages(lengths, block_size, kv_heads, head_dim, num_blocks, gen, dtype=torch.float32):
    """A paged cache holding random K/V of each sequence in shuffled, non-contiguous blocks
    (the K/V returned: as stored, rounded to `dtype`).

    Every slot no sequence owns is NaN: attention must never let one leak in.
    """
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, keys, values = [], [], []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // block_size))]
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(n)]
        )
        store_kv(k, v, k_cache, v_cache, slots)
        tables.append(table)
        keys.append(k)
        values.append(v)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, padded, keys, values


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("slack", [1.0, 1e9])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_attention_matches_dense_causal_attention(
    block_size, heads, kv_heads, window, slack, dtype, tol
):
    """Against float64 on the same inputs; bfloat16 (attended in bfloat16) within its
    rounding."""
    gen = torch.Generator().manual_seed(block_size * 100 + heads + (window or 0))
    head_dim = 16
    # Context lengths around block boundaries; query lengths 1 (decode) and longer (extend).
    # Padded buckets of equal shapes only (slack 1), or one bucket of everything.
    lengths = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 2, 40, 90]
    query_lens = [1, block_size - 1, 1, 5, 3 * block_size + 2, 1, 70]
    k_cache, v_cache, tables, keys, values = fill_pages(
        lengths, block_size, kv_heads, head_dim, num_blocks=96, gen=gen, dtype=dtype
    )
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    query = torch.randn(starts[-1], heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    out = paged_attention(query, k_cache, v_cache, tables, lengths, starts, scale, window, slack)
    assert out.dtype == dtype
    for i, (k, v) in enumerate(zip(keys, values)):
        expected = dense_attention(query[starts[i] : starts[i + 1]], k, v, scale, window)
        torch.testing.assert_close(
            out[starts[i] : starts[i + 1]].double(), expected, rtol=tol, atol=tol
        )


def test_store_writes_exactly_the_given_slots_and_skips_negative_ones():
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    key = torch.randn(3, 2, 8)
    value = torch.randn(3, 2, 8)
    store_kv(key, value, k_cache, v_cache, torch.tensor([9, -1, 2]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[2, 1], value[0])
    assert torch.equal(k_cache[0, 2], key[2]) and torch.equal(v_cache[0, 2], value[2])
    touched = torch.zeros(3, 4, dtype=torch.bool)
    touched[2, 1] = touched[0, 2] = True
    assert (k_cache[~touched] == 0).all() and (v_cache[~touched] == 0).all()


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("slack", [1.0, 1e9])
def test_cascade_attention_equals_paged_attention(block_size, heads, kv_heads, dtype, tol, slack):
    """Two groups sharing prefixes of 3 and 1 blocks, with decodes and extends in each,
    next to sequences in no group; slots nobody owns are NaN. Bucketed alone or all
    together; in bfloat16 within its rounding."""
    gen = torch.Generator().manual_seed(block_size + heads)
    head_dim, num_blocks = 8, 64
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    free = torch.randperm(num_blocks, generator=gen).tolist()

    def write(blocks, first_pos, n):  # random K/V for positions first_pos .. first_pos + n
        slots = [blocks[p // block_size] * block_size + p % block_size
                 for p in range(first_pos, first_pos + n)]  # fmt: skip
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        store_kv(k, torch.randn_like(k), k_cache, v_cache, torch.tensor(slots))  # rounded

    prefixes = []
    for num in (3, 1):
        blocks = [free.pop() for _ in range(num)]
        write(blocks, 0, num * block_size)
        prefixes.append(blocks)
    # (prefix or None, context length, new tokens)
    shapes = [(0, 3 * block_size + 1, 1), (None, 9, 1), (0, 3 * block_size + 7, 5),
              (1, block_size + 2, 1), (0, 4 * block_size + 3, 1), (None, 20, 6),
              (1, 3 * block_size, 1)]  # fmt: skip
    tables, context_lens, query_lens = [], [], []
    for prefix, length, new in shapes:
        own_from = len(prefixes[prefix]) * block_size if prefix is not None else 0
        table = list(prefixes[prefix]) if prefix is not None else []
        table += [free.pop() for _ in range(-(-length // block_size) - len(table))]
        write(table, own_from, length - own_from)
        tables.append(table)
        context_lens.append(length)
        query_lens.append(new)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    query = torch.randn(qsl[-1], heads, head_dim, generator=gen).to(dtype)
    groups = [([0, 2, 4], torch.tensor(prefixes[0])), ([3, 6], torch.tensor(prefixes[1]))]
    scale = head_dim**-0.5
    # float32 on the same (rounded) inputs
    want = paged_attention(query.float(), k_cache.float(), v_cache.float(), block_tables,
                           context_lens, qsl, scale)  # fmt: skip
    got = cascade_attention(query, k_cache, v_cache, block_tables, context_lens, qsl, scale,
                            groups, slack)  # fmt: skip
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
