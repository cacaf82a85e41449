"""Pure-torch paged KV store and paged attention: the CPU path and the ground truth.

Layout shared with the Triton kernels:
  k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim]  (one layer)
  block_tables:      [num_seqs, max_blocks] int32, physical block ids, row i valid up to
                     ceil(context_lens[i] / block_size)
  context_lens:      [num_seqs] tokens in the cache per sequence, this step's new ones included
  query_start_loc:   [num_seqs + 1] offsets of each sequence's new tokens in the flat batch
The new tokens of a sequence are its last `query_len` positions, so query token t of
sequence i sits at position context_lens[i] - query_len + t and sees keys 0..position.

A step's attention is planned once (`plan_paged`, `plan_cascade`: index tensors and masks
that every layer reuses) and run per layer (`run`). Sequences are attended in padded
buckets (`buckets`), never one Python call each; on CPU each bucket is one call of torch's
fused flash kernel, in the cache's dtype (bfloat16 stays bfloat16), which also gives the
log-sum-exp that cascade attention merges by; elsewhere the same maths in float32.

An fp8 cache (float8 e4m3) holds K / k_scale and V / v_scale, saturated at +-448, with
k_scale, v_scale: [num_kv_heads] float32 of the layer; every read multiplies them back
(`dequantize`) into the query's dtype, where the attention is computed. A cache of
another dtype is written and read as it is (the attention in the cache's dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# A bucket's padded work (sequences x longest query x longest key span) may exceed its
# sequences' own by this factor; a sequence that would push it further starts a new bucket.
PADDING_SLACK = 1.5

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


class Bucket(NamedTuple):
    """Sequences attended as one padded batch: S sequences, Q queries, L keys each."""

    rows: torch.Tensor  # [R] the flat token rows of their new tokens, in order
    query_rows: torch.Tensor  # [S, Q] token row of each padded query (padding: a real row)
    valid: torch.Tensor  # [S, Q] bool, the real queries
    slots: torch.Tensor  # [S, L] cache slot of each key (padding: a written slot)
    mask: torch.Tensor | None  # which keys each query sees, as `attend` takes it; None: all


class Prefix(NamedTuple):
    """A cascade group: its members' query rows against the pages of their shared prefix."""

    rows: torch.Tensor  # [T] flat token rows of the members' new tokens
    blocks: torch.Tensor  # [P / block_size] the prefix's physical blocks


