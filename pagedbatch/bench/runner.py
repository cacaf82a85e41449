"""`pagedbatch bench` as a library: every contender on the same prompts, in one process.

Contenders (names as `--skip` spells them):
- `run`: the whole `pagedbatch run` command in a child process (`process.py`); file
  inputs only;
- `pagedbatch`, `pagedbatch-no-cascade`, `pagedbatch-no-sharing`: `LLM.generate` in this
  process; as configured, without cascade attention, and without prefix sharing (so
  without cascade);
- `generate`, `generate_batch`: the transformers baselines (`baselines.py`) on the
  same model (same weights: a random preset is rebuilt from the same seed);
- `pagedbatch-choices` (with `choices`): the same records scored against the choices
  instead of generated (`LLM.generate` with `SamplingParams.choices`); its details say how
  often the best choice is the first word of `pagedbatch`'s greedy generation;
- `vllm-cpu` (on CPU, with a Python that imports vllm: `vllm_peer.py`): vLLM's offline
  engine in its own process, same token ids, dtype and cores as pagedbatch.
- `pagedbatch-constrained` (with `constraint`): `pagedbatch` with every output under the
  constraint (structured output); each record stops where its grammar ends, so it is
  compared per output token and per decode step, with the masks' own time per step.

Every contender generates exactly each prompt's output length (EOS ignored) from the
same prompt token ids, and times generation only, after a warm-up; loading is reported
apart (`load_s`). What each returned is counted per prompt: a count that differs is the
contender's `error` in the report. Each result says what the contender was `given`
(batch size, prompt order, budgets, cache). On CUDA the device's copy bandwidth is
measured first, and pagedbatch's decode-only steps are compared with the bandwidth
floor (`decode_probe.py`); on CPU a large matmul's FLOP/s in pagedbatch's dtype, against
which the forwards' matmul work per second is set (`flops.py`).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pagedbatch.bench.decode_probe import DecodeProbe, DecodeTiming, copy_bandwidth, weight_bytes
from pagedbatch.bench.flops import forward_flops, matmul_peak
from pagedbatch.bench.process import engine_given, pagedbatch_process
from pagedbatch.bench.result import CONTENDERS, BenchReport, BenchResult
from pagedbatch.bench.workloads import (
    BenchPrompts,
    Workload,
    file_records,
    record_prompts,
    workload_prompts,
)
from pagedbatch.constraint import Constraint
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.kv_cache import free_memory
from pagedbatch.engine.stats import EngineStats
from pagedbatch.llm import LLM
from pagedbatch.models.loader import load_model
from pagedbatch.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedbatch.bench.baselines import StaticBatchSize
    from pagedbatch.requests.records import Record

# The contenders of every benchmark in this process (pagedbatch-choices and
# pagedbatch-constrained run with choices, a constraint only; vllm-cpu in a process of its
# own).
IN_PROCESS = tuple(
    c for c in CONTENDERS[1:]
    if c not in ("pagedbatch-choices", "pagedbatch-constrained", "vllm-cpu")
)  # fmt: skip
# Each pagedbatch contender: the engine config's changes.
PAGEDBATCH = {
    "pagedbatch": {},
    "pagedbatch-no-cascade": {"cascade": False},
    "pagedbatch-no-sharing": {"prefix_sharing": False},
}
# (tokenizer, vocabulary size) -> the prompts; called with the first model loaded.
PromptSource = Callable[[Any, int], BenchPrompts]


@dataclass(frozen=True)
class BenchOptions:
    """How to run the contenders: the engine (model, device, budgets) and what to leave out.

    `batch_size` is the static batch of transformers `generate` (None: the engine's
    max_num_seqs, fewer if a padded batch would not fit in free memory); `seed` draws
    the synthetic prompts.
    """

    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    batch_size: int | None = None
    skip: frozenset[str] = frozenset()
    seed: int = 0
    choices: tuple[str, ...] | None = None  # also score these (the pagedbatch-choices contender)
    choice_score: str = "sum"
    vllm_python: str | None = None  # a Python that imports vllm: the vllm-cpu contender
    constraint: Constraint | None = None  # also generate under it (pagedbatch-constrained)

    def __post_init__(self) -> None:
        unknown = set(self.skip) - set(CONTENDERS)
        if unknown:
            raise ValueError(
                f"unknown contender(s) to skip: {', '.join(sorted(unknown))}; "
                f"contenders: {', '.join(CONTENDERS)}"
            )
        if not set(IN_PROCESS) - set(self.skip):
            raise ValueError(f"skip leaves none of {', '.join(IN_PROCESS)} to run")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def runs(self, contender: str) -> bool:
        return contender not in self.skip


def run_workload_benchmark(
    workload: Workload,
    options: BenchOptions,
    on_result: Callable[[BenchResult], None] = lambda r: None,
) -> BenchReport:
    """Every in-process contender on the seeded prompts of `workload`."""

    def source(tokenizer, vocab_size: int) -> BenchPrompts:
        return workload_prompts(workload, vocab_size, tokenizer.all_special_ids, options.seed)

    title = f"{workload.name} workload ({workload.num_prompts} prompts)"
    return _run(title, source, options, [], on_result)


def run_file_benchmark(
    source: str,
    max_tokens: int,
    options: BenchOptions,
    on_result: Callable[[BenchResult], None] = lambda r: None,
    num_records: int | None = None,
    records: list[Record] | None = None,
) -> BenchReport:
    """Every contender on the records of the input file `source` (the first `num_records`
    valid ones if given; `records`: those, read already by `file_records`), `max_tokens`
    each."""
    if records is None:
        records = file_records(source, num_records)

    def tokenize(tokenizer, vocab_size: int) -> BenchPrompts:
        return record_prompts(records, tokenizer, max_tokens)

    results: list[BenchResult] = []
    if options.runs("run"):
        results.append(pagedbatch_process(records, max_tokens, options.engine))
        on_result(results[-1])
    return _run(f"{source} ({len(records)} records)", tokenize, options, results, on_result)


def _run(
    title: str,
    source: PromptSource,
    options: BenchOptions,
    results: list[BenchResult],
    on_result: Callable[[BenchResult], None],
) -> BenchReport:
    engine = options.engine
    device = engine.torch_device
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    peak = matmul_peak(engine.torch_dtype, device) if device.type == "cpu" else None

    def record(result: BenchResult) -> None:
        results.append(result)
        on_result(result)

    prompts = None
    greedy: list = []  # pagedbatch's outputs, to compare the choices' labels with
    for contender, changes in PAGEDBATCH.items():
        if options.runs(contender):
            llm, load_s = load_llm(engine.replace(**changes))
            if prompts is None:
                prompts = source(llm.tokenizer, vocab_size(llm.model))
            kept = greedy if contender == "pagedbatch" else None
            record(bench_llm(llm, prompts, load_s, copy_bw, contender, kept))
            del llm
            release_memory(device)
    if options.vllm_python and options.runs("vllm-cpu") and device.type == "cpu":
        if prompts is None:
            llm, _ = load_llm(engine)
            prompts = source(llm.tokenizer, vocab_size(llm.model))
            del llm
        record(_vllm(options, prompts, greedy))
    if options.constraint is not None and options.runs("pagedbatch-constrained"):
        llm, load_s = load_llm(engine)
        if prompts is None:
            prompts = source(llm.tokenizer, vocab_size(llm.model))
        contender = "pagedbatch-constrained"
        record(bench_llm(llm, prompts, load_s, copy_bw, contender, constraint=options.constraint))
        del llm
        release_memory(device)
    if options.choices is not None and options.runs("pagedbatch-choices"):
        llm, load_s = load_llm(engine)
        if prompts is None:
            prompts = source(llm.tokenizer, vocab_size(llm.model))
        record(bench_choices(llm, prompts, options, load_s, greedy))
        del llm
        release_memory(device)
    if options.runs("generate") or options.runs("generate_batch"):
        prompts = _run_baselines(options, source, prompts, record)
    if prompts is None:  # BenchOptions refuses a skip list that leaves no such contender
        raise RuntimeError("no in-process contender ran")
    return BenchReport(
        title, engine.model, device_name(device), len(prompts), prompts.prompt_tokens,
        prompts.output_tokens, copy_bw, tuple(results), peak,
    )  # fmt: skip


def _vllm(options: BenchOptions, prompts: BenchPrompts, greedy: list) -> BenchResult:
    """The vllm-cpu contender, with how often its tokens are pagedbatch's (`greedy`)."""
    from pagedbatch.bench.vllm_peer import run_vllm
    from pagedbatch.models.loader import model_source

    engine = options.engine
    assert options.vllm_python is not None
    dtype = str(engine.torch_dtype).removeprefix("torch.")
    longest = max(len(p) + n for p, n in zip(prompts.token_ids, prompts.max_tokens))
    model_dir = model_source(engine.model, engine.cache_dir)
    result, tokens = run_vllm(
        options.vllm_python, model_dir, prompts, dtype, engine.threads or 1, longest
    )
    if greedy and result.error is None:
        ours = [list(o.completions[0].token_ids) for o in greedy]
        same = sum(a == b for a, b in zip(ours, tokens, strict=True)) / len(ours)
        result = dataclasses.replace(result, details={**result.details, "same_tokens": same})
    return result


