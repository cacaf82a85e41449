"""Pure-torch paged KV store and paged attention: the CPU path and the ground truth.

Layout shared with the Triton kernels:
  k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim]  (one layer)
  block_tables:      [num_seqs, max_blocks] int32, physical block ids, row i valid up to
                     ceil(context_lens[i] / block_size)
  context_lens:      [num_seqs] tokens in the cache per sequence, this step's new ones included
  query_start_loc:   [num_seqs + 1] offsets of each sequence's new tokens in the flat batch
The new tokens of a sequence are its last `query_len` positions, so query token t of
sequence i sits at position context_lens[i] - query_len + t and sees keys 0..position.

An fp8 cache (float8 e4m3) holds K / k_scale and V / v_scale, saturated at +-448, with
k_scale, v_scale: [num_kv_heads] float32 of the layer; every read multiplies them back
(`dequantize`) into the query's dtype, where the attention is computed. A cache of
another dtype is written and read as it is (the attention in the cache's dtype).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8 e4m3fn


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, slot = block * block_size + offset; < 0 skipped
    *,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's K and V into its slot of the paged cache (fp8: quantized)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for new, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        stored = quantize(new[keep], scale) if cache.dtype == FP8 else new[keep].to(cache.dtype)
        _raw(cache).view(-1, *cache.shape[2:]).index_copy_(0, slots, _raw(stored))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., num_kv_heads, head_dim] / scale [num_kv_heads] in float8 e4m3, saturated."""
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(
    x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:  # x [..., num_kv_heads, head_dim], read from a cache
    """Entries read from a cache, ready to attend with: an fp8 cache's times their KV head's
    scale, in `dtype`; any other cache's as they are."""
    if x.dtype != FP8:
        return x
    if scale is None:
        raise ValueError("an fp8 cache is read with its scales (k_scale, v_scale)")
    return (x.float() * scale[:, None]).to(dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor's bytes (index_copy_ has no float8 kernel); any other tensor itself."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _take(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index], gathered as bytes for an fp8 cache (indexing kernels may lack float8)."""
    return _raw(cache)[index].view(cache.dtype)


# New tokens up to which a sequence joins the padded batch; longer ones run alone, so one
# long prefill does not pad every other sequence's queries to its length. On CPU, SDPA
# over padded extends measured slower than one call per extend: only decodes are padded.
PADDED_QUERY_LEN = 1


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    sliding_window: int | None = None,
    padded_query_len: int = PADDED_QUERY_LEN,
    *,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its cached pages.

    Sequences with at most `padded_query_len` new tokens (decodes) run as one padded
    batch; the others (prefill, or extend after a cached prefix) one by one. Lengths
    are host ints: no device sync.
    """
    scales = (k_scale, v_scale)
    out = torch.empty_like(query)
    query_lens = [b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:])]
    short = [i for i, n in enumerate(query_lens) if n <= padded_query_len]
    if short:
        rows = [r for i in short for r in range(query_start_loc[i], query_start_loc[i + 1])]
        rows = torch.tensor(rows, device=query.device)
        out[rows] = _padded(
            query, [query_start_loc[i] for i in short], [query_lens[i] for i in short],
            k_cache, v_cache, block_tables[short], [context_lens[i] for i in short], scale,
            sliding_window, scales,
        )  # fmt: skip
    for i, n in enumerate(query_lens):
        if n > padded_query_len:
            a, b = query_start_loc[i], query_start_loc[i + 1]
            out[a:b] = _extend(
                query[a:b], k_cache, v_cache, block_tables[i], context_lens[i], scale,
                sliding_window, scales,
            )  # fmt: skip
    return out


def gather_pages(
    cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> torch.Tensor:  # [num_seqs, max_len, num_kv_heads, head_dim]
    """The first `max_len` tokens of each sequence's pages, in logical order."""
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    pages = _take(cache, block_tables[:, :num_blocks].long())  # [S, nb, bs, H, D]
    return pages.flatten(1, 2)[:, :max_len]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _padded(
    query, starts, query_lens, k_cache, v_cache, block_tables, context_lens, scale, window, scales
):
    """Sequences padded to the longest query and context among them; returns their rows,
    concatenated in order ([sum(query_lens), Hq, D])."""
    device, max_q, max_len = query.device, max(query_lens), max(context_lens)
    q_idx = torch.tensor(starts, device=device)[:, None] + torch.arange(max_q, device=device)
    q_lens = torch.tensor(query_lens, device=device)
    valid_q = torch.arange(max_q, device=device)[None, :] < q_lens[:, None]  # [S, Q]
    q = query[q_idx.clamp(max=query.shape[0] - 1)].transpose(1, 2)  # [S, Hq, Q, D]
    lens = torch.tensor(context_lens, device=device)
    slots = _padded_slots(block_tables, lens, max_len, k_cache.shape[1])  # [S, L]
    keys = _gather(k_cache, slots, scales[0], query.dtype).transpose(1, 2)  # [S, Hkv, L, D]
    values = _gather(v_cache, slots, scales[1], query.dtype).transpose(1, 2)
    k_pos = torch.arange(max_len, device=device)[None, None, :]
    q_pos = (lens - q_lens)[:, None, None] + torch.arange(max_q, device=device)[None, :, None]
    mask = _visible(q_pos, k_pos, window) & (k_pos < lens[:, None, None])  # [S, Q, L]
    mask = mask | ~valid_q[:, :, None]  # padded query rows: any key, results dropped
    out = F.scaled_dot_product_attention(
        q.to(keys.dtype), keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2)[valid_q].to(query.dtype)


def _padded_slots(block_tables, lens, max_len, block_size):
    """[S, L] cache slot of each position; positions past a sequence's end read its first
    token instead, a written slot, so the masked scores multiply finite values (never
    NaN from a slot nobody wrote)."""
    pos = torch.arange(max_len, device=lens.device)[None, :]
    pos = torch.where(pos < lens[:, None], pos, 0)
    blocks = torch.gather(block_tables.long(), 1, pos // block_size)
    return blocks * block_size + pos % block_size


def _gather(cache, slots, scale, dtype):
    """The cache entries at `slots` (any shape S), dequantized: [*S, Hkv, D]."""
    return dequantize(_take(cache.flatten(0, 1), slots), scale, dtype)


def _extend(query, k_cache, v_cache, block_table, context_len, scale, window, scales):
    # query: [Q, Hq, D] for positions context_len - Q .. context_len - 1
    num_new = query.shape[0]
    keys = gather_pages(k_cache, block_table[None], context_len)[0]
    values = gather_pages(v_cache, block_table[None], context_len)[0]
    keys = dequantize(keys, scales[0], query.dtype).transpose(0, 1)
    values = dequantize(values, scales[1], query.dtype).transpose(0, 1)
    q_pos = torch.arange(context_len - num_new, context_len, device=query.device)[:, None]
    mask = _visible(q_pos, torch.arange(context_len, device=query.device)[None, :], window)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None].to(keys.dtype), keys[None], values[None],
        attn_mask=mask[None, None], scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1).to(query.dtype)


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    groups: list[tuple[list[int], torch.Tensor]],  # (sequences, their shared prefix's blocks)
    *,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """`paged_attention` (no sliding window) where each group of sequences shares the
    pages of a prefix: the group's query tokens attend to the prefix's keys together (its
    pages gathered once), each sequence to its own keys after the prefix, and the two
    parts are merged by their log-sum-exps. Sequences in no group take `paged_attention`.

    Every query of a group comes after the whole prefix (the prefix blocks are full and
    were computed before the step), so the prefix part needs no mask.
    """
    out = torch.empty_like(query)
    qsl, device, scales = query_start_loc, query.device, (k_scale, v_scale)
    grouped = [i for seqs, _ in groups for i in seqs]
    loose = sorted(set(range(len(context_lens))) - set(grouped))
    if loose:
        rows = _rows(qsl, loose, device)
        sub_qsl = [0, *itertools.accumulate(qsl[i + 1] - qsl[i] for i in loose)]
        out[rows] = paged_attention(
            query[rows], k_cache, v_cache, block_tables[loose], [context_lens[i] for i in loose],
            sub_qsl, scale, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    if not groups:
        return out
    prefix_out, prefix_lse, starts = _prefix_attention(
        query, k_cache, v_cache, qsl, scale, groups, scales
    )
    own_out = torch.empty(query.shape, dtype=torch.float32, device=device)
    own_lse = torch.empty(query.shape[:2], dtype=torch.float32, device=device)
    decodes = [i for i in grouped if qsl[i + 1] - qsl[i] == 1]
    extends = [[i] for i in grouped if qsl[i + 1] - qsl[i] > 1]
    for seqs in ([decodes] if decodes else []) + extends:
        rows = _rows(qsl, seqs, device)
        own_out[rows], own_lse[rows] = _attend_range(
            query, k_cache, v_cache, block_tables, context_lens, qsl, scale, seqs, starts, scales
        )
    rows = _rows(qsl, grouped, device)
    merged = merge_by_lse(prefix_out, prefix_lse, own_out[rows], own_lse[rows])
    out[rows] = merged.to(query.dtype)
    return out


def _prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qsl: list[int],
    scale: float,
    groups: list[tuple[list[int], torch.Tensor]],
    scales: tuple[torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """Each group's queries against its prefix's pages, gathered once per group: the
    outputs and log-sum-exps of the grouped tokens (in group order), and the first key
    position each grouped sequence reads by itself."""
    outs, lses, starts = [], [], {}
    block_size = k_cache.shape[1]
    for seqs, blocks in groups:
        q = query[_rows(qsl, seqs, query.device)].transpose(0, 1)[None]  # [1, Hq, T, D]
        keys = dequantize(_take(k_cache, blocks).flatten(0, 1), scales[0], query.dtype)
        values = dequantize(_take(v_cache, blocks).flatten(0, 1), scales[1], query.dtype)
        keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # once a group
        o, lse = _attend(q, keys, values, None, scale)
        outs.append(o[0].transpose(0, 1))  # [T, Hq, D]
        lses.append(lse[0].transpose(0, 1))  # [T, Hq]
        starts.update(dict.fromkeys(seqs, blocks.shape[0] * block_size))
    return torch.cat(outs), torch.cat(lses), starts


def merge_by_lse(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Attention over two disjoint key sets, from each part's output and log-sum-exp."""
    top = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - top).exp_()[..., None], (lse2 - top).exp_()[..., None]
    return (o1 * w1 + o2 * w2) / (w1 + w2)


def _rows(query_start_loc: list[int], seqs: list[int], device: torch.device) -> torch.Tensor:
    """The flat token indices of `seqs`' new tokens, in order."""
    q = query_start_loc
    return torch.tensor([r for i in seqs for r in range(q[i], q[i + 1])], device=device)


def _attend(q, k, v, mask, scale):
    """Attention with its log-sum-exp, in float32. q [B, Hq, Q, D]; k, v [B, Hkv, L, D]
    (grouped-query heads: Hq a multiple of Hkv); mask [B, Q, L] bool or None.
    Returns out [B, Hq, Q, D] and lse [B, Hq, Q]."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    q = q.float().reshape(b, hkv, g * nq, d)  # head h = kv head h // g: rows (g, q)
    scores = torch.matmul(q, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*Q, L]
    if mask is not None:
        full = mask[:, None, None].expand(b, 1, g, nq, mask.shape[-1]).reshape(b, 1, g * nq, -1)
        scores.masked_fill_(~full, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G*Q]
    probs = (scores - lse[..., None]).exp_()
    out = torch.matmul(probs, v.float())  # [B, Hkv, G*Q, D]
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def _attend_range(
    query, k_cache, v_cache, block_tables, context_lens, qsl, scale, seqs, starts, scales
):
    """Causal attention of `seqs`' new tokens over their keys from `starts[i]` on, padded
    together; returns their rows' out [T, Hq, D] and lse [T, Hq] (float32), in order."""
    device = query.device
    q_lens = torch.tensor([qsl[i + 1] - qsl[i] for i in seqs], device=device)
    lens = torch.tensor([context_lens[i] for i in seqs], device=device)
    first = torch.tensor([starts[i] for i in seqs], device=device)
    max_q, max_len = int(q_lens.max()), int((lens - first).max())
    q_idx = torch.tensor([qsl[i] for i in seqs], device=device)[:, None] + torch.arange(
        max_q, device=device
    )
    valid_q = torch.arange(max_q, device=device)[None, :] < q_lens[:, None]  # [S, Q]
    q = query[q_idx.clamp(max=query.shape[0] - 1)].transpose(1, 2)  # [S, Hq, Q, D]
    k_pos = first[:, None] + torch.arange(max_len, device=device)[None, :]  # [S, L]
    in_range = k_pos < lens[:, None]
    pos = torch.where(in_range, k_pos, first[:, None])  # past the end: a written slot
    tables = block_tables[seqs].long()
    slots = torch.gather(tables, 1, pos // k_cache.shape[1]) * k_cache.shape[1]
    slots += pos % k_cache.shape[1]
    keys = _gather(k_cache, slots, scales[0], query.dtype).transpose(1, 2)  # [S, Hkv, L, D]
    values = _gather(v_cache, slots, scales[1], query.dtype).transpose(1, 2)
    q_pos = (lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [S, Q]
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & in_range[:, None, :]
    out, lse = _attend(q, keys, values, mask, scale)
    return out.transpose(1, 2)[valid_q], lse.transpose(1, 2)[valid_q]
