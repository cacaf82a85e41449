"""The paged KV cache tensors of one model, and how many blocks fit in memory.

An fp8 cache (float8 e4m3, `--kv-dtype fp8`) holds each K and V divided by a scale of its
layer and KV head (`k_scale`, `v_scale`: [num_layers, num_kv_heads] float32, beside the
pool: 8 bytes a layer and head, not per block). Where the scales come from: the
checkpoint's own `k_scale` / `v_scale` when it has them, else measured at load
(engine/kv_scales.py); they never change after that.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from pagedbatch.engine.units import parse_memory
from pagedbatch.kernels.reference import FP8


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache: what one token and one block cost."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, block_size, dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class KVCache:
    """Per-layer K and V pools of shape [num_blocks, block_size, num_kv_heads, head_dim],
    and an fp8 pool's scales."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # An fp8 pool's scales: ones until `set_scales` (the store divides by them).
        self.k_scale: torch.Tensor | None = None  # [num_layers, num_kv_heads] float32
        self.v_scale: torch.Tensor | None = None
        self.scales_source: str | None = None  # where they came from, for people
        if spec.dtype == FP8:
            ones = torch.ones(spec.num_layers, spec.num_kv_heads, device=device)
            self.k_scale, self.v_scale = ones, ones.clone()
        # Uninitialised: kernels read only slots a sequence wrote (padding they gather is
        # masked and zeroed), and on CPU pages never touched cost no RAM.
        self.k = [
            torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.v = [
            torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def quantized(self) -> bool:
        """An fp8 pool: its entries are read and written with `k_scale` / `v_scale`."""
        return self.k_scale is not None

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer `layer`'s k_scale and v_scale ([num_kv_heads]), or (None, None)."""
        if self.k_scale is None or self.v_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def set_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor, source: str) -> None:
        """Fix an fp8 pool's scales ([num_layers, num_kv_heads]) before anything is stored."""
        if self.k_scale is None or self.v_scale is None:
            raise ValueError(f"a {self.spec.dtype} KV cache has no scales")
        self.k_scale.copy_(k_scale)
        self.v_scale.copy_(v_scale)
        self.scales_source = source

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks `src[i]` into `dst[i]` (copy-on-write) in every layer, byte for
        byte (an fp8 block keeps its values: the scales are the layer's, not the block's);
        the block ids [num_copies] int64 on the cache's device."""
        for cache in (*self.k, *self.v):
            raw = cache.view(torch.uint8) if cache.dtype == FP8 else cache
            raw[dst] = raw[src]


def free_memory(device: torch.device) -> int:
    """Bytes that could still be allocated on `device`: on CPU, what is available and this
    process may still map (`address_space_left`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available = int(info["MemAvailable"].split()[0]) * 1024
    left = address_space_left()
    return available if left is None else min(available, left)


def address_space_left() -> int | None:
    """Bytes this process may still map under its address-space limit (`ulimit -v`,
    RLIMIT_AS), or None when it has none. Every thread's stack and malloc arena counts,
    and an allocation past it fails: in the tokenizer's Rust code that aborts the process."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    return max(limit - mapped, 0)


CPU_KV_CAP = 4 * 2**30  # the default CPU cache stops here, whatever the RAM


def num_blocks_for(
    spec: KVCacheSpec,
    device: torch.device,
    num_blocks: int | None = None,
    kv_memory: str | float | None = None,
    *,
    weight_bytes: int = 0,
    free: int | None = None,
) -> int:
    """Blocks of the KV cache: `num_blocks`, or what `kv_memory` holds.

    A fraction of free memory is a fraction of what is free once the model's weights are
    resident: `free` (bytes free on `device` before the weights load; measured now when
    None) less `weight_bytes`. `LLM` measures `free` before it loads the model and passes
    the loaded parameters' bytes; `pagedbatch plan` loads no weights, measures `free` then
    and passes the bytes the config implies (models/weights.py): one rule on the same
    inputs, so both size the same pool on the same machine. (Free memory measured after
    loading would depend on how the weights load: on CPU a float32 checkpoint is mapped
    from the page cache, which still counts as available, a converted one is copied.)

    Default memory: 0.8 of that on a GPU, or a quarter of it up to 4 GiB on CPU (which a
    job may lower to what its records need: engine/job_pool.py).
    """
    if num_blocks is not None:
        return num_blocks
    memory = parse_memory(kv_memory) if kv_memory is not None else None
    if memory is None:
        memory = 0.8 if device.type == "cuda" else 0.25
    if isinstance(memory, float):
        available = (free_memory(device) if free is None else free) - weight_bytes
        memory = int(memory * max(available, 0))
    blocks = memory // spec.bytes_per_block
    if device.type == "cpu" and kv_memory is None:
        blocks = min(blocks, CPU_KV_CAP // spec.bytes_per_block)
    if blocks < 1:
        raise ValueError("kv_memory holds no KV block of this model; give more memory")
    return blocks
