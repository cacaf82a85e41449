"""Triton store of a step's new K and V into the paged cache (reference: `reference.store_kv`).

An fp8 cache gets K / k_scale and V / v_scale of each KV head, saturated at +-448 and
rounded to the nearest float8 e4m3 (ties to even), as the reference writes them, byte
for byte: the rounding is done in float32 (`_round_to_e4m3`), so the cast to e4m3 is
exact wherever it runs (Triton 3.6's interpreter rounds halves up and drops the carry
into the exponent; a GPU's cvt rounds right).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagedbatch.kernels.reference import FP8_MAX
from pagedbatch.kernels.triton_common import (
    check_head_dim,
    check_kv_scales,
    check_tensors,
    scale_args,
)

# Globals a compiled kernel reads must be constexpr.
E4M3_MAX = tl.constexpr(FP8_MAX)
E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)  # below it e4m3 steps by 2**-9
SUBNORMAL_ROUNDER = tl.constexpr(2.0**14)  # float32's step at 2**14 is 2**-9


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= E4M3_MAX) rounded to the nearest float8 e4m3 value, ties to even."""
    mag = tl.abs(x)
    bits = mag.to(tl.int32, bitcast=True)
    # Keep 3 of float32's 23 mantissa bits: add just under half a step, plus the kept
    # lowest bit (ties to even), and clear the rest; a carry moves into the exponent.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (mag + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER  # float32 addition rounds
    mag = tl.where(mag < E4M3_MIN_NORMAL, subnormal, normal).to(tl.int32, bitcast=True)
    sign = x.to(tl.int32, bitcast=True) & -0x80000000  # -0.0 stays -0.0
    return (mag | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, scale, dtype: tl.constexpr):
    """x / scale as `dtype` (float8 e4m3), saturated at +-E4M3_MAX; scale broadcasts."""
    x = tl.math.div_rn(x.to(tl.float32), scale)  # IEEE division, as torch's
    x = tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX)
    return _round_to_e4m3(x).to(dtype)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    k_scale_ptr=None,  # [num_kv_heads] float32: an fp8 cache's scales (KV_FP8)
    v_scale_ptr=None,
    KV_FP8: tl.constexpr = False,
):
    # One program per new token: all its KV heads.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    dst = (
        (slot // BLOCK_SIZE) * stride_cb
        + (slot % BLOCK_SIZE) * stride_ct
        + offs_h[:, None] * stride_ch
        + offs_d[None, :] * stride_cd
    )
    k_src = token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    v_src = token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    k = tl.load(key_ptr + k_src, mask=mask)
    v = tl.load(value_ptr + v_src, mask=mask)
    if KV_FP8:
        h_mask = offs_h < num_kv_heads
        k_scale = tl.load(k_scale_ptr + offs_h, mask=h_mask, other=1.0)
        v_scale = tl.load(v_scale_ptr + offs_h, mask=h_mask, other=1.0)
        k = _quantize(k, k_scale[:, None], k_cache_ptr.dtype.element_ty)
        v = _quantize(v, v_scale[:, None], v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, block * block_size + offset; < 0 skipped
    *,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's K and V into its slot of the paged cache (fp8: quantized)."""
    fp8 = ("k_cache", "v_cache") if check_kv_scales(k_cache, k_scale, v_scale) else ()
    check_tensors(key.dtype, fp8, key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                  slot_mapping=slot_mapping)  # fmt: skip
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"cache shape {tuple(k_cache.shape)} does not hold [*, *, {num_kv_heads}, {head_dim}]"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != ({num_tokens},)")
    check_head_dim(head_dim)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key_ptr=key, value_ptr=value, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping, num_kv_heads=num_kv_heads, head_dim=head_dim,
        stride_kt=key.stride(0), stride_kh=key.stride(1), stride_kd=key.stride(2),
        stride_vt=value.stride(0), stride_vh=value.stride(1), stride_vd=value.stride(2),
        stride_cb=k_cache.stride(0), stride_ct=k_cache.stride(1), stride_ch=k_cache.stride(2),
        stride_cd=k_cache.stride(3), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        **scale_args(k_scale, v_scale),
    )  # fmt: skip