def load_llm(config: EngineConfig) -> tuple[LLM, float]:
    """The LLM of `config`, and the seconds its loading took."""
    started = time.perf_counter()
    llm = LLM(config=config)
    return llm, time.perf_counter() - started


def bench_llm(
    llm: LLM,
    prompts: BenchPrompts,
    load_s: float = 0.0,
    copy_bw: float | None = None,
    contender: str = "pagedbatch",
    outputs: list | None = None,
    constraint: Constraint | None = None,
) -> BenchResult:
    """Time `llm.generate` on `prompts` (after a short warm-up), with its cache statistics;
    the RequestOutputs go into `outputs` when given. With a `constraint`, every output is
    under it (and ends where its grammar does)."""
    params = SamplingParams(ignore_eos=True, constraint=constraint)
    warm_up(llm, params)  # compiles the grammar
    before = llm.stats()
    probe = DecodeProbe(llm.engine)
    started = time.perf_counter()
    outs = llm.generate(prompts.records(), params, on_step=probe.on_step)
    seconds = time.perf_counter() - started
    if outputs is not None:
        outputs.extend(outs)
    tokens = {o.id: o.completion_tokens for o in outs}
    failed = [o for o in outs if o.error is not None]
    error = f"record {failed[0].id}: {failed[0].error}" if failed else None
    after = llm.stats()
    prompt_tokens = max(1, after.prompt_tokens - before.prompt_tokens)
    computed = after.computed_tokens - before.computed_tokens
    generated = after.generated_tokens - before.generated_tokens
    details = {
        "load_s": load_s,
        "achieved_flops": forward_flops(llm.model, computed, generated) / seconds,
        "prefix_hit_rate": (after.prefix_hit_tokens - before.prefix_hit_tokens) / prompt_tokens,
        "peak_blocks": after.peak_blocks_in_use,
        "num_blocks": after.num_blocks,
        "sharing_saving": after.sharing_saving,
        "preemptions": after.preemptions - before.preemptions,
        "cascade_saved_token_reads": (
            after.cascade_saved_token_reads - before.cascade_saved_token_reads
        ),
        **_decode_details(probe.timing(), llm, copy_bw),
    }
    produced = [tokens.get(i, 0) for i in range(len(prompts))]
    given = engine_given(llm.config, after.num_blocks)
    if constraint is not None:  # outputs end where the grammar does: fewer tokens
        details.update(_mask_details(before, after, outs))
        given["constraint"] = constraint.kind
        name = f"pagedbatch --{constraint.kind.replace('_', '-')}"
        return BenchResult(contender, name, seconds, len(produced), sum(produced), details,
                           given, error)  # fmt: skip
    result = BenchResult.counted(
        contender, contender, seconds, prompts.max_tokens, produced, given, error
    )
    return dataclasses.replace(result, details=details)


