"""The transformers baselines of `pagedbatch bench`, on the prompts pagedbatch runs.

- `hf_generate`: `generate` over static batches, left-padded to the longest prompt;
  a batch runs until its longest output is done (what static batching costs), and
  each prompt counts only its own output length.
- `hf_generate_batch`: continuous batching over transformers' own paged cache (the
  manager behind `generate_batch`, so that each prompt can have its own length).

Both time generation only, after a warm-up; loading is timed separately, as for
pagedbatch. EOS never ends a prompt early.
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, PreTrainedModel

from pagedbatch.bench.result import BenchResult
from pagedbatch.bench.workloads import BenchPrompts
from pagedbatch.engine.block_pool import blocks_for


@torch.inference_mode()
def hf_generate(
    model: PreTrainedModel, prompts: BenchPrompts, batch_size: int, pad_id: int
) -> BenchResult:
    """transformers `generate`, greedy, in static batches of `batch_size` prompts."""
    device = model.device
    _generate(model, ((3, 4, 5), (6, 7)), (2, 2), pad_id)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        end = i + batch_size
        _generate(model, prompts.token_ids[i:end], prompts.max_tokens[i:end], pad_id)
    _synchronize(device)
    seconds = time.perf_counter() - started
    name = f"generate (batch {batch_size})"
    return BenchResult("generate", name, seconds, len(prompts), prompts.output_tokens)


def _generate(
    model: PreTrainedModel, batch: tuple[tuple[int, ...], ...], lengths: tuple[int, ...], pad: int
) -> None:
    width, new = max(map(len, batch)), max(lengths)
    ids = torch.tensor([(pad,) * (width - len(p)) + p for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=pad,
    )  # fmt: skip
    if out.shape != (len(batch), width + new):  # shapes are host data: no sync
        raise RuntimeError(
            f"generate returned shape {tuple(out.shape)}, not {(len(batch), width + new)}"
        )


def hf_generate_batch(model: PreTrainedModel, prompts: BenchPrompts) -> BenchResult:
    """transformers continuous batching, greedy, every prompt at its own output length.

    Not under inference_mode: its worker thread would then meet inference tensors.
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
    with model.continuous_batching_context_manager(  # warms up (CUDA graphs) before it yields
        generation_config=config, continuous_batching_config=_cache_config(model, prompts),
        block=True, timeout=5, workload_hints=hints,
    ) as manager:  # fmt: skip
        started = time.perf_counter()
        # In descending token order, as generate_batch adds them (for its prefix sharing).
        order = sorted(range(len(prompts)), key=lambda i: prompts.token_ids[i], reverse=True)
        for i in order:
            ids, n = prompts.token_ids[i], prompts.max_tokens[i]
            manager.add_request(list(ids), request_id=f"r{i}", max_new_tokens=n)
        tokens = _collect(manager, len(prompts))
        seconds = time.perf_counter() - started
    if tokens != prompts.output_tokens:
        raise RuntimeError(f"generate_batch produced {tokens} of {prompts.output_tokens} tokens")
    return BenchResult("generate_batch", "generate_batch", seconds, len(prompts), tokens)


def _cache_config(model: PreTrainedModel, prompts: BenchPrompts):
    """On CPU, a cache that holds every prompt at once; on CUDA None (its default: most of
    the free memory, as pagedbatch takes). Its CPU default is 90% of all RAM, which
    takes longer to allocate than a small benchmark takes to run."""
    from transformers import ContinuousBatchingConfig

    if model.device.type == "cuda":
        return None
    block_size = ContinuousBatchingConfig.block_size
    lengths = (len(p) + n for p, n in zip(prompts.token_ids, prompts.max_tokens))
    num_blocks = sum(blocks_for(length, block_size) for length in lengths)
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=2048)


def _collect(manager, num_requests: int) -> int:
    """Wait for every request to finish; return the tokens they generated."""
    tokens = finished = 0
    while finished < num_requests:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped early")
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"generate_batch request {result.request_id}: {result.error}")
            finished += 1
            tokens += len(result.generated_tokens)
    return tokens


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
