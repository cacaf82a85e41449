"""Triton paged prefill / extend attention (reference: `reference.paged_attention`).

The new tokens of each sequence attend causally to themselves and to the sequence's
cached pages; a prompt whose prefix is cached computes only its suffix. Ragged batches
through `query_start_loc`.

Grid (num_seqs, row tiles, num_kv_heads). The query heads of one KV head are folded
into the rows: row r of a sequence is new token r // group, query head
kv_head * group + r % group. So each K/V tile is loaded once for all query heads that
share it, for any group size (3 included), and a tile of BLOCK_M rows holds
BLOCK_M / group tokens. A program walks the keys its rows may see, from the first
row's window start to the last row's position, flash-attention style.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from pagedbatch.kernels.cascade_attention import DecodeCascade, cascade_prefix
from pagedbatch.kernels.triton_common import (
    LOG2_E,
    NO_WINDOW,
    attend_tile,
    check_attention_args,
    dot_in_float32,
    head_tile_size,
    key_tile_size,
    kv_head_scales,
    load_page_tile,
    pipeline_stages,
    row_tile_size,
    scale_args,
    tile_warps,
)


@triton.jit
def _prefill_kernel(
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    qk_scale,
    window,
    min_query_len,
    group,
    head_dim,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_od,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    starts_ptr=None,  # [num_seqs] int32: first key a sequence reads itself (cascade)
    part_out_ptr=None,  # [num_tokens, num_heads, head_dim] float32: a cascaded row's part
    part_lse_ptr=None,  # [num_tokens, num_heads] float32 (log2)
    stride_pt=0,
    stride_ph=0,
    stride_pd=0,
    stride_lt=0,
    stride_lh=0,
    HAS_STARTS: tl.constexpr = False,
    k_scale_ptr=None,  # [num_kv_heads] float32: an fp8 cache's scales (KV_FP8)
    v_scale_ptr=None,
    KV_FP8: tl.constexpr = False,
):
    seq = tl.program_id(0)
    first_row = tl.program_id(1) * BLOCK_M
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if (query_len < min_query_len) | (first_row >= query_len * group):
        return
    prefix_len = tl.load(context_lens_ptr + seq) - query_len  # keys cached before this step
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + seq)

    rows = first_row + tl.arange(0, BLOCK_M)
    token = rows // group  # [BLOCK_M] index among the new tokens
    heads = kv_head * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = token < query_len
    d_mask = offs_d < head_dim
    io_mask = row_mask[:, None] & d_mask[None, :]
    q_ptrs = (
        query_ptr + (q_start + token)[:, None] * stride_qt + heads[:, None] * stride_qh
        + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = prefix_len + token  # [BLOCK_M]
    lo = tl.maximum(tl.maximum(prefix_len + first_row // group - window + 1, 0), start)
    hi = prefix_len + tl.minimum((first_row + BLOCK_M - 1) // group, query_len - 1) + 1
    table_ptr = block_tables_ptr + seq * stride_bt
    k_scale, v_scale = kv_head_scales(k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        pos = tile + offs_n
        pos_mask = pos < hi
        k = load_page_tile(k_cache_ptr, table_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                           stride_cb, stride_ct, stride_ch, stride_cd, BLOCK_SIZE)  # fmt: skip
        v = load_page_tile(v_cache_ptr, table_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                           stride_cb, stride_ct, stride_ch, stride_cd, BLOCK_SIZE)  # fmt: skip
        visible = (
            pos_mask[None, :]
            & (pos[None, :] <= q_pos[:, None])
            & (pos[None, :] > q_pos[:, None] - window)
        )
        m_i, l_i, acc = attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, k_scale, v_scale,
                                    DOT_F32, KV_FP8)  # fmt: skip

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past the sequence's tokens see nothing
    # Compiled, `start` is a runtime value even without HAS_STARTS (Triton makes an int
    # assigned in a kernel one), so without the constexpr this branch would be compiled
    # with part_out_ptr None, and fail. The interpreter only sees 0 > 0.
    if HAS_STARTS and start > 0:  # cascade: the part after the prefix, merged with its part
        p_ptrs = (
            part_out_ptr + (q_start + token)[:, None] * stride_pt + heads[:, None] * stride_ph
            + offs_d[None, :] * stride_pd
        )  # fmt: skip
        tl.store(p_ptrs, acc / l_safe[:, None], mask=io_mask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        l_ptrs = part_lse_ptr + (q_start + token) * stride_lt + heads * stride_lh
        tl.store(l_ptrs, lse, mask=row_mask)
    else:
        o_ptrs = (
            out_ptr + (q_start + token)[:, None] * stride_ot + heads[:, None] * stride_oh
            + offs_d[None, :] * stride_od
        )  # fmt: skip
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int, padded with any valid id
    context_lens: torch.Tensor,  # [num_seqs] int, KV length including the new tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    scale: float,
    max_query_len: int,  # host-side upper bound of the new tokens per sequence (sizes the grid)
    sliding_window: int | None = None,
    *,
    min_query_len: int = 1,
    out: torch.Tensor | None = None,
    cascade: ExtendCascade | None = None,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its pages (cached prefix included).

    Sequences with fewer than `min_query_len` new tokens are skipped and their rows of
    `out` left as they were (`min_query_len=2` leaves decode rows to `decode_attention`).
    With `cascade`, the new tokens of each group's sequences attend to the group's prefix
    together (each prefix K/V tile loaded once for all of them) and each sequence to its
    own keys after it; the two parts are merged by log-sum-exp. An fp8 cache is read with
    its scales. No host synchronisation.
    """
    out = torch.empty_like(query) if out is None else out
    group = check_attention_args(query, k_cache, v_cache, block_tables, context_lens,
                                 query_start_loc, out, sliding_window,
                                 k_scale, v_scale)  # fmt: skip
    num_seqs, head_dim = block_tables.shape[0], query.shape[2]
    if num_seqs == 0 or max_query_len < max(min_query_len, 1):
        return out
    if cascade is not None and sliding_window is not None:
        raise ValueError("cascade prefill attention takes no sliding window")
    parts = {}
    if cascade is not None:
        num_tokens, num_heads, _ = query.shape
        own = torch.empty((num_tokens, num_heads, head_dim), dtype=torch.float32, device=out.device)
        own_lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=out.device)
        parts = dict(
            starts_ptr=cascade.groups.starts, part_out_ptr=own, part_lse_ptr=own_lse,
            stride_pt=own.stride(0), stride_ph=own.stride(1), stride_pd=own.stride(2),
            stride_lt=own_lse.stride(0), stride_lh=own_lse.stride(1), HAS_STARTS=True,
        )  # fmt: skip
    block_m, block_n = row_tile_size(query.dtype), key_tile_size(head_dim, query.dtype)
    block_d = head_tile_size(head_dim)
    grid = (num_seqs, triton.cdiv(max_query_len * group, block_m), k_cache.shape[2])
    dot_f32 = dot_in_float32(query.dtype)
    stages = pipeline_stages(query.dtype, k_scale is not None)
    _prefill_kernel[grid](
        query_ptr=query, k_cache_ptr=k_cache, v_cache_ptr=v_cache, block_tables_ptr=block_tables,
        context_lens_ptr=context_lens, query_start_loc_ptr=query_start_loc, out_ptr=out,
        qk_scale=scale * LOG2_E, window=sliding_window or NO_WINDOW,
        min_query_len=min_query_len, group=group, head_dim=head_dim,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_qd=query.stride(2),
        stride_cb=k_cache.stride(0), stride_ct=k_cache.stride(1), stride_ch=k_cache.stride(2),
        stride_cd=k_cache.stride(3), stride_bt=block_tables.stride(0),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_F32=dot_f32, num_warps=tile_warps(block_m, block_d), num_stages=stages, **parts,
        **scale_args(k_scale, v_scale),
    )  # fmt: skip
    if cascade is not None:
        prefix = torch.empty_like(own)[:, :, None, :]
        prefix_lse = torch.empty_like(own_lse)[:, :, None]
        cascade_prefix(
            query, k_cache, v_cache, query_start_loc, cascade.groups, prefix, prefix_lse,
            scale, 0, group, block_n, block_d, dot_f32, by_token=True,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
        rows = cascade.rows
        l1, l2 = prefix_lse[rows, :, 0], own_lse[rows]
        top = torch.maximum(l1, l2)
        w1, w2 = torch.exp2(l1 - top)[..., None], torch.exp2(l2 - top)[..., None]
        merged = (prefix[rows, :, 0] * w1 + own[rows] * w2) / (w1 + w2)
        out[rows] = merged.to(out.dtype)
    return out


class ExtendCascade(NamedTuple):
    """Groups of extending sequences that share a prefix's pages: `groups.members` are the
    flat token rows of each group's new tokens, `groups.starts` each sequence's first own
    key; `rows` every such token row (where the two parts are merged)."""

    groups: DecodeCascade
    rows: torch.Tensor  # [num_rows] int64