class Plan(NamedTuple):
    """A step's attention, ready for every layer: buckets of sequences attended alone
    (`loose`), and for cascade the groups' prefixes and their members' own keys (`own`)."""

    loose: list[Bucket]
    prefixes: list[Prefix]
    own: list[Bucket]
    grouped_rows: torch.Tensor | None  # [T] the prefixes' rows, concatenated in group order


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    sliding_window: int | None = None,
    slack: float = PADDING_SLACK,
    *,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its cached pages. Lengths are
    host ints: no device sync."""
    shape = Shape.of(query, k_cache)
    plan = plan_paged(block_tables, context_lens, query_start_loc, shape, sliding_window, slack)
    return run(plan, query, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    groups: list[tuple[list[int], torch.Tensor]],  # (sequences, their shared prefix's blocks)
    slack: float = PADDING_SLACK,
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
    shape = Shape.of(query, k_cache)
    plan = plan_cascade(block_tables, context_lens, query_start_loc, shape, groups, slack)
    return run(plan, query, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)


def plan_paged(
    block_tables: torch.Tensor, context_lens: list[int], query_start_loc: list[int],
    shape: Shape, window: int | None = None, slack: float = PADDING_SLACK,
) -> Plan:  # fmt: skip
    """The plan of `paged_attention`."""
    seqs = list(range(len(context_lens)))
    firsts = [0] * len(seqs)
    loose = buckets(block_tables, context_lens, query_start_loc, shape, seqs, firsts,
                    window, slack)  # fmt: skip
    return Plan(loose, [], [], None)


def plan_cascade(
    block_tables: torch.Tensor, context_lens: list[int], query_start_loc: list[int],
    shape: Shape, groups: list[tuple[list[int], torch.Tensor]], slack: float = PADDING_SLACK,
) -> Plan:  # fmt: skip
    """The plan of `cascade_attention`."""
    qsl, device = query_start_loc, block_tables.device
    grouped = [i for seqs, _ in groups for i in seqs]
    first = {i: blocks.shape[0] * shape.block_size for seqs, blocks in groups for i in seqs}
    loose_seqs = sorted(set(range(len(context_lens))) - set(grouped))
    args = (block_tables, context_lens, qsl, shape)
    loose = buckets(*args, loose_seqs, [0] * len(loose_seqs), None, slack)
    own = buckets(*args, grouped, [first[i] for i in grouped], None, slack)
    prefixes = [Prefix(_rows(qsl, seqs, device), blocks.to(device)) for seqs, blocks in groups]
    grouped_rows = torch.cat([p.rows for p in prefixes]) if prefixes else None
    return Plan(loose, prefixes, own, grouped_rows)


def buckets(
    block_tables: torch.Tensor, context_lens: list[int], query_start_loc: list[int],
    shape: Shape, seqs: list[int], firsts: list[int], window: int | None,
    slack: float = PADDING_SLACK,
) -> list[Bucket]:  # fmt: skip
    """`seqs` (attending to their keys from `firsts[k]` on) in padded buckets: sorted by
    query then key length, a bucket grows while its padded work stays within `slack`
    times its sequences' own."""
    qsl = query_start_loc
    sizes = {i: (qsl[i + 1] - qsl[i], context_lens[i] - f) for i, f in zip(seqs, firsts)}
    first = dict(zip(seqs, firsts))
    runs: list[list[int]] = []
    own = 0
    for i in sorted(seqs, key=lambda i: sizes[i]):
        nq, nk = sizes[i]  # the longest so far: sorted
        if not runs or (len(runs[-1]) + 1) * nq * nk > slack * (own + nq * nk):
            runs.append([])
            own = 0
        runs[-1].append(i)
        own += nq * nk
    args = (block_tables, context_lens, qsl, shape, first, window)
    return [_bucket(*args, members) for members in runs]


