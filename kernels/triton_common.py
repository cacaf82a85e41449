"""What the Triton kernels share: where they can run, tile loads from the pages, one
online-softmax step.

An fp8 cache (float8 e4m3, `reference.FP8`) is read and written with its layer's scales
(k_scale, v_scale: [num_kv_heads] float32, pointers passed to every kernel): the store
writes K / k_scale, the attention kernels load fp8 tiles and dequantize them in registers
(times their KV head's scale, in float32, then the query's dtype) before the dot
products. The constexpr KV_FP8 picks that code, so the kernels of a 16- or 32-bit cache
are compiled as before. Converting to and from e4m3 needs compute capability 8.9 on CUDA
(`fp8_problem`); the interpreter runs it anywhere.

Where: CUDA tensors always; CPU tensors only under Triton's interpreter, which needs
`TRITON_INTERPRET=1` in the environment before triton is imported, and importing torch
(2.13) imports triton: set it before Python starts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagedbatch.kernels.reference import FP8
from triton.runtime.interpreter import InterpretedFunction

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# "No sliding window" is a window wider than any context (kept well inside int32).
NO_WINDOW = 2**30
LOG2_E = 1.4426950408889634


@triton.jit
def _probe() -> None:
    pass


# Triton decides when a function is defined whether it runs in the interpreter: ours at
# this import, its standard library (tl.max, tl.sum, tl.cdiv, ...) at triton's import.
# Both must be interpreted for the kernels to run on CPU.
_OURS_INTERPRETED = isinstance(_probe, InterpretedFunction)
_TRITONS_INTERPRETED = isinstance(tl.max, InterpretedFunction)
INTERPRETED = _OURS_INTERPRETED and _TRITONS_INTERPRETED


def launch_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None when they can."""
    if _OURS_INTERPRETED != _TRITONS_INTERPRETED:
        return (
            "TRITON_INTERPRET changed after triton was imported (importing torch imports it): "
            "set it in the environment before starting Python"
        )
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return None
    if device.type == "cpu":
        return (
            "Triton kernels run on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before starting (slow; for tests), or use attention 'torch'"
        )
    return f"Triton kernels need a CUDA device, got {device.type!r}"


def fp8_problem(device: torch.device) -> str | None:
    """Why the kernels cannot read or write an fp8 cache on `device`, or None when they can."""
    if device.type != "cuda":
        return None  # the interpreter (launch_problem says whether it runs)
    capability = torch.cuda.get_device_capability(device)
    if capability >= (8, 9):
        return None
    name = torch.cuda.get_device_name(device)
    return (
        "an fp8 KV cache on the Triton kernels needs a CUDA GPU of compute capability 8.9 or "
        f"more (float8 e4m3 conversion); {name} has {capability[0]}.{capability[1]}: pass "
        "--attention torch, or --kv-dtype auto"
    )