def _mask_details(before: EngineStats, after: EngineStats, outs: list) -> dict[str, Any]:
    """The token masks' host time per step that masked, and the outputs that completed."""
    steps = after.masked_steps - before.masked_steps
    seconds = after.mask_seconds - before.mask_seconds
    return {
        "masked_steps": steps,
        "mask_ms": 1e3 * seconds / steps if steps else 0.0,
        "complete": sum(bool(c.complete) for o in outs for c in o.completions),
    }


def warm_up(llm: LLM, params: SamplingParams | None = None) -> None:
    """Two short generations of token prompts that no job shares a prefix with (with
    `params`, 4 tokens each)."""
    prompts = [[1 + 7 * i % (vocab_size(llm.model) - 1) for i in range(n)] for n in (20, 40)]
    params = params or SamplingParams(ignore_eos=True)
    llm.generate(prompts, dataclasses.replace(params, max_tokens=4))


def bench_choices(
    llm: LLM, prompts: BenchPrompts, options: BenchOptions, load_s: float, greedy: list
) -> BenchResult:
    """Time scoring `options.choices` on `prompts` (after a warm-up); with `greedy` (the
    `pagedbatch` contender's outputs), how often the best choice is the first word of the
    greedy generation (`label_agreement`)."""
    params = SamplingParams(choices=options.choices, choice_score=options.choice_score)
    llm.generate([[1 + 7 * i % (vocab_size(llm.model) - 1) for i in range(20)]], params)
    before = llm.stats()
    started = time.perf_counter()
    outs = llm.generate(prompts.records(), params)
    seconds = time.perf_counter() - started
    after = llm.stats()
    failed = [o for o in outs if o.error is not None]
    prompt_tokens = max(1, after.prompt_tokens - before.prompt_tokens)
    details: dict[str, Any] = {
        "load_s": load_s,
        "prefix_hit_rate": (after.prefix_hit_tokens - before.prefix_hit_tokens) / prompt_tokens,
    }
    if greedy:
        same = [label_matches(o.label, g.text) for o, g in zip(outs, greedy, strict=True)]
        details["label_agreement"] = sum(same) / len(same)
    given = {**engine_given(llm.config, after.num_blocks), "choices": len(options.choices or ())}
    error = f"record {failed[0].id}: {failed[0].error}" if failed else None
    return BenchResult(
        "pagedbatch-choices", f"pagedbatch --choices ({options.choice_score})", seconds,
        len(outs), 0, details, given, error,
    )  # fmt: skip


