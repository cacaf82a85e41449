"""Where an engine step's time goes: `pagedbatch bench FILE --profile`.

Runs a job's records through `LLM.generate` under torch.profiler, once per dtype, and
splits each step's wall time into:

  matmul      the linear layers and the LM head (aten::linear, matmul, mm, addmm, bmm at
              the top of the forward)
  attention   every layer's paged attention, store and attend (`profiling.ATTENTION`)
  other ops   every other operator of the forward: norms, rotary, activation, embedding,
              residual adds
  forward py  the forward's wall time no operator accounts for: Python between operators
  sampling    the engine's sampling and scoring (its own clock)
  host        schedule, prepare, postprocess: the step less forward and sampling

Steps are prefill-heavy when they compute more than `PREFILL_TOKENS_PER_SEQ` new tokens per
sequence on average, else decode-heavy. The profiler adds a few microseconds to every
operator, so "forward py" and the small-operator shares read high by about that much.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from pagedbatch.bench.runner import warm_up
from pagedbatch.bench.workloads import record_prompts
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.profiling import ATTENTION, FORWARD
from pagedbatch.engine.stats import StepTrace
from pagedbatch.llm import LLM
from pagedbatch.requests.records import Record
from pagedbatch.sampling_params import SamplingParams

MATMUL_OPS = frozenset({"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"})
PREFILL_TOKENS_PER_SEQ = 2
PARTS = ("matmul", "attention", "other_ops", "forward_py", "sampling", "host")


@dataclass(frozen=True)
class StepProfile:
    """Mean figures of one kind of step at one dtype; the parts are ms per step."""

    dtype: str
    kind: str  # "prefill-heavy" or "decode-heavy"
    steps: int
    tokens: float  # new tokens per step
    seqs: float  # sequences per step
    ms: float  # wall time per step, profiled
    matmul: float
    attention: float
    other_ops: float
    forward_py: float
    sampling: float
    host: float
    matmul_gflops: float  # the matmuls' floating-point work / their time

    def share(self, part: str) -> float:
        return getattr(self, part) / self.ms if self.ms else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def profile_steps(
    records: list[Record], config: EngineConfig, max_tokens: int, dtypes: Iterable[str]
) -> list[StepProfile]:
    """Profile the job of `records` (`max_tokens` each, EOS ignored) at each dtype."""
    configs = [config.replace(dtype=dtype) for dtype in dtypes]
    return [row for c in configs for row in _profile(records, c, max_tokens)]


def _profile(records: list[Record], config: EngineConfig, max_tokens: int) -> list[StepProfile]:
    llm = LLM(config=config)
    warm_up(llm)
    prompts = record_prompts(records, llm.tokenizer, max_tokens).records()
    traces: list[StepTrace] = []
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        llm.generate(
            prompts, SamplingParams(ignore_eos=True),
            on_step=lambda _: traces.append(llm.engine.last_step),
        )  # fmt: skip
    forwards = sorted(
        (e for e in prof.events() if e.name == FORWARD), key=lambda e: e.time_range.start
    )
    if len(forwards) != len(traces):
        raise RuntimeError(f"profiled {len(forwards)} forwards for {len(traces)} steps")
    dtype = str(llm.config.torch_dtype).removeprefix("torch.")
    groups: dict[str, list[tuple[StepTrace, dict[str, float], float]]] = defaultdict(list)
    for trace, forward in zip(traces, forwards, strict=True):
        kind = "prefill-heavy" if _prefill_heavy(trace) else "decode-heavy"
        groups[kind].append((trace, *_split(trace, forward)))
    return [_summary(dtype, kind, groups[kind]) for kind in ("prefill-heavy", "decode-heavy")
            if groups[kind]]  # fmt: skip


def _prefill_heavy(trace: StepTrace) -> bool:
    return trace.num_tokens > PREFILL_TOKENS_PER_SEQ * trace.num_seqs


def _split(trace: StepTrace, forward: FunctionEvent) -> tuple[dict[str, float], float]:
    """The step's parts in ms, and its matmuls' floating-point operations."""
    parts = dict.fromkeys(PARTS, 0.0)
    flops = 0.0
    for op in forward.cpu_children:
        ms = op.cpu_time_total / 1e3
        if op.name == ATTENTION:
            parts["attention"] += ms
        elif op.name in MATMUL_OPS:
            parts["matmul"] += ms
            flops += _flops(op)
        else:
            parts["other_ops"] += ms
    forward_ms = forward.cpu_time_total / 1e3
    parts["forward_py"] = max(0.0, forward_ms - sum(parts.values()))
    parts["sampling"] = trace.sample_seconds * 1e3
    parts["host"] = max(0.0, trace.seconds * 1e3 - forward_ms - parts["sampling"])
    return parts, flops


def _flops(op: FunctionEvent) -> float:
    return op.flops + sum(_flops(child) for child in op.cpu_children)


def _summary(
    dtype: str, kind: str, steps: list[tuple[StepTrace, dict[str, float], float]]
) -> StepProfile:
    n = len(steps)
    means = {p: sum(parts[p] for _, parts, _ in steps) / n for p in PARTS}
    matmul_s = sum(parts["matmul"] for _, parts, _ in steps) / 1e3
    flops = sum(f for _, _, f in steps)
    return StepProfile(
        dtype, kind, n,
        tokens=sum(t.num_tokens for t, _, _ in steps) / n,
        seqs=sum(t.num_seqs for t, _, _ in steps) / n,
        ms=sum(t.seconds for t, _, _ in steps) * 1e3 / n,
        matmul_gflops=flops / matmul_s / 1e9 if matmul_s else 0.0,
        **means,
    )  # fmt: skip
