"""Our attention, plugged into transformers through its attention interface.

A model loaded with `attn_implementation="pagedbatch"` calls `attention_forward` in
every layer; the step's `Batch` and the `PagedAttention` that owns the KV cache arrive
as keyword arguments of the model's forward (no global state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface

from pagedbatch.engine.batch import Batch
from pagedbatch.engine.cascade import CascadePlan
from pagedbatch.engine.kv_cache import KVCache
from pagedbatch.engine.profiling import ATTENTION, marked
from pagedbatch.kernels import reference

ATTN_IMPLEMENTATION = "pagedbatch"


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    try:
        from pagedbatch.kernels.triton_common import launch_problem
    except ImportError as e:
        return (
            f"attention 'triton' needs the triton package ({e}): pip install triton, "
            "or use attention 'torch'"
        )
    return launch_problem(device)


def kv_dtype_problem(
    backend: str, kv_dtype: torch.dtype, model_dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why attention `backend` cannot keep K/V in `kv_dtype` for a `model_dtype` model on
    `device`: the Triton kernels read and write the model's dtype or fp8 (on CUDA from
    compute capability 8.9: `triton_common.fp8_problem`); the torch backend any."""
    if backend != "triton" or kv_dtype == model_dtype:
        return None
    if kv_dtype == reference.FP8:
        if device.type != "cuda" or triton_problem(device) is not None:
            return None  # the interpreter runs it; else PagedAttention says what is missing
        from pagedbatch.kernels.triton_common import fp8_problem

        return fp8_problem(device)
    kv, model = (str(d).removeprefix("torch.") for d in (kv_dtype, model_dtype))
    return (
        f"a {kv} KV cache runs with --attention torch: the Triton kernels read and write "
        f"K/V in the model's dtype ({model}) or fp8; pass --attention torch, or --kv-dtype "
        "auto or fp8"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: 'auto' is triton on CUDA when Triton runs there, else torch."""
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_problem(device) is None else "torch"


class PagedAttention:
    """Stores a step's new K/V in the paged cache and attends over it.

    backend "torch": `kernels.reference`, planned once per step (padded buckets of
    sequences, their gathers and masks), then in each layer one fused attention call per
    bucket, in the cache's dtype. Backend "triton": the store kernel, then the decode
    kernel for sequences with one new token and the prefill kernel for the others, both
    writing into one output (an fp8 cache: each kernel gets the layer's scales, the store
    quantizes, the attention kernels dequantize in registers); launches are sized
    from the batch's host lists, so nothing waits on the device. The decode split count
    follows the batch size and `max_model_len` (not the step's context: a decode step's
    launches depend only on its batch size), and its split buffers are allocated once.
    A step's cascade plan (engine/cascade.py) reads shared prefix pages once per group
    (triton: the decoding and the extending members of a group apart, each kernel its own).
    """

    def __init__(
        self, kv_cache: KVCache, backend: str = "torch", max_model_len: int | None = None
    ) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"attention backend must be 'torch' or 'triton', got {backend!r}")
        if backend == "triton":
            problem = triton_problem(kv_cache.k[0].device)
            if problem is not None:
                raise ValueError(problem)
            from pagedbatch.kernels import decode_attention, prefill_attention, store

            self._store = store.store_kv
            self._decode = decode_attention.decode_attention
            self._prefill = prefill_attention.prefill_attention
            self._workspace = decode_attention.SplitWorkspace(kv_cache.k[0].device)
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_model_len = max_model_len
        # K/V token reads (summed over layers and KV heads' worth) that cascade saved.
        self.cascade_saved_token_reads = 0
        # The torch backend's plans of the step being run (`_torch_plan`).
        self._plans_for: Batch | None = None
        self._plans: dict[tuple[int | None, reference.Shape], reference.Plan] = {}
        # Called with (layer, key, value) before a layer stores them (engine/kv_scales.py).
        self.before_store: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def __call__(
        self,
        layer: int,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        batch: Batch,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        k_scale, v_scale = self.kv_cache.scales(layer)  # an fp8 cache's; else None
        if self.before_store is not None:
            self.before_store(layer, key, value)
        if self.backend == "triton":
            cache = (k_cache, v_cache, k_scale, v_scale)
            return self._triton(query, key, value, cache, batch, scale, sliding_window)
        reference.store_kv(key, value, k_cache, v_cache, batch.slot_mapping,
                           k_scale=k_scale, v_scale=v_scale)  # fmt: skip
        cascade = self._plan(batch, sliding_window)
        if cascade is not None:
            self.cascade_saved_token_reads += cascade.saved_token_reads
        shape = reference.Shape.of(query, k_cache)
        plan = self._torch_plan(batch, sliding_window, cascade, shape)
        return reference.run(plan, query, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)

    def _torch_plan(
        self, batch: Batch, sliding_window: int | None, cascade: CascadePlan | None,
        shape: reference.Shape,
    ) -> reference.Plan:  # fmt: skip
        """The torch backend's index tensors and masks for this step: made by the step's
        first layer, reused by the others (layers with another window get their own)."""
        if self._plans_for is not batch:
            self._plans_for, self._plans = batch, {}
        key = (sliding_window, shape)
        if key not in self._plans:
            tables, lens = batch.block_tables, batch.context_lens_host
            qsl = batch.query_start_loc_host
            if cascade is None:
                plan = reference.plan_paged(tables, lens, qsl, shape, sliding_window)
            else:
                groups = [(list(g.seqs), b) for g, b in zip(cascade.groups, cascade.prefix_blocks)]
                plan = reference.plan_cascade(tables, lens, qsl, shape, groups)
            self._plans[key] = plan
        return self._plans[key]

    @staticmethod
    def _plan(batch: Batch, sliding_window: int | None) -> CascadePlan | None:
        """The step's cascade plan, unless this layer's window hides some keys (the plain
        path masks them)."""
        if sliding_window is not None and sliding_window < batch.max_context_len:
            return None
        return batch.cascade

    def _triton(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        batch: Batch,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """`cache`: the layer's (k_cache, v_cache, k_scale, v_scale); scales None but fp8."""
        k_cache, v_cache, k_scale, v_scale = cache
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        self._store(key, value, k_cache, v_cache, batch.slot_mapping, **scales)
        out = torch.empty_like(query)
        args = (query, k_cache, v_cache, batch.block_tables, batch.context_lens,
                batch.query_start_loc, scale)  # fmt: skip
        plan = self._plan(batch, sliding_window)
        if plan is not None:  # (a window that a plan allows sees every key anyway)
            self.cascade_saved_token_reads += plan.triton_saved_token_reads
            sliding_window = None
        if batch.has_decode:
            bound = self.max_model_len or batch.max_context_len
            self._decode(*args, bound, sliding_window, out=out, workspace=self._workspace,
                         cascade=plan and plan.decode_part, **scales)  # fmt: skip
        if batch.max_query_len > 1:
            self._prefill(*args, batch.max_query_len, sliding_window, min_query_len=2, out=out,
                          cascade=plan and plan.extend_part, **scales)  # fmt: skip
        return out


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    paged_attention: PagedAttention | None = None,
    paged_batch: Batch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention-interface entry point; returns [1, num_tokens, heads, dim]."""
    if paged_attention is None or paged_batch is None:
        raise RuntimeError(
            "a model loaded with attn_implementation='pagedbatch' runs only inside "
            "the pagedbatch engine"
        )
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"pagedbatch attention does not support {unsupported}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with marked(ATTENTION):
        out = paged_attention(
            module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
            value[0].transpose(0, 1), paged_batch, scale, sliding_window,
        )  # fmt: skip
    return out[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