def label_matches(label: str | None, text: str) -> bool:
    """Whether `label` is the first word of a generated `text` (case and punctuation aside)."""
    words = text.split()
    first = words[0].strip(".,:;!?\"'()[]*").lower() if words else ""
    return label is not None and first == label.strip().lower()


def _decode_details(timing: DecodeTiming, llm: LLM, copy_bw: float | None) -> dict[str, Any]:
    spec = llm.kv_cache.spec
    kv_bytes = timing.kv_bytes(spec.bytes_per_token, spec.num_layers)
    details: dict[str, Any] = {
        "decode_steps": timing.steps,
        "decode_ms": timing.ms_per_step,
        "decode_batch": timing.mean_batch,
        "decode_kv_bytes": kv_bytes // timing.steps if timing.steps else 0,
    }
    if copy_bw is not None and timing.steps:
        floor = timing.floor_seconds(weight_bytes(llm.model), kv_bytes, copy_bw)
        details["floor_fraction"] = floor / timing.seconds
    return details


def _run_baselines(
    options: BenchOptions,
    source: PromptSource,
    prompts: BenchPrompts | None,
    record: Callable[[BenchResult], None],
) -> BenchPrompts:
    from pagedbatch.bench.baselines import hf_generate, hf_generate_batch

    engine = options.engine
    device = engine.torch_device
    started = time.perf_counter()
    model, tokenizer = load_model(
        engine.model, device=device, dtype=engine.torch_dtype, attn_implementation="sdpa",
        cache_dir=None if engine.cache_dir is None else Path(engine.cache_dir),
        quantize=engine.quantize,
    )  # fmt: skip
    load_s = time.perf_counter() - started
    if prompts is None:
        prompts = source(tokenizer, vocab_size(model))
    if options.runs("generate"):
        size, reason = _static_batch_size(options, model, prompts)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result = hf_generate(model, prompts, size, pad_id)
        given = {**result.given, "batch_size_from": reason}
        record(dataclasses.replace(result, details={"load_s": load_s}, given=given))
    if options.runs("generate_batch"):
        result = hf_generate_batch(model, prompts, engine.max_batch_tokens)
        record(dataclasses.replace(result, details={"load_s": load_s}))
    del model
    release_memory(device)
    return prompts


def _static_batch_size(options: BenchOptions, model, prompts: BenchPrompts) -> StaticBatchSize:
    """--batch-size, else pagedbatch's max_num_seqs as far as free memory allows."""
    from pagedbatch.bench.baselines import StaticBatchSize, static_batch_size

    if options.batch_size is not None:
        return StaticBatchSize(options.batch_size, "--batch-size")
    config, device = model.config.get_text_config(), options.engine.torch_device
    want = options.engine.max_num_seqs
    return static_batch_size(config, model.dtype, prompts, want, free_memory(device))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def vocab_size(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def release_memory(device: torch.device) -> None:
    """Give back what a dropped model and KV cache held, before the next contender loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