def check_tensors(dtype: torch.dtype, fp8: tuple[str, ...] = (), **tensors: torch.Tensor) -> None:
    """Raise ValueError unless all `tensors` share `dtype` (one we support) and a device;
    those named in `fp8` are float8 e4m3 instead (an fp8 cache)."""
    if dtype not in DTYPES:
        raise ValueError(f"Triton kernels support float32, float16, bfloat16; got {dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    problem = launch_problem(device) or (fp8_problem(device) if fp8 else None)
    if problem is not None:
        raise ValueError(problem)
    for name, t in tensors.items():
        want = FP8 if name in fp8 else dtype
        if t.is_floating_point() and t.dtype != want:
            raise ValueError(f"{name} is {t.dtype}, expected {want}")


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """Whether the cache is fp8; raise ValueError unless an fp8 cache comes with its scales
    ([num_kv_heads] float32, contiguous, on its device) and any other cache without."""
    given = [s for s in (k_scale, v_scale) if s is not None]
    if k_cache.dtype != FP8:
        if given:
            raise ValueError(f"k_scale and v_scale are an fp8 cache's; this one is {k_cache.dtype}")
        return False
    if len(given) != 2:
        raise ValueError("an fp8 cache is read and written with its scales (k_scale, v_scale)")
    heads = k_cache.shape[2] if k_cache.dim() == 4 else None
    for s in given:
        if s.dtype != torch.float32 or s.shape != (heads,) or s.stride() != (1,):
            raise ValueError(f"k_scale and v_scale must be [{heads}] float32, contiguous")
        if s.device != k_cache.device:
            raise ValueError(f"k_scale is on {s.device}, the cache on {k_cache.device}")
    return True


def scale_args(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> dict:
    """A kernel's keyword arguments for an fp8 cache's scales (none for another cache)."""
    if k_scale is None:
        return {}
    return dict(k_scale_ptr=k_scale, v_scale_ptr=v_scale, KV_FP8=True)


def check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether tl.dot should take float32 operands (computed in IEEE precision).

    Always for float32 caches (TF32 would cost ~1e-3 relative error). Also in the
    interpreter: Triton 3.6's multiplies bfloat16 bit patterns as integers in tl.dot,
    so it upcasts; a compiled kernel multiplies 16-bit operands natively. (Decided by
    the interpreter, not the tensors' device, so a kernel compiled ahead of time from
    CPU tensors is the one a GPU runs: tests/test_kernel_compile.py.)
    """
    return dtype == torch.float32 or INTERPRETED


@triton.jit
def load_page_tile(
    cache_ptr,
    table_ptr,  # this sequence's row of block_tables
    pos,  # [BLOCK_N] token positions in the sequence
    pos_mask,  # [BLOCK_N] which positions to read (others read as 0)
    kv_head,
    offs_d,  # [BLOCK_D]
    d_mask,  # [BLOCK_D]
    stride_block,
    stride_token,
    stride_head,
    stride_d,
    BLOCK_SIZE: tl.constexpr,
):
    """K or V of one KV head at `pos`: [BLOCK_N, BLOCK_D], each token looked up in its page."""
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    row = block * stride_block + (pos % BLOCK_SIZE) * stride_token + kv_head * stride_head
    ptrs = cache_ptr + row[:, None] + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=pos_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def attend_tile(
    q,  # [BLOCK_M, BLOCK_D], already in the dot dtype
    k,  # [BLOCK_N, BLOCK_D]
    v,  # [BLOCK_N, BLOCK_D]
    visible,  # [BLOCK_M, BLOCK_N] which scores count
    m_i,  # [BLOCK_M] running max of scores (base-2 exponent), -inf before any
    l_i,  # [BLOCK_M] running sum of exp2(score - m_i)
    acc,  # [BLOCK_M, BLOCK_D] float32 running sum of exp2(score - m_i) * v
    qk_scale,  # softmax scale * log2(e)
    k_scale,  # KV_FP8: the KV head's scales (float32 scalars); else unused
    v_scale,
    DOT_F32: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One key tile of the online softmax; returns the updated (m_i, l_i, acc).

    A row with no visible key so far keeps m_i = -inf, l_i = 0, acc = 0 (no NaN).
    """
    if KV_FP8:  # dequantized in registers, into the dot dtype (the query's)
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not DOT_F32:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def attend_span(
    q,  # [BLOCK_M, BLOCK_D], already in the dot dtype
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,  # the block table row the keys are looked up in
    start,  # first key position
    end,  # one past the last; every key in between is visible to every row
    kv_head,
    offs_n,  # [BLOCK_N]
    offs_d,  # [BLOCK_D]
    d_mask,  # [BLOCK_D]
    m_i,
    l_i,
    acc,
    qk_scale,
    k_scale,
    v_scale,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """The online softmax of `q` over the paged keys [start, end), tile by tile (each K/V
    tile loaded once for all rows); returns the updated (m_i, l_i, acc)."""
    for tile in range(start, end, BLOCK_N):
        pos = tile + offs_n
        pos_mask = pos < end
        k = load_page_tile(k_cache_ptr, table_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                           stride_cb, stride_ct, stride_ch, stride_cd, BLOCK_SIZE)  # fmt: skip
        v = load_page_tile(v_cache_ptr, table_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                           stride_cb, stride_ct, stride_ch, stride_cd, BLOCK_SIZE)  # fmt: skip
        m_i, l_i, acc = attend_tile(q, k, v, pos_mask[None, :], m_i, l_i, acc, qk_scale,
                                    k_scale, v_scale, DOT_F32, KV_FP8)  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def kv_head_scales(k_scale_ptr, v_scale_ptr, kv_head, KV_FP8: tl.constexpr):
    """An fp8 cache's (k_scale, v_scale) of `kv_head`; (1.0, 1.0), unused, for any other."""
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    return k_scale, v_scale


def check_attention_args(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int
    context_lens: torch.Tensor,  # [num_seqs] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    out: torch.Tensor,  # like query
    sliding_window: int | None,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32: an fp8 cache's scales
    v_scale: torch.Tensor | None = None,
) -> int:
    """Raise ValueError on a malformed paged attention call; return query heads per KV head."""
    fp8 = ("k_cache", "v_cache") if check_kv_scales(k_cache, k_scale, v_scale) else ()
    check_tensors(query.dtype, fp8, query=query, k_cache=k_cache, v_cache=v_cache, out=out,
                  block_tables=block_tables, context_lens=context_lens,
                  query_start_loc=query_start_loc)  # fmt: skip
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("query must be [tokens, heads, dim] and caches [blocks, size, heads, dim]")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    check_head_dim(head_dim)
    num_seqs = block_tables.shape[0]
    if block_tables.dim() != 2 or context_lens.shape != (num_seqs,):
        raise ValueError("block_tables must be [num_seqs, max_blocks], context_lens [num_seqs]")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [{num_seqs + 1}]")
    if out.shape != query.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != query shape {tuple(query.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return num_heads // num_kv_heads


def head_tile_size(head_dim: int) -> int:
    """BLOCK_D: head_dim rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


# A compiled float32 kernel multiplies on FMA units (tl.dot of float32 operands in IEEE
# precision, staged through shared memory): at the 16-bit tiles it spills kilobytes of
# registers, at 16 x 16 none (tests/test_kernel_compile.py). The interpreter has no
# registers and keeps the larger tiles: fewer, larger numpy steps, ~10x quicker tests.
FLOAT32_TILE = 16


def _compiled_float32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not INTERPRETED


def key_tile_size(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per tile: 64, or 32 where a row of a tile is over 256 bytes (registers);
    FLOAT32_TILE in a compiled float32 kernel."""
    if _compiled_float32(dtype):
        return FLOAT32_TILE
    row_bytes = head_tile_size(head_dim) * torch.empty((), dtype=dtype).element_size()
    return 64 if row_bytes <= 256 else 32


def tile_warps(block_m: int, block_d: int) -> int:
    """Warps of a program whose float32 accumulator is [block_m, block_d]: 4, or 8 from
    64 x 128 on (with 4, sm_80 spills there, at 255 registers)."""
    return 8 if block_m * block_d >= 64 * 128 else 4


def pipeline_stages(dtype: torch.dtype, fp8: bool) -> int:
    """num_stages of an attention kernel with `dtype` queries: 2; 1 for an fp8 cache under
    float32 queries (pipelined, its fp8 tiles take 255 registers and spill ~350 bytes on
    sm_90; unpipelined 72 and none: tests/test_kernel_compile.py)."""
    return 1 if fp8 and dtype == torch.float32 else 2


def row_tile_size(dtype: torch.dtype) -> int:
    """Query rows, at most, of one prefill or cascade prefix program (a K/V tile serves
    them all): 64; FLOAT32_TILE in a compiled float32 kernel."""
    return FLOAT32_TILE if _compiled_float32(dtype) else 64
