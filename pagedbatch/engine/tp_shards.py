"""What each tensor-parallel rank holds: which models split over N ranks, a rank's KV
heads, weights and threads, and the KV pool every rank allocates (the same block count)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.kv_cache import KVCacheSpec, num_blocks_for


def support_problem(config: Any, n: int) -> str | None:
    """Why the model of `config` cannot be split over `n` ranks, or None (config only)."""
    text = config.get_text_config()
    name = ", ".join(config.architectures or []) or config.model_type
    if not getattr(text, "base_model_tp_plan", None):
        return f"tensor parallel needs a transformers tensor-parallel plan; {name} has none"
    sizes = {
        "attention heads": text.num_attention_heads,
        "KV heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "intermediate size": getattr(text, "intermediate_size", 0),
        "vocabulary": text.vocab_size,
    }
    for what, size in sizes.items():
        if size % n:
            return f"tensor_parallel {n} must divide the {what} of {name} ({size})"
    return None


def shard_spec(spec: KVCacheSpec, n: int) -> KVCacheSpec:
    """One rank's KV cache shape: its own `num_kv_heads / n` KV heads."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // n)


def local_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (a sharded weight counts its local shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def pool_blocks(
    spec: KVCacheSpec, config: EngineConfig, device: torch.device, rank_weight_bytes: int,
    free: int | None = None,
) -> tuple[KVCacheSpec, int]:  # fmt: skip
    """Each rank's KV spec and the pool's block count (the same on every rank): LLM and
    `plan` both size the pool here.

    On CPU the ranks share one memory: the pool is sized as one process would size the
    whole model's (`kv_memory` the total; each rank holds its 1/N of every block). On CUDA
    each GPU holds its shard of the weights and its KV heads' part of the pool
    (`kv_memory` per GPU)."""
    n = config.tensor_parallel
    local = shard_spec(spec, n)
    whole = device.type == "cpu"
    blocks = num_blocks_for(
        spec if whole else local, device, config.num_blocks, config.kv_memory,
        weight_bytes=rank_weight_bytes * n if whole else rank_weight_bytes, free=free,
    )  # fmt: skip
    return local, blocks


def config_rank_weight_bytes(model_config: Any, dtype: torch.dtype, n: int) -> int:
    """The weight bytes of the rank holding most, from the config alone (meta device): a
    weight the tp plan splits counts 1/n, the rest (embeddings, norms) whole."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed.tensor_parallel import _get_parameter_tp_plan

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    plan = model.tp_plan
    total = 0
    for name, p in model.named_parameters():
        split = _get_parameter_tp_plan(name, plan, is_weight=True) is not None
        total += p.numel() * p.element_size() // (n if split else 1)
    return total
