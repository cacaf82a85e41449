"""The engine's own host work per decode step, with the model forward and sampling taken out.

`pagedbatch bench --host-overhead` runs `running_seqs` sequences whose contexts span about
`blocks_per_seq` KV blocks each on the one-layer `tiny-random` model, then times decode
steps: each loop iteration of `LLM.generate` (schedule, prepare, forward, sample,
postprocess, statistics, `on_step`) minus the forward and sampling the engine timed
itself. What is left is what a GPU would wait for the host each step.

Times are the main thread's CPU time (`time.thread_time`) with torch on one thread, so a
busy machine changes them little; on CUDA the forward is mostly kernel launches then.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pagedbatch.engine.stats import EngineStats
from pagedbatch.llm import LLM
from pagedbatch.sampling_params import SamplingParams

MODEL = "tiny-random"


@dataclass(frozen=True)
class HostOverhead:
    running_seqs: int
    blocks_per_seq: int
    block_size: int
    steps: int  # decode steps measured (every sequence running)
    host_ms_per_step: float  # median of (iteration - forward - sampling)
    iteration_ms: float  # median wall time of one loop iteration
    forward_ms: float  # median model forward
    sample_ms: float  # median sampling
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_host_overhead(
    running_seqs: int = 256,
    blocks_per_seq: int = 64,
    steps: int = 24,
    *,
    block_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> HostOverhead:
    """Decode `steps` steps with `running_seqs` sequences of about `blocks_per_seq` blocks."""
    prompt_len = (blocks_per_seq - 1) * block_size + 1
    budget = max(8192, running_seqs)
    # The first sequences admitted must still be decoding when the last one's prefill ends.
    prefill_steps = -(-running_seqs * prompt_len // budget) + 1
    max_tokens = prefill_steps + steps + 2
    llm = LLM(
        MODEL, device=device, block_size=block_size,
        num_blocks=running_seqs * (blocks_per_seq + 2 + max_tokens // block_size),
        max_num_seqs=running_seqs, max_batch_tokens=budget, prefix_sharing=False,
    )  # fmt: skip
    clock = llm.engine.clock = time.thread_time
    vocab = llm.model.config.vocab_size
    prompts = [
        [3 + (seed + i * 7919 + j * 104729) % (vocab - 3) for j in range(prompt_len)]
        for i in range(running_seqs)
    ]
    samples: list[tuple[float, float, float]] = []
    last = [clock()]

    def on_step(stats: EngineStats) -> None:
        now = clock()
        trace = llm.engine.last_step
        if trace is not None and trace.decode_only and trace.num_seqs == running_seqs:
            samples.append((now - last[0], trace.forward_seconds, trace.sample_seconds))
        last[0] = now

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm.generate(prompts, params, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    measured = samples[1 : steps + 1]  # the first follows the last prefill step
    if not measured:
        raise RuntimeError("no decode step ran with every sequence running")
    ms = 1000.0
    return HostOverhead(
        running_seqs=running_seqs,
        blocks_per_seq=blocks_per_seq,
        block_size=block_size,
        steps=len(measured),
        host_ms_per_step=ms * statistics.median(i - f - s for i, f, s in measured),
        iteration_ms=ms * statistics.median(i for i, _, _ in measured),
        forward_ms=ms * statistics.median(f for _, f, _ in measured),
        sample_ms=ms * statistics.median(s for _, _, s in measured),
        device=str(llm.device),
    )
