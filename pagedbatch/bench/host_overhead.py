"""The engine's own host work per decode step, by phase, on the default path.

`pagedbatch bench --host-overhead` runs `running_seqs` sequences whose contexts span about
`blocks_per_seq` KV blocks each on the one-layer `tiny-random` model, with LLM's defaults
(prefix sharing and cascade planning on), and times the steps where every sequence
decodes (a `choices` job never decodes: every step after its first counts). Workloads:

- shared: every prompt is one instruction then a record's own text (the last
  `UNIQUE_BLOCKS` to `UNIQUE_BLOCKS + 1` blocks), as a labelling job's are; greedy;
- sampled: the same prompts at temperature 0.8, top-p 0.95 (sampling params travel);
- logprobs: the same prompts, greedy, with 5 logprobs per token;
- random: prompts that share nothing (sharing still on);
- choices: the same prompts, each scoring three labels instead of generating.

A step's host work is its loop iteration of `LLM.generate` less the device's windows (the
model forward and the sampling ops, which on CPU run in this thread too). The phases are
the exclusive times of the engine's calls (bench/phase_timer.py): schedule, prepare,
cascade_plan, sampling_params, outputs (logprobs and choice scores handed to the
sequences), commit, radix (prefix cache inserts and matches), postprocess; `other` is the
rest (statistics, outputs of LLM.generate). The bench's own clock reads (a system call
each, a few dozen a step) are counted and their cost taken out of the host total
(`timer_ms`); a phase's time still holds the reads of the phases timed inside it. Each
figure is a median over the measured steps, so they need not add up exactly; each row is
the best of `repeats` runs (lowest host median). Times are the main thread's CPU time
(`time.thread_time`) with torch on one thread, so a busy machine changes them little; the
load average is reported with them.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pagedbatch.bench.phase_timer import READS, PhaseTimer
from pagedbatch.engine import engine as engine_module
from pagedbatch.engine import step_sampler
from pagedbatch.engine.engine import Engine
from pagedbatch.engine.stats import EngineStats
from pagedbatch.llm import LLM
from pagedbatch.sampling_params import SamplingParams

MODEL = "tiny-random"
UNIQUE_BLOCKS = 2  # a record's own text after the shared instruction: 2 to 3 blocks
WORKLOADS = ("shared", "sampled", "logprobs", "random", "choices")
CHOICES = ("positive", "negative", "mixed")
HOST_PHASES = (
    "schedule", "prepare", "cascade_plan", "sampling_params", "outputs", "commit", "radix",
    "postprocess", "other",
)  # fmt: skip
# The rows of `host_overhead_report`: (workload, blocks per sequence).
REPORT_ROWS = (
    ("shared", 16), ("shared", 64), ("shared", 128), ("sampled", 64), ("logprobs", 64),
    ("random", 64), ("choices", 64),
)  # fmt: skip


@dataclass(frozen=True)
class HostOverhead:
    workload: str
    running_seqs: int
    blocks_per_seq: int
    block_size: int
    steps: int  # steps measured
    host_ms_per_step: float  # median of (iteration - device windows - timer reads)
    timer_ms: float  # median cost of the bench's own clock reads, taken out of the above
    phases_ms: dict[str, float]  # median per host phase (HOST_PHASES)
    iteration_ms: float  # median CPU time of one loop iteration of LLM.generate
    forward_ms: float  # median model forward
    sample_ms: float  # median sampling ops
    device: str
    repeats: int  # the best of this many runs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def host_overhead_report(
    running_seqs: int = 256, steps: int = 24, repeats: int = 3, device: str = "cpu"
) -> dict[str, Any]:
    """Every row of REPORT_ROWS, with the load average before and after (JSON-ready)."""
    load_before = os.getloadavg()
    rows = [
        measure_host_overhead(
            workload, running_seqs, blocks, steps, repeats=repeats, device=device
        ).to_json()
        for workload, blocks in REPORT_ROWS
    ]
    return {
        "running_seqs": running_seqs,
        "device": rows[0]["device"],
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "rows": rows,
    }


def measure_host_overhead(
    workload: str = "shared",
    running_seqs: int = 256,
    blocks_per_seq: int = 64,
    steps: int = 24,
    *,
    repeats: int = 3,
    block_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> HostOverhead:
    """The best of `repeats` runs of `workload` (see the module's doc)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    runs = [
        _measure(workload, running_seqs, blocks_per_seq, steps, block_size, device, seed)
        for _ in range(repeats)
    ]
    best = min(runs, key=lambda r: r.host_ms_per_step)
    return HostOverhead(**{**asdict(best), "repeats": repeats})


