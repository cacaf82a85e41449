"""A short measured probe of a job's rates on the real model and device, for `plan`.

It loads the model as `run` would (same EngineConfig), then runs the job's own first
prompts in the engine's order: one call that only prefills them (about one step's
`max_batch_tokens` of prompt tokens to compute; on a CPU at most CPU_PREFILL_TOKENS),
then a few decode steps at the batch the job will run, made of copies of those prompts.
The copies cost one prompt token each (their blocks are cached), and with cascade
attention off they read their whole contexts
as separate sequences would; with cascade on (a job with prefix sharing) they share all
of their context, a little more than most jobs' records do. Prompts are cut to one step's
tokens, so a job of longer prompts is measured on shorter contexts than it has.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.stats import EngineStats
from pagedbatch.llm import LLM
from pagedbatch.plan.rates import PROBE, Rates
from pagedbatch.requests.prompt_store import common_prefix
from pagedbatch.sampling_params import SamplingParams

DECODE_STEPS = 4
# Prompt tokens the probe prefills on a CPU: one step of the default 2048 took most of a
# minute with a 135M model on one thread; a CPU computes 512 about as fast a token.
CPU_PREFILL_TOKENS = 512


class ProbeResult(NamedTuple):
    rates: Rates
    load_seconds: float  # making the LLM: loading the weights, the KV pool, CUDA graphs
    seconds: float  # the whole probe, load included
    prefill_tokens: int = 0  # prompt tokens its prefill measured


def probe_prompts(
    prompts: list[list[int]], budget: int, max_len: int, block_size: int, most: int
) -> list[list[int]]:
    """The first prompts (at most `most`) in the engine's (sorted) order whose tokens left to
    compute after sharing fit in `budget` (at least one), each cut to `min(budget, max_len)`
    tokens and then to one token past a block boundary: a copy of it (the decode batch)
    then finds every block but its last token cached and computes just that token. A
    prompt that is not longer than a block is kept whole (cut, it would be one token): its
    copies compute it again, a few tokens each."""
    chosen: list[list[int]] = []
    left = budget
    for ids in sorted(prompts)[:most]:
        ids = ids[: min(budget, max_len)]
        if len(ids) > block_size:
            ids = ids[: len(ids) - (len(ids) - 1) % block_size]
        cost = len(ids) - (common_prefix(chosen[-1], ids) if chosen else 0)
        if chosen and cost > left:
            break
        chosen.append(ids)
        left -= cost
    return chosen


def probe_rates(
    config: EngineConfig, prompts: list[list[int]], running_seqs: int, max_model_len: int
) -> ProbeResult:
    """Measure prefill and decode tokens per second of `config`'s model on its device with
    the job's `prompts` (token ids), decoding `running_seqs` sequences at once."""
    started = time.perf_counter()
    llm = LLM(config=config.replace(prefix_sharing=True, cascade=_cascade(config)))
    loaded = time.perf_counter()
    budget = config.max_batch_tokens
    if llm.device.type == "cpu":
        budget = min(budget, CPU_PREFILL_TOKENS)
    chunk = probe_prompts(
        prompts, budget, max_model_len - DECODE_STEPS - 2, config.block_size,
        most=max(running_seqs, 1),
    )  # fmt: skip
    llm.generate([chunk[0][:8]], _greedy(2))  # warm-up: the first forward's one-time costs
    before = llm.stats()
    llm.generate(chunk, _greedy(1))
    prefilled = llm.stats()
    copies = [chunk[i % len(chunk)] for i in range(max(running_seqs, 1))]
    llm.generate(copies, _greedy(1 + DECODE_STEPS))
    decoded = llm.stats()
    rates = Rates(
        prefill_tok_s=_prefill_rate(prefilled, before),
        decode_tok_s=_rate(decoded, prefilled, "decode"),
        decode_seqs=(decoded.decode_step_tokens - prefilled.decode_step_tokens)
        / max(decoded.decode_steps - prefilled.decode_steps, 1),
        source=PROBE,
        measured_at=time.strftime("%Y-%m-%d %H:%M"),
    )
    measured = _step_tokens(prefilled) - _step_tokens(before)
    return ProbeResult(rates, loaded - started, time.perf_counter() - started, measured)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _cascade(config: EngineConfig) -> bool:
    """The probe shares its prompts' blocks to be short; cascade only where the job has it."""
    return config.cascade and config.prefix_sharing


def _step_tokens(stats: EngineStats) -> int:
    return stats.prefill_step_tokens + stats.decode_step_tokens


def _prefill_rate(after: EngineStats, before: EngineStats) -> float:
    """Prompt tokens a second over the prefill call's steps, whatever their kind: with one
    output token a record, that call runs only its prompts' steps (a step of one-token
    prompts counts as a decode step)."""
    seconds = after.prefill_step_seconds + after.decode_step_seconds
    seconds -= before.prefill_step_seconds + before.decode_step_seconds
    tokens = _step_tokens(after) - _step_tokens(before)
    if tokens <= 0 or seconds <= 0:
        raise ValueError("the probe ran no prefill step")
    return tokens / seconds


def _rate(after: EngineStats, before: EngineStats, kind: str) -> float:
    tokens = getattr(after, f"{kind}_step_tokens") - getattr(before, f"{kind}_step_tokens")
    seconds = getattr(after, f"{kind}_step_seconds") - getattr(before, f"{kind}_step_seconds")
    if tokens <= 0 or seconds <= 0:
        raise ValueError(f"the probe ran no {kind} step")
    return tokens / seconds
