"""Where an fp8 KV cache's scales come from: the checkpoint's, else measured at load.

A checkpoint quantized with an fp8 KV cache (llm-compressor, AutoFP8: what vLLM reads)
stores `k_scale` / `v_scale` per attention layer (a number, or one per KV head):
`models/quantization.py` reads them and they are used as they are.

Otherwise the scales are measured once, at load: one prefill of a fixed text
(`MEASURE_TEXT`, rendered through the chat template when the tokenizer has one, so the
special tokens that open every chat record are in it) runs through the model as a step
does, and at each layer, before its K and V are stored, the scale of each KV head becomes
`HEADROOM` x the head's largest |K| (|V|) / 448, fixed from then on. Why this rule:

- not the job's own first prefill: the scales would then depend on which records run
  first, so a resumed job, another order, or each Ray replica would store other values
  and could generate other tokens than an uninterrupted run;
- not one fixed scale (1.0 for all): heads differ by orders of magnitude, and e4m3 keeps 3
  mantissa bits only above 2^-6, so small heads would lose most of their precision and
  large ones (Qwen's keys) saturate;
- `HEADROOM` 4: a job's values may exceed the text's; above 4x they saturate at +-448,
  while values below 1/7168 of the text's largest become subnormal (coarser), a loss
  that matters little next to the large entries a dot product is made of.
"""

from __future__ import annotations

import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.kv_cache import KVCache
from pagedbatch.kernels.reference import FP8_MAX

HEADROOM = 4.0
MEASURED = "measured at load on a fixed text"
CHECKPOINT = "the checkpoint's k_scale / v_scale"
MEASURE_TEXT = (
    "Label the review below as positive, negative or mixed, then explain in one sentence. "
    "Review: The battery lasts two full days and the screen is bright, but the case cracked "
    "after a week and support took 12 days to answer. Question: what is 17 + 25? Answer: 42. "
    'Translate to French: "Good morning, where is the station?" Code: def f(x): return '
    "[i * 2 for i in range(x)] # doubles. Numbers: 3.14159, 1,000,000, 2025-01-31, 99%."
)


def scales_for(x: torch.Tensor) -> torch.Tensor:  # x [num_tokens, num_kv_heads, head_dim]
    """The fp8 scale of each KV head that maps HEADROOM x its largest |x| to 448 ([H])."""
    amax = x.float().abs().amax(dim=(0, 2))
    return torch.where(amax > 0, amax * HEADROOM / FP8_MAX, torch.ones_like(amax))


def measure_kv_scales(
    model: torch.nn.Module, cache: KVCache, backend: str, token_ids: list[int]
) -> None:
    """Set `cache`'s fp8 scales from one prefill of `token_ids` through `model` (attention
    `backend`), stored in a scratch pool of its own: the pool's size never changes them."""
    if not cache.quantized:
        raise ValueError("only an fp8 KV cache has scales to measure")
    size, device = cache.spec.block_size, cache.k[0].device
    scratch = KVCache(cache.spec, blocks_for(len(token_ids), size), device)
    scratch.k_scale, scratch.v_scale = cache.k_scale, cache.v_scale  # measured in place
    attention = PagedAttention(scratch, backend)

    def measure(layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        cache.k_scale[layer], cache.v_scale[layer] = scales_for(key), scales_for(value)

    attention.before_store = measure  # each layer's, before it stores its K and V
    batch = _one_prefill(token_ids, size, device)
    with torch.inference_mode():
        model(
            input_ids=batch.input_ids[None], position_ids=batch.positions[None], use_cache=False,
            logits_to_keep=batch.logits_indices, paged_attention=attention, paged_batch=batch,
        )  # fmt: skip
    cache.scales_source = MEASURED


def _one_prefill(ids: list[int], block_size: int, device: torch.device) -> Batch:
    """The Batch of one sequence computing all of `ids`, in blocks 0, 1, ..."""
    n = len(ids)
    blocks = blocks_for(n, block_size)
    return Batch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.arange(n, device=device),
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        logits_indices=torch.tensor([n - 1], device=device),
        context_lens_host=[n],
        query_start_loc_host=[0, n],
    )
