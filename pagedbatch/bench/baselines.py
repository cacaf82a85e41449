"""The transformers baselines of `pagedbatch bench`, on the prompts pagedbatch runs.

- `hf_generate`: `generate` over static batches, left-padded to the longest prompt;
  a batch runs until its longest output is done (what static batching costs). Its
  batches are formed as a fair static batcher would (`static_batches`): prompts sorted
  by length, then output length, so each batch pads and overruns as little as it can;
  by default as many per batch as pagedbatch runs at once, as far as memory allows
  (`static_batch_size`).
- `hf_generate_batch`: continuous batching over transformers' own paged cache (the
  manager behind `generate_batch`, so that each prompt can have its own length).

Both time generation only, after a warm-up; loading is timed separately, as for
pagedbatch. EOS never ends a prompt early. Each counts the tokens it returned for each
prompt, and a count that differs from the prompt's output length is its error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from pagedbatch.bench.result import BenchResult
from pagedbatch.bench.workloads import BenchPrompts
from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.kv_cache import KVCacheSpec

SORTED_ORDER = "sorted by prompt length, then output length"
MEMORY_FRACTION = 0.9  # of free memory, for one padded batch of generate
GIB = 2**30


class StaticBatchSize(NamedTuple):
    """The static batch size of `generate`, and what set it."""

    size: int
    reason: str


def static_batch_size(
    config: PretrainedConfig, dtype: torch.dtype, prompts: BenchPrompts, want: int, free: int
) -> StaticBatchSize:
    """`want` prompts per batch (pagedbatch's max_num_seqs), or fewer if a batch of the
    longest prompts and outputs would not fit in MEMORY_FRACTION of `free` bytes."""
    width, new = max(map(len, prompts.token_ids)), max(prompts.max_tokens)
    fits = int(MEMORY_FRACTION * free) // padded_row_bytes(config, dtype, width, new)
    if fits >= want:
        return StaticBatchSize(want, "max_num_seqs")
    return StaticBatchSize(
        max(1, fits), f"memory: {free / GIB:.1f} GiB free, {width}+{new} tokens a row"
    )


def padded_row_bytes(config: PretrainedConfig, dtype: torch.dtype, width: int, new: int) -> int:
    """Estimated memory one row of a padded `generate` batch needs, weights apart: the K/V
    of `width + new` tokens (and the copy a growing cache makes of one layer), and the
    prefill's largest activations (one layer's hidden states, MLP and attention scores,
    which sdpa's math path materialises; float32 logits of the last position)."""
    spec = KVCacheSpec.from_model_config(config, 1, dtype)
    kv = (width + new) * spec.bytes_per_token * (spec.num_layers + 1) // spec.num_layers
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden = width * (4 * config.hidden_size + 3 * config.intermediate_size) * itemsize
    scores = config.num_attention_heads * width * width * 4
    logits = 3 * config.vocab_size * 4
    return kv + hidden + scores + logits


def static_batches(prompts: BenchPrompts, batch_size: int) -> list[tuple[int, ...]]:
    """Prompt indices of each static batch of `generate`: sorted by prompt length, then
    output length, and cut every `batch_size` prompts."""
    lengths = [(len(p), n) for p, n in zip(prompts.token_ids, prompts.max_tokens)]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    return [tuple(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def padding_fraction(prompts: BenchPrompts, batches: Sequence[Sequence[int]]) -> float:
    """Of the token slots of the padded batches (longest prompt + longest output, per
    row), the fraction that is padding or past the row's own output."""
    slots = used = 0
    for batch in batches:
        width = max(len(prompts.token_ids[i]) for i in batch)
        new = max(prompts.max_tokens[i] for i in batch)
        slots += len(batch) * (width + new)
        used += sum(len(prompts.token_ids[i]) + prompts.max_tokens[i] for i in batch)
    return 1 - used / slots


@torch.inference_mode()
def hf_generate(
    model: PreTrainedModel, prompts: BenchPrompts, batch_size: int, pad_id: int
) -> BenchResult:
    """transformers `generate`, greedy, over the `static_batches` of `batch_size` prompts."""
    device = model.device
    batches = static_batches(prompts, batch_size)
    _generate(model, ((3, 4, 5), (6, 7)), (2, 2), pad_id)  # warm-up
    _synchronize(device)
    outputs = []
    started = time.perf_counter()
    for batch in batches:
        ids = tuple(prompts.token_ids[i] for i in batch)
        outputs.append(_generate(model, ids, tuple(prompts.max_tokens[i] for i in batch), pad_id))
    _synchronize(device)
    seconds = time.perf_counter() - started
    eos = _eos_ids(model.generation_config)
    produced = [0] * len(prompts)
    for batch, new_tokens in zip(batches, outputs):
        lengths = [prompts.max_tokens[i] for i in batch]
        for i, n in zip(batch, generated_lengths(new_tokens, lengths, eos, pad_id)):
            produced[i] = n
    given = {
        "batch_size": batch_size, "batches": len(batches), "order": SORTED_ORDER,
        "padding": f"{padding_fraction(prompts, batches):.1%}",
    }  # fmt: skip
    name = f"generate (batch {max(map(len, batches))})"
    return BenchResult.counted("generate", name, seconds, prompts.max_tokens, produced, given)


def _generate(
    model: PreTrainedModel, batch: tuple[tuple[int, ...], ...], lengths: tuple[int, ...], pad: int
) -> torch.Tensor:
    """The tokens `generate` appends to the left-padded batch: [batch, new]."""
    width, new = max(map(len, batch)), max(lengths)
    ids = torch.tensor([(pad,) * (width - len(p)) + p for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=pad,
    )  # fmt: skip
    return out[:, width:]


def generated_lengths(
    new_tokens: torch.Tensor, requested: Sequence[int], eos_ids: frozenset[int], pad_id: int
) -> list[int]:
    """Tokens each row of a padded `generate` output produced, up to its requested count.

    new_tokens: [batch, new], what came after the (left-padded) prompts. A row that
    `generate` finished early ends in an EOS followed only by pad fill; it counts up to
    its EOS. Any other row counts its columns.
    """
    counts = []
    for row, want in zip(new_tokens.tolist(), requested):
        stop = len(row)
        for i, token in enumerate(row):
            if token in eos_ids and all(t == pad_id for t in row[i + 1 :]):
                stop = i + 1
                break
        counts.append(min(want, stop))
    return counts


def _eos_ids(config: GenerationConfig) -> frozenset[int]:
    eos = config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def hf_generate_batch(
    model: PreTrainedModel, prompts: BenchPrompts, max_batch_tokens: int
) -> BenchResult:
    """transformers continuous batching, greedy, every prompt at its own output length.

    On CPU its step budget is `max_batch_tokens` (pagedbatch's); on CUDA it sizes
    everything itself. Not under inference_mode: its worker thread would then meet
    inference tensors.
    """
    from transformers.generation.continuous_batching.utils import WorkloadHints

    # eos_token_id -1 never matches: every request runs to its max_new_tokens.
    config = GenerationConfig(
        max_new_tokens=max(prompts.max_tokens), do_sample=False, eos_token_id=-1
    )
    hints = WorkloadHints(
        max_prompt_length=max(map(len, prompts.token_ids)),
        max_generated_length=max(prompts.max_tokens),
        num_requests=len(prompts),
    )
    cache_config = _cache_config(model, prompts, max_batch_tokens)
    with model.continuous_batching_context_manager(  # warms up (CUDA graphs) before it yields
        generation_config=config, continuous_batching_config=cache_config,
        block=True, timeout=5, workload_hints=hints,
    ) as manager:  # fmt: skip
        started = time.perf_counter()
        # In descending token order, as generate_batch adds them (for its prefix sharing).
        order = sorted(range(len(prompts)), key=lambda i: prompts.token_ids[i], reverse=True)
        for i in order:
            ids, n = prompts.token_ids[i], prompts.max_tokens[i]
            manager.add_request(list(ids), request_id=f"r{i}", max_new_tokens=n)
        produced, error = _collect(manager, len(prompts))
        seconds = time.perf_counter() - started
        given = _batching_given(manager.continuous_batching_config)
    return BenchResult.counted(
        "generate_batch", "generate_batch", seconds, prompts.max_tokens, produced, given, error
    )


def _cache_config(model: PreTrainedModel, prompts: BenchPrompts, max_batch_tokens: int):
    """On CPU, a cache that holds every prompt at once; on CUDA None (its default: most of
    the free memory, as pagedbatch takes). Its CPU default is 90% of all RAM, which
    takes longer to allocate than a small benchmark takes to run."""
    from transformers import ContinuousBatchingConfig

    if model.device.type == "cuda":
        return None
    block_size = ContinuousBatchingConfig.block_size
    lengths = (len(p) + n for p, n in zip(prompts.token_ids, prompts.max_tokens))
    num_blocks = sum(blocks_for(length, block_size) for length in lengths)
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)


def _batching_given(config) -> dict[str, Any]:
    """What transformers' continuous batching settled on (after its cache was made)."""
    return {
        "order": "descending token ids",
        "max_batch_tokens": config.max_batch_tokens,
        "max_requests_per_batch": config.max_requests_per_batch,
        "num_blocks": config.num_blocks,
        "block_size": config.block_size,
        "prefix_sharing": config.allow_block_sharing,
        "cuda_graphs": config.use_cuda_graph,
    }


def _collect(manager, num_requests: int) -> tuple[list[int], str | None]:
    """Wait for every request to finish; return the tokens each generated (in request
    order) and the first request error, if any."""
    produced, error = [0] * num_requests, None
    finished = 0
    while finished < num_requests:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped early")
            continue
        if result.is_finished():
            if result.error is not None and error is None:
                error = f"request {result.request_id}: {result.error}"
            finished += 1
            produced[int(result.request_id[1:])] = len(result.generated_tokens)
    return produced, error


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
