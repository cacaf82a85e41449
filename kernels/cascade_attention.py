"""The prefix part of cascade attention: a group's new tokens against its shared prefix.

Sequences whose block tables start with the same pages (a cached prompt, a fork) hold
the same keys and values there. `_cascade_prefix_kernel`, grid (groups, KV heads, row
tiles), loads each K/V tile of a group's prefix once and attends with it for every
(member, query head) row of the group, writing a partial output and log-sum-exp; the
decode kernel (a member is a decoding sequence: one more split of its workspace) and
the prefill kernel (a member is one new token) merge it with each sequence's own part.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from pagedbatch.kernels.triton_common import (
    LOG2_E,
    attend_span,
    kv_head_scales,
    pipeline_stages,
    row_tile_size,
    scale_args,
    tile_warps,
)


class DecodeCascade(NamedTuple):
    """Groups of decoding sequences that share a prefix's pages (cascade attention):
    `decode_attention` reads each group's prefix once for all its members' queries and
    each member's own keys from `starts[seq]` on, and merges the two by log-sum-exp."""

    starts: torch.Tensor  # [num_seqs] int32: first key a sequence reads itself (0: all)
    prefix_tables: torch.Tensor  # [num_groups, max_prefix_blocks] int32
    prefix_lens: torch.Tensor  # [num_groups] int32, tokens (whole blocks)
    members: torch.Tensor  # [num_groups, max_members] int32 batch indices, padded
    num_members: torch.Tensor  # [num_groups] int32
    max_members: int  # host bound of num_members (sizes the launch)


@triton.jit
def _cascade_prefix_kernel(
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    query_start_loc_ptr,
    prefix_tables_ptr,  # [num_groups, max_prefix_blocks] int32: each group's shared pages
    prefix_lens_ptr,  # [num_groups] int32: tokens of each group's prefix
    members_ptr,  # [num_groups, max_members] int32: the group's decoding sequences
    num_members_ptr,  # [num_groups] int32
    part_out_ptr,  # the split workspace: the prefix part goes to split `slot`
    part_lse_ptr,
    qk_scale,
    slot,
    group,
    head_dim,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_pt,
    stride_mg,
    stride_ps,
    stride_ph,
    stride_pk,
    stride_pd,
    stride_ls,
    stride_lh,
    stride_lk,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    BY_TOKEN: tl.constexpr = False,  # members are token rows (extend), outputs by token row
    k_scale_ptr=None,  # [num_kv_heads] float32: an fp8 cache's scales (KV_FP8)
    v_scale_ptr=None,
    KV_FP8: tl.constexpr = False,
):
    """One group, one KV head, BLOCK_M of its (member, query head) rows: every K/V tile of
    the group's prefix is loaded once and used by all of them (no mask: the prefix is
    whole and before every member's new tokens). A member is a decoding sequence (its
    output goes to split `slot` of its row of the decode workspace) or, BY_TOKEN, one new
    token of an extending sequence (its output to that token's row)."""
    g = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_row = tl.program_id(2) * BLOCK_M
    rows_in_group = tl.load(num_members_ptr + g) * group
    if first_row >= rows_in_group:
        return
    offs_m = first_row + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows_in_group
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < head_dim
    seqs = tl.load(members_ptr + g * stride_mg + offs_m // group, mask=m_mask, other=0)
    heads = kv_head * group + offs_m % group
    if BY_TOKEN:  # noqa: SIM108 (a constexpr branch)
        q_rows = seqs
    else:
        q_rows = tl.load(query_start_loc_ptr + seqs, mask=m_mask, other=0)
    q_ptrs = (
        query_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh
        + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    table_ptr = prefix_tables_ptr + g * stride_pt
    prefix_len = tl.load(prefix_lens_ptr + g)
    k_scale, v_scale = kv_head_scales(k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = attend_span(
        q, k_cache_ptr, v_cache_ptr, table_ptr, 0, prefix_len, kv_head, offs_n, offs_d, d_mask,
        m_i, l_i, acc, qk_scale, k_scale, v_scale, stride_cb, stride_ct, stride_ch, stride_cd,
        BLOCK_SIZE, BLOCK_N, DOT_F32, KV_FP8,
    )  # fmt: skip

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_ptrs = (
        part_out_ptr + seqs[:, None] * stride_ps + heads[:, None] * stride_ph + slot * stride_pk
        + offs_d[None, :] * stride_pd
    )  # fmt: skip
    tl.store(o_ptrs, acc / l_safe[:, None], mask=m_mask[:, None] & d_mask[None, :])
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    l_ptrs = part_lse_ptr + seqs * stride_ls + heads * stride_lh + slot * stride_lk
    tl.store(l_ptrs, lse, mask=m_mask)


def cascade_prefix(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    cascade: DecodeCascade,
    part_out: torch.Tensor,  # [rows, num_heads, splits, head_dim] float32
    part_lse: torch.Tensor,  # [rows, num_heads, splits] float32 (log2)
    scale: float,
    slot: int,
    group: int,
    block_n: int,
    block_d: int,
    dot_f32: bool,
    by_token: bool = False,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> None:
    """Launch the prefix part of every cascade group into split `slot` of the workspace
    (rows: sequences; `by_token`: the members are token rows, and so are the rows)."""
    num_groups = cascade.prefix_lens.shape[0]
    if num_groups == 0:
        return
    rows = cascade.max_members * group  # (member, query head) rows of the largest group
    block_m = min(row_tile_size(query.dtype), max(16, triton.next_power_of_2(rows)))
    grid = (num_groups, k_cache.shape[2], triton.cdiv(rows, block_m))
    stages = pipeline_stages(query.dtype, k_scale is not None)
    _cascade_prefix_kernel[grid](
        query_ptr=query, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        query_start_loc_ptr=query_start_loc, prefix_tables_ptr=cascade.prefix_tables,
        prefix_lens_ptr=cascade.prefix_lens, members_ptr=cascade.members,
        num_members_ptr=cascade.num_members, part_out_ptr=part_out, part_lse_ptr=part_lse,
        qk_scale=scale * LOG2_E, slot=slot, group=group, head_dim=query.shape[2],
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_qd=query.stride(2),
        stride_cb=k_cache.stride(0), stride_ct=k_cache.stride(1), stride_ch=k_cache.stride(2),
        stride_cd=k_cache.stride(3), stride_pt=cascade.prefix_tables.stride(0),
        stride_mg=cascade.members.stride(0),
        stride_ps=part_out.stride(0), stride_ph=part_out.stride(1), stride_pk=part_out.stride(2),
        stride_pd=part_out.stride(3), stride_ls=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_lk=part_lse.stride(2), BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, DOT_F32=dot_f32, BY_TOKEN=by_token,
        num_warps=tile_warps(block_m, block_d), num_stages=stages, **scale_args(k_scale, v_scale),
    )  # fmt: skip
