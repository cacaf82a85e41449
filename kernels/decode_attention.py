"""Triton paged decode attention, flash-decoding style (reference: `reference.paged_attention`).

Each sequence with one new token attends over its pages in two stages:
1. `_decode_split_kernel`, grid (num_seqs, num_kv_heads, num_splits): a program takes
   one KV head and one chunk of the context, loads each K/V tile once for all query
   heads of that KV head (the GQA group, padded to >= 16 rows for tl.dot) and writes
   their partial outputs and log-sum-exps.
2. `_decode_merge_kernel`, grid (num_seqs, num_heads): merges the splits of one head.

With a `DecodeCascade`, sequences that share a prefix's pages read them once per group:
the split kernel reads each sequence's keys from its `starts` entry on, and
the prefix kernel of `cascade_attention.py` loads each prefix K/V tile once for all the
group's (member, query head) rows and writes one more split, merged with the others.

The number of splits comes from shapes and a host-side bound on the context length,
never from device values (`num_splits_for`), so the launch can be captured in a CUDA
graph. Each sequence divides its own context among the splits, in whole key tiles;
splits past its end are empty (log-sum-exp -inf, weight 0 in the merge).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagedbatch.kernels.cascade_attention import DecodeCascade, cascade_prefix
from pagedbatch.kernels.triton_common import (
    LOG2_E,
    NO_WINDOW,
    attend_span,
    check_attention_args,
    dot_in_float32,
    head_tile_size,
    key_tile_size,
    kv_head_scales,
    pipeline_stages,
    scale_args,
)

MIN_SPLIT_TOKENS = 256  # shorter chunks cost more to merge than their parallelism gains
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # enough programs in flight to keep the memory system busy


@triton.jit
def _decode_split_kernel(
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32; WRITE_OUT: the output
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] float32, log2 of the softmax sum
    qk_scale,
    window,
    num_splits,
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
    stride_ps,
    stride_ph,
    stride_pk,
    stride_pd,
    stride_ls,
    stride_lh,
    stride_lk,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    WRITE_OUT: tl.constexpr,  # one split: write the final rows (by token) and no lse
    starts_ptr=None,  # [num_seqs] int32: first key each sequence reads (cascade: its prefix)
    HAS_STARTS: tl.constexpr = False,  # then split `num_splits` is the prefix part's slot
    k_scale_ptr=None,  # [num_kv_heads] float32: an fp8 cache's scales (KV_FP8)
    v_scale_ptr=None,
    KV_FP8: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    context_len = tl.load(context_lens_ptr + seq)
    lo = tl.maximum(context_len - window, 0)  # first key inside the window
    if HAS_STARTS:
        lo = tl.maximum(lo, tl.load(starts_ptr + seq))
    per_split = tl.cdiv(tl.cdiv(context_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, context_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_h
    h_mask = offs_h < group
    d_mask = offs_d < head_dim
    q_ptrs = (
        query_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt
    k_scale, v_scale = kv_head_scales(k_scale_ptr, v_scale_ptr, kv_head, KV_FP8)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_i, l_i, acc = attend_span(
        q, k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head, offs_n, offs_d, d_mask,
        m_i, l_i, acc, qk_scale, k_scale, v_scale, stride_cb, stride_ct, stride_ch, stride_cd,
        BLOCK_SIZE, BLOCK_N, DOT_F32, KV_FP8,
    )  # fmt: skip

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    row = q_row if WRITE_OUT else seq
    o_ptrs = (
        part_out_ptr + row * stride_ps + heads[:, None] * stride_ph + split * stride_pk
        + offs_d[None, :] * stride_pd
    )  # fmt: skip
    result = acc / l_safe[:, None]
    tl.store(
        o_ptrs, result.to(part_out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :]
    )
    if not WRITE_OUT:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        l_ptrs = part_lse_ptr + seq * stride_ls + heads * stride_lh + split * stride_lk
        tl.store(l_ptrs, lse, mask=h_mask)
    if HAS_STARTS and split == 0:  # the prefix slot: empty unless the prefix kernel writes it
        empty = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_ptrs = part_lse_ptr + seq * stride_ls + heads * stride_lh + num_splits * stride_lk
        tl.store(l_ptrs, empty, mask=h_mask)
        zero_ptrs = (
            part_out_ptr + seq * stride_ps + heads[:, None] * stride_ph
            + num_splits * stride_pk + offs_d[None, :] * stride_pd
        )  # fmt: skip
        zeros = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # weight 0 must not meet a NaN
        tl.store(zero_ptrs, zeros, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    num_splits,
    head_dim,
    stride_ps,
    stride_ph,
    stride_pk,
    stride_pd,
    stride_ls,
    stride_lh,
    stride_lk,
    stride_ot,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    l_ptrs = part_lse_ptr + seq * stride_ls + head * stride_lh + offs_s * stride_lk
    lse = tl.load(l_ptrs, mask=s_mask, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))  # split 0 is never empty: the max is finite
    o_ptrs = (
        part_out_ptr + seq * stride_ps + head * stride_ph + offs_s[:, None] * stride_pk
        + offs_d[None, :] * stride_pd
    )  # fmt: skip
    part = tl.load(o_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    merged = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    out_ptrs = out_ptr + q_row * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=d_mask)


class SplitWorkspace:
    """The split kernel's partial outputs and log-sum-exps, allocated once and grown.

    `buffers(...)` returns strided views of the first rows and splits, so a caller that
    keeps one workspace (one per engine) allocates nothing per step once it has grown.
    """

    def __init__(self, device: torch.device) -> None:
        self.out = torch.empty((0, 0, 0, 0), dtype=torch.float32, device=device)
        self.lse = torch.empty((0, 0, 0), dtype=torch.float32, device=device)

    def buffers(
        self, num_seqs: int, num_heads: int, num_splits: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        want = (num_seqs, num_heads, num_splits, head_dim)
        if any(w > h for w, h in zip(want, self.out.shape)):
            shape = tuple(max(w, h) for w, h in zip(want, self.out.shape))
            self.out = self.out.new_empty(shape)
            self.lse = self.lse.new_empty(shape[:3])
        out = self.out[:num_seqs, :num_heads, :num_splits, :head_dim]
        return out, self.lse[:num_seqs, :num_heads, :num_splits]


def num_splits_for(
    num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Splits per sequence: enough programs to fill the device, none under MIN_SPLIT_TOKENS.

    Pure host arithmetic on shapes and a host bound of the context length.
    """
    sms = 1  # the interpreter: one program at a time
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, num_seqs * num_kv_heads)
    most = min(MAX_SPLITS, max_context_len // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, most))


def decode_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int, padded with any valid id
    context_lens: torch.Tensor,  # [num_seqs] int, KV length including the new token
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    scale: float,
    max_context_len: int,  # host-side upper bound of context_lens (sizes the splits)
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: SplitWorkspace | None = None,
    cascade: DecodeCascade | None = None,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of each sequence's one new token over its pages.

    Sequences with another number of new tokens are skipped and their rows of `out`
    left as they were, so a mixed batch can run this and
    `prefill_attention(min_query_len=2)` into the same `out`. No host synchronisation.
    With one split the first kernel writes `out` itself and the merge does not run;
    otherwise the partial results go to `workspace` (allocated here when None). With
    `cascade`, each group's prefix part is one more split of its members (no sliding
    window then: every prefix key is visible). An fp8 cache is read with its scales.
    """
    out = torch.empty_like(query) if out is None else out
    group = check_attention_args(query, k_cache, v_cache, block_tables, context_lens,
                                 query_start_loc, out, sliding_window,
                                 k_scale, v_scale)  # fmt: skip
    num_seqs, (num_heads, head_dim) = block_tables.shape[0], query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        num_splits = num_splits_for(num_seqs, num_kv_heads, max_context_len, query.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_seqs == 0:
        return out
    if cascade is not None and sliding_window is not None:
        raise ValueError("cascade decode attention takes no sliding window")
    direct = num_splits == 1 and cascade is None
    total_splits = num_splits + (cascade is not None)  # the prefix part: split `num_splits`
    if direct:  # the "partial" output is the output, by token row; no lse is written
        part_out, part_lse = out[:, :, None, :], out[:, :, None, 0]
    else:
        workspace = workspace or SplitWorkspace(query.device)
        part_out, part_lse = workspace.buffers(num_seqs, num_heads, total_splits, head_dim)
    block_d = head_tile_size(head_dim)
    block_n = key_tile_size(head_dim, query.dtype)
    dot_f32 = dot_in_float32(query.dtype)
    stages = pipeline_stages(query.dtype, k_scale is not None)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query_ptr=query, k_cache_ptr=k_cache, v_cache_ptr=v_cache, block_tables_ptr=block_tables,
        context_lens_ptr=context_lens, query_start_loc_ptr=query_start_loc,
        part_out_ptr=part_out, part_lse_ptr=part_lse, qk_scale=scale * LOG2_E,
        window=sliding_window or NO_WINDOW, num_splits=num_splits, group=group, head_dim=head_dim,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_qd=query.stride(2),
        stride_cb=k_cache.stride(0), stride_ct=k_cache.stride(1), stride_ch=k_cache.stride(2),
        stride_cd=k_cache.stride(3), stride_bt=block_tables.stride(0),
        stride_ps=part_out.stride(0), stride_ph=part_out.stride(1), stride_pk=part_out.stride(2),
        stride_pd=part_out.stride(3), stride_ls=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_lk=part_lse.stride(2), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_F32=dot_f32, WRITE_OUT=direct,
        starts_ptr=context_lens if cascade is None else cascade.starts,
        HAS_STARTS=cascade is not None, num_warps=4, num_stages=stages,
        **scale_args(k_scale, v_scale),
    )  # fmt: skip
    if direct:
        return out
    if cascade is not None:
        cascade_prefix(query, k_cache, v_cache, query_start_loc, cascade, part_out, part_lse,
                       scale, num_splits, group, block_n, block_d, dot_f32,
                       k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out_ptr=part_out, part_lse_ptr=part_lse, out_ptr=out,
        query_start_loc_ptr=query_start_loc, num_splits=total_splits, head_dim=head_dim,
        stride_ps=part_out.stride(0), stride_ph=part_out.stride(1), stride_pk=part_out.stride(2),
        stride_pd=part_out.stride(3), stride_ls=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_lk=part_lse.stride(2), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_od=out.stride(2), BLOCK_S=triton.next_power_of_2(total_splits), BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    return out