def _bucket(block_tables, context_lens, qsl, shape, first, window, seqs) -> Bucket:
    device, block_size = block_tables.device, shape.block_size
    nq = [qsl[i + 1] - qsl[i] for i in seqs]
    spans = [context_lens[i] - first[i] for i in seqs]
    max_q, max_len = max(nq), max(spans)  # from the host lists: no device read
    q_lens = torch.tensor(nq, device=device)
    lens = torch.tensor([context_lens[i] for i in seqs], device=device)
    firsts = torch.tensor([first[i] for i in seqs], device=device)
    starts = torch.tensor([qsl[i] for i in seqs], device=device)
    q_arange = torch.arange(max_q, device=device)[None, :]
    valid = q_arange < q_lens[:, None]  # [S, Q]
    query_rows = torch.where(valid, starts[:, None] + q_arange, starts[:, None])
    k_pos = firsts[:, None] + torch.arange(max_len, device=device)[None, :]  # [S, L]
    in_range = k_pos < lens[:, None]
    pos = torch.where(in_range, k_pos, firsts[:, None])  # past the end: a written slot
    blocks = torch.gather(block_tables[seqs].long(), 1, pos // block_size)
    slots = blocks * block_size + pos % block_size
    q_pos = (lens - q_lens)[:, None] + q_arange  # [S, Q]
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & in_range[:, None, :]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    visible |= ~valid[:, :, None]  # padded queries see every key: finite, then dropped
    # Every query sees every key (one-token queries over spans of one length, inside the
    # window): no mask. Decided on the host, as `visible.all()` would say.
    full = max_q == 1 and min(spans) == max_len and (window is None or window >= max_len)
    mask = None if full else shape.mask(visible)
    return Bucket(_rows(qsl, seqs, device), query_rows, valid, slots, mask)


def run(
    plan: Plan,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """One layer's attention of `plan` over its pages (an fp8 cache read with its scales)."""
    out = torch.empty_like(query)
    kv = (k_cache, v_cache, (k_scale, v_scale))
    for b in plan.loose:
        out[b.rows] = _attend_bucket(b, query, *kv, scale)[0].to(query.dtype)
    if plan.grouped_rows is None:
        return out
    num_tokens, heads = query.shape[:2]
    own_out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    own_lse = torch.empty(num_tokens, heads, dtype=torch.float32, device=query.device)
    for b in plan.own:
        o, lse = _attend_bucket(b, query, *kv, scale)
        own_out[b.rows], own_lse[b.rows] = o.float(), lse
    parts = [_attend_prefix(p, query, *kv, scale) for p in plan.prefixes]
    rows = plan.grouped_rows
    prefix_out, prefix_lse = (torch.cat(x) for x in zip(*parts))
    merged = merge_by_lse(prefix_out.float(), prefix_lse, own_out[rows], own_lse[rows])
    out[rows] = merged.to(query.dtype)
    return out


def _attend_bucket(b: Bucket, query, k_cache, v_cache, scales, scale):
    """The bucket's rows' out [R, Hq, D] and lse [R, Hq], in order."""
    q = query[b.query_rows].transpose(1, 2)  # [S, Hq, Q, D]
    keys = _read(k_cache.flatten(0, 1), b.slots, scales[0], query.dtype).transpose(1, 2)
    values = _read(v_cache.flatten(0, 1), b.slots, scales[1], query.dtype).transpose(1, 2)
    out, lse = attend(q, keys, values, b.mask, scale)
    return out.transpose(1, 2)[b.valid], lse.transpose(1, 2)[b.valid]


def _attend_prefix(p: Prefix, query, k_cache, v_cache, scales, scale):
    """The group's rows against its prefix: out [T, Hq, D], lse [T, Hq]."""
    q = query[p.rows].transpose(0, 1)[None]  # [1, Hq, T, D]
    keys = _read(k_cache, p.blocks, scales[0], query.dtype).flatten(0, 1)  # [P, Hkv, D]: once
    values = _read(v_cache, p.blocks, scales[1], query.dtype).flatten(0, 1)
    keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    out, lse = attend(q, keys, values, None, scale)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


class Shape(NamedTuple):
    """What a plan's masks are made for: the query heads per KV head, the cache's dtype
    and device, and its block size."""

    group: int
    dtype: torch.dtype
    device: torch.device
    block_size: int

    @classmethod
    def of(cls, query: torch.Tensor, k_cache: torch.Tensor) -> Shape:
        """An fp8 cache is attended in the query's dtype (`dequantize`), any other in its own."""
        group = query.shape[1] // k_cache.shape[2]
        dtype = query.dtype if k_cache.dtype == FP8 else k_cache.dtype
        return cls(group, dtype, k_cache.device, k_cache.shape[1])

    def mask(self, visible: torch.Tensor) -> torch.Tensor:
        """visible [B, Q, L] as `attend` takes it: [B, 1, G * Q, L] (query rows folded as
        `attend` folds them); on CPU additive (0 or -inf) in the cache's dtype, which the
        fused kernel takes, else bool."""
        b, nq, nk = visible.shape
        folded = visible[:, None, None].expand(b, 1, self.group, nq, nk)
        folded = folded.reshape(b, 1, self.group * nq, nk)
        if self.device.type != "cpu":
            return folded
        return torch.zeros(folded.shape, dtype=self.dtype).masked_fill_(~folded, float("-inf"))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp. q [B, Hq, Q, D]; k, v [B, Hkv, L, D] (grouped-query
    heads: Hq a multiple of Hkv); mask from `Shape.mask`, or None. Returns out
    [B, Hq, Q, D] in k's dtype and lse [B, Hq, Q] in float32. The query heads of a KV head
    are folded into its rows, so the keys are never repeated per query head."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    q = q.to(k.dtype).reshape(b, hkv, g * nq, d)  # head h = kv head h // g: rows (g, q)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )[:2]
    else:
        out, lse = _attend_float32(q, k, v, mask, scale)
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def _attend_float32(q, k, v, mask, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*Q, L]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul((scores - lse[..., None]).exp_(), v.float())
    return out.to(k.dtype), lse


def _read(cache: torch.Tensor, index: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """The cache's entries at `index` (any shape), dequantized: [*index, ..., Hkv, D]."""
    return dequantize(_take(cache, index), scale, dtype)


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