def _measure(
    workload: str, running_seqs: int, blocks_per_seq: int, steps: int, block_size: int,
    device: str, seed: int,
) -> HostOverhead:  # fmt: skip
    prompt_len = (blocks_per_seq - 1) * block_size + 1
    budget = max(8192, running_seqs)
    # The first sequences admitted must still be decoding when the last one's prefill ends.
    prefill_steps = -(-running_seqs * prompt_len // budget) + 1
    max_tokens = prefill_steps + steps + 2
    llm = LLM(
        MODEL, device=device, block_size=block_size,
        num_blocks=running_seqs * (blocks_per_seq + 2 + max_tokens // block_size),
        max_num_seqs=running_seqs, max_batch_tokens=budget,
    )  # fmt: skip
    engine, timer = llm.engine, PhaseTimer(time.thread_time)
    engine.clock = timer.clock
    prompts = _prompts(workload, running_seqs, prompt_len, block_size, seed)
    samples: list[tuple[float, dict[str, float]]] = []
    last = [timer.clock()]

    def on_step(stats: EngineStats) -> None:
        now, phases = timer.clock(), timer.take()
        trace = engine.last_step
        every_step = workload == "choices"
        if (
            trace is not None
            and (every_step or trace.decode_only)
            and (every_step or trace.num_seqs == running_seqs)
        ):
            samples.append((now - last[0], phases))
        last[0] = now

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _instrumented(timer, engine):
            llm.generate(prompts, _params(workload, max_tokens), on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    measured = samples[1 : steps + 1]  # the first follows the last prefill step
    if not measured:
        raise RuntimeError("no decode step ran with every sequence running")
    return _summary(workload, running_seqs, blocks_per_seq, block_size, measured, timer, llm)


def _summary(
    workload: str, running_seqs: int, blocks_per_seq: int, block_size: int,
    measured: list[tuple[float, dict[str, float]]], timer: PhaseTimer, llm: LLM,
) -> HostOverhead:  # fmt: skip
    ms = 1000.0
    hosts, timers, phases = [], [], {name: [] for name in HOST_PHASES}
    for iteration, times in measured:
        reads = times.get(READS, 0) * timer.read_seconds
        device = sum(t for p, t in times.items() if p in timer.device_phases)
        host = iteration - device - reads
        hosts.append(host)
        timers.append(reads)
        for name in HOST_PHASES[:-1]:
            phases[name].append(times.get(name, 0.0))
        phases["other"].append(host - sum(times.get(n, 0.0) for n in HOST_PHASES[:-1]))
    return HostOverhead(
        workload=workload,
        running_seqs=running_seqs,
        blocks_per_seq=blocks_per_seq,
        block_size=block_size,
        steps=len(measured),
        host_ms_per_step=ms * statistics.median(hosts),
        timer_ms=ms * statistics.median(timers),
        phases_ms={name: ms * statistics.median(v) for name, v in phases.items()},
        iteration_ms=ms * statistics.median(i for i, _ in measured),
        forward_ms=ms * statistics.median(t.get("forward", 0.0) for _, t in measured),
        sample_ms=ms * statistics.median(t.get("sample", 0.0) for _, t in measured),
        device=str(llm.device),
        repeats=1,
    )


@contextmanager
def _instrumented(timer: PhaseTimer, engine: Engine) -> Iterator[None]:
    """Time the engine's phases (bench/phase_timer.py) while the block runs."""
    runner, scheduler = engine.runner, engine.scheduler
    with ExitStack() as stack:
        for owner, name, phase, device in (
            (runner, "forward", "forward", True),
            (engine, "_sample", "sample", True),
            (scheduler, "schedule", "schedule", False),
            (runner, "prepare", "prepare", False),
            (runner, "_cascade_plan", "cascade_plan", False),
            (engine.sampler.slots, "row_params", "sampling_params", False),
            (step_sampler, "pack", "sampling_params", False),
            (engine.sampler, "logprobs", "outputs", False),
            (engine_module, "record_scores", "outputs", False),
            (scheduler, "commit", "commit", False),
            (engine, "_postprocess", "postprocess", False),
        ):
            stack.enter_context(timer.wrapped(owner, name, phase, device))
        if engine.prefix_cache is not None:
            for name in ("insert", "match"):
                stack.enter_context(timer.wrapped(engine.prefix_cache, name, "radix"))
        yield


def _prompts(workload: str, count: int, length: int, block_size: int, seed: int) -> list[list[int]]:
    """`count` prompts of about `length` token ids (3 .. 258: the tokenizer's bytes). Prompt
    i is `i % block_size` tokens shorter, so that a step's sequences do not all fill a
    block at once (a job's records differ in length)."""

    def tokens(key: int, n: int) -> list[int]:
        draw = random.Random(seed * 1_000_003 + key)
        return [draw.randrange(3, 259) for _ in range(n)]

    if workload == "random":
        return [tokens(i + 1, length - i % block_size) for i in range(count)]
    own = min(length, (UNIQUE_BLOCKS + 1) * block_size)
    instruction = tokens(0, length - own)
    return [instruction + tokens(i + 1, own - i % block_size) for i in range(count)]


def _params(workload: str, max_tokens: int) -> SamplingParams:
    if workload == "choices":
        return SamplingParams(choices=CHOICES)
    given: dict[str, Any] = {
        "sampled": {"temperature": 0.8, "top_p": 0.95},
        "logprobs": {"logprobs": 5},
    }.get(workload, {})
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **given)
