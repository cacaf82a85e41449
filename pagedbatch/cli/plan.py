"""`pagedbatch plan`: what a job will cost: its prompts' sharing and KV blocks (no weights
needed), and its time from the last run's rates or a short probe of the model."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from pagedbatch.cli import options as shared
from pagedbatch.cli.common import fail, first_line, quiet_libraries

if TYPE_CHECKING:
    from pagedbatch.engine.config import EngineConfig
    from pagedbatch.job.settings import RunSettings
    from pagedbatch.plan.estimate import Estimate
    from pagedbatch.plan.plan import Plan, PlanPrompts, SharedPrefix


def plan(
    input: shared.Input,
    model: shared.Model = None,
    config: shared.Config = None,
    split: shared.Split = None,
    prompt_field: shared.PromptField = None,
    messages_field: shared.MessagesField = None,
    id_field: shared.IdField = None,
    template: shared.Template = None,
    system: shared.System = None,
    chat: shared.Chat = None,
    max_tokens: shared.MaxTokens = None,
    n: shared.N = None,
    choices: shared.Choices = None,
    json_schema: shared.JsonSchema = None,
    regex: shared.Regex = None,
    grammar: shared.Grammar = None,
    max_model_len: shared.MaxModelLen = None,
    block_size: shared.BlockSize = None,
    num_blocks: shared.NumBlocks = None,
    kv_memory: shared.KvMemory = None,
    max_batch_tokens: shared.MaxBatchTokens = None,
    max_num_seqs: shared.MaxNumSeqs = None,
    device: shared.Device = None,
    dtype: shared.Dtype = None,
    quantize: shared.Quantize = None,
    kv_dtype: shared.KvDtype = None,
    prefix_sharing: shared.PrefixSharing = None,
    cache_dir: shared.CacheDir = None,
    threads: shared.Threads = None,
    tensor_parallel: shared.TensorParallel = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate/--no-estimate",
            help="Estimate the job's time from the rates the last run of this model, device, "
            "dtype and thread count stored, or else from a short probe: it loads the model "
            "and runs a few real steps (seconds on CPU for a small model).",
        ),
    ] = True,
    probe: Annotated[
        bool,
        typer.Option("--probe", help="Measure with the probe even when a last run's rates exist."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Tokenize every record and build the prefix tree: records (those that would run, and
    the invalid ones by error code), prompt tokens, tokens left to compute after sharing,
    predicted hit rate, the largest shared prefixes, records too long, KV blocks needed and
    sequences that fit at once; then estimate the time, from every output of one token to
    every record generating its max_tokens, unless --no-estimate."""
    given = {
        k: v
        for k, v in locals().items()
        if v is not None and k not in ("input", "config", "as_json", "estimate", "probe")
    }
    from pagedbatch.inputs.reader import InputError
    from pagedbatch.job.settings import resolve_settings
    from pagedbatch.models.names import ModelLoadError

    console = Console(stderr=as_json)
    try:
        settings = resolve_settings(given, config)
        with console.status(f"reading {input} ...") as status:
            shown = _PlanStatus(status, input)
            result, prompts = plan_job(input, settings, shown.read, shown.tokenized)
    except (ValueError, InputError, ModelLoadError) as e:
        fail(str(e))
    problem = None
    if estimate:
        quiet_libraries()
        with console.status("Estimating the time (a probe loads the model) ..."):
            result, problem = estimate_job(result, prompts, settings, probe=probe)
    if as_json:
        data = result.to_json()
        if problem:
            data["estimate_problem"] = problem
        Console().print_json(json.dumps(data))
    else:
        console.print(_tables(result, settings.engine.block_size, estimate, problem))


def plan_job(
    source: str,
    settings: RunSettings,
    on_read: Callable[[int], None] | None = None,
    on_tokenized: Callable[[int, int], None] | None = None,
) -> tuple[Plan, PlanPrompts]:
    """Read and tokenize the job's records as `run` would (`on_read(records read)`, then
    `on_tokenized(done, total)`), then plan them; also returns the prompts planned."""
    from pagedbatch.inputs.reader import read_index
    from pagedbatch.models.names import resolve_model_name

    engine = settings.engine
    index = read_index(source, split=settings.split, fields=settings.fields, on_read=on_read)
    try:
        resolve_model_name(engine.model)  # the input first, then the model, before torch

        from pagedbatch.engine.job_pool import PoolFit
        from pagedbatch.models.loader import load_tokenizer_and_config
        from pagedbatch.plan.plan import make_plan
        from pagedbatch.plan.plan_prompts import read_plan_prompts
        from pagedbatch.requests.prompts import PromptBuilder

        tokenizer, model_config = load_tokenizer_and_config(engine.model, engine.cache_dir)
        builder = PromptBuilder(tokenizer, engine.chat, engine.chat_template_kwargs)
        context = max_model_len(engine, model_config)
        limits = (model_config.vocab_size, context)
        prompts = read_plan_prompts(index, builder, settings.sampling, limits, on_tokenized)
    finally:
        index.rows.close()
    sizing = pool_sizing(engine, model_config)
    # `run` sizes a CPU default pool from the job when it generates in one call
    # (completion order), as `LLM.generate(fit_pool=True)`.
    fit = None
    if engine.pool_from_job and settings.order == "completion":
        fit = PoolFit(engine.max_batch_tokens, engine.max_num_seqs)
    plan = make_plan(
        prompts,
        block_size=engine.block_size,
        num_blocks=sizing.num_blocks,
        max_model_len=context,
        prefix_sharing=engine.prefix_sharing,
        fit_pool=fit,
    )
    plan = dataclasses.replace(
        plan, weight_bytes=sizing.weight_bytes, weights=sizing.weights,
        kv_dtype=sizing.kv_dtype, kv_bytes_per_token=sizing.kv_bytes_per_token,
    )  # fmt: skip
    return with_ranks(plan, engine, model_config), prompts


class _PlanStatus:
    """The spinner's text while `plan` reads and tokenizes the input."""

    def __init__(self, status: Status, source: str) -> None:
        self.status, self.source, self.started = status, source, time.monotonic()

    def read(self, records: int) -> None:
        elapsed = time.monotonic() - self.started
        rate = f", {records / elapsed:,.0f}/s" if elapsed > 0 else ""
        self.status.update(escape(f"reading {self.source}: {records:,} records{rate} ..."))

    def tokenized(self, done: int, total: int) -> None:
        self.status.update(f"tokenizing {done:,}/{total:,} records ...")


def max_model_len(engine: EngineConfig, model_config: Any) -> int:
    context = model_config.max_position_embeddings
    return min(engine.max_model_len or context, context)


def estimate_job(
    plan: Plan, prompts: PlanPrompts, settings: RunSettings, *, probe: bool = False
) -> tuple[Plan, str | None]:
    """`plan` with its time estimate, from the last run's stored rates (unless `probe`)
    or else a probe of the model; or `plan` as it was and why there is no estimate."""
    from pagedbatch.models.loader import ModelLoadError
    from pagedbatch.plan.estimate import estimate_time
    from pagedbatch.plan.rates import last_run_rates

    engine = settings.engine
    running = min(engine.max_num_seqs, plan.concurrent_sequences, prompts.samples)
    if not len(prompts.store):
        return plan, "no record would run"
    rates, load, took = None if probe else last_run_rates(engine), None, None
    if rates is None:
        from pagedbatch.bench.rate_probe import probe_rates

        try:
            first = prompts.first(max(running, 1))  # all that the probe may take
            result = probe_rates(engine, first, running, plan.max_model_len)
        except (ValueError, RuntimeError, ModelLoadError) as e:  # OutOfMemoryError: Runtime
            return plan, f"the probe failed: {first_line(e)}"
        rates, load, took = result.rates, result.load_seconds, result.seconds
    estimate = estimate_time(
        plan.tokens_to_compute, plan.output_tokens, rates, running_seqs=running,
        load_seconds=load, samples=prompts.generating_samples,
    )  # fmt: skip
    estimate = dataclasses.replace(estimate, probe_seconds=took)
    return dataclasses.replace(plan, estimate=estimate), None


class PoolSizing(NamedTuple):
    """The KV pool `LLM(config=engine)` would allocate here now, and what sizes it."""

    num_blocks: int
    weight_bytes: int  # as loaded: quantized weights as stored
    weights: str  # how they are quantized, or "full precision"
    kv_bytes_per_token: int
    kv_dtype: str


def pool_sizing(engine: EngineConfig, model_config: Any) -> PoolSizing:
    """The KV pool `LLM(config=engine)` would allocate here now, without loading weights:
    the same `num_blocks_for`, with the weights' bytes (quantized as loading quantizes
    them) computed from the config. ModelLoadError when the quantization cannot run here,
    ValueError when the KV dtype cannot."""
    from pagedbatch.engine.attention import kv_dtype_problem
    from pagedbatch.engine.kv_cache import KVCacheSpec, num_blocks_for
    from pagedbatch.engine.tp_shards import config_rank_weight_bytes, pool_blocks
    from pagedbatch.models.quantization import weight_quantization
    from pagedbatch.models.weights import config_model_bytes

    dtype, device = engine.torch_dtype, engine.torch_device
    problem = kv_dtype_problem(engine.attention_backend, engine.torch_kv_dtype, dtype, device)
    if problem is not None:
        raise ValueError(problem)
    quantization = weight_quantization(model_config, engine.model, engine.quantize, device, dtype)
    spec = KVCacheSpec.from_model_config(model_config, engine.block_size, engine.torch_kv_dtype)
    weights = config_model_bytes(model_config, dtype, quantization)
    if engine.tensor_parallel > 1:  # per rank: its shard of the weights, its KV heads
        rank_weights = config_rank_weight_bytes(model_config, dtype, engine.tensor_parallel)
        blocks = pool_blocks(spec, engine, device, rank_weights)[1]
    else:
        blocks = num_blocks_for(
            spec, device, engine.num_blocks, engine.kv_memory, weight_bytes=weights
        )
    what = quantization.description if quantization is not None else "full precision"
    kv_dtype = str(spec.dtype).removeprefix("torch.")
    return PoolSizing(blocks, weights, what, spec.bytes_per_token, kv_dtype)


def kv_blocks(engine: EngineConfig, model_config: Any) -> int:
    """The KV blocks `LLM(config=engine)` would allocate here now (`pool_sizing`)."""
    return pool_sizing(engine, model_config).num_blocks


def with_ranks(plan: Plan, engine: EngineConfig, model_config: Any) -> Plan:
    """`plan` with what the fullest rank holds under tensor parallelism (weights, KV)."""
    import dataclasses

    from pagedbatch.engine.kv_cache import KVCacheSpec
    from pagedbatch.engine.tp_shards import config_rank_weight_bytes, shard_spec, support_problem

    n, dtype = engine.tensor_parallel, engine.torch_dtype
    if n == 1:
        return plan
    if (problem := support_problem(model_config, n)) is not None:
        raise ValueError(problem)
    spec = shard_spec(KVCacheSpec.from_model_config(model_config, engine.block_size, dtype), n)
    return dataclasses.replace(
        plan, tensor_parallel=n, rank_weight_bytes=config_rank_weight_bytes(model_config, dtype, n),
        rank_kv_bytes=plan.num_blocks * spec.bytes_per_block,
    )  # fmt: skip


def _tables(p: Plan, block_size: int, asked: bool, problem: str | None) -> Table:
    table = Table(title="Plan", show_header=False, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("records that would run", f"{p.would_run:,} of {p.records:,}"),
        ("invalid (error lines)", _counts(p.invalid) or "none"),
        ("too long for the model", ", ".join(map(str, p.too_long[:10])) or "none"),
    ]
    if not p.would_run:
        rows.append(("time estimate", "none: no record would run"))
        for name, value in rows:
            table.add_row(name, value)
        return table
    rows += [
        ("prompt tokens", f"{p.prompt_tokens:,}"),
        ("tokens to compute after sharing", f"{p.tokens_to_compute:,}"),
        ("predicted prefix hit rate", f"{p.predicted_hit_rate:.1%}"),
        ("KV blocks for all at once, no sharing", f"{p.blocks_needed:,}"),
        ("KV blocks for all at once, shared", f"{p.blocks_needed_shared:,}"),
        ("weights", f"{p.weight_bytes / 2**20:,.1f} MiB, {p.weights}"),
        (
            "KV blocks configured",
            f"{p.num_blocks:,} of {block_size} tokens, {p.kv_dtype}"
            + (", sized from the job" if p.pool_from_job else ""),
        ),
        (
            "KV pool",
            f"{p.num_blocks * block_size * p.kv_bytes_per_token / 2**20:,.1f} MiB "
            f"({p.kv_bytes_per_token:,} bytes a token)",
        ),
        ("sequences that fit at once", f"{p.concurrent_sequences:,}"),
    ]
    if p.rank_weight_bytes is not None and p.rank_kv_bytes is not None:
        rows.append((f"per rank ({p.tensor_parallel} tensor-parallel)",
                     f"weights {_size(p.rank_weight_bytes)}, KV pool {_size(p.rank_kv_bytes)}"))  # fmt: skip
    rows += [
        (f"shared prefix #{i + 1}", f"{_token_range(g)} tokens x {g.records} records")
        for i, g in enumerate(p.largest_shared_prefixes)
    ]
    if p.constrained_records or p.constraint_problems:
        rows.append(("constrained outputs", f"{p.constrained_records:,} records"))
    rows += [
        ("constraint cannot be used", f"{rid}: {why}") for rid, why in p.constraint_problems[:5]
    ]
    if len(p.constraint_problems) > 5:
        rows.append(("", f"and {len(p.constraint_problems) - 5} more records"))
    if p.estimate is not None:
        rows += _estimate_rows(p.estimate)
    else:
        rows.append(
            ("time estimate", problem or ("not asked (--no-estimate)" if not asked else ""))
        )
    for name, value in rows:
        table.add_row(name, value)
    return table


def _counts(codes: dict[str, int]) -> str:
    """'2 invalid_params, 2 invalid_record'."""
    return ", ".join(f"{n:,} {code}" for code, n in codes.items())


def _estimate_rows(e: Estimate) -> list[tuple[str, str]]:
    r = e.rates
    if r.source == "probe":
        source = (
            f"probe just now ({duration(e.probe_seconds or 0)}, loading the model "
            f"{duration(e.load_seconds or 0)})"
        )
    else:
        source = f"last run, {r.measured_at} (same model, device, dtype, threads)"
    prefill = ("  prefill", f"{e.prefill_tokens:,} tokens at {r.prefill_tok_s:,.0f} tok/s: "
               f"{duration(e.prefill_seconds)}")  # fmt: skip
    if not e.output_tokens:  # choices are scored: nothing is decoded
        return [
            ("time estimate", f"~ {duration(e.seconds)} (scoring, no outputs; model load not included)"),
            prefill,
            ("  rates from", source),
        ]  # fmt: skip
    at = f"{r.decode_seqs:,.0f} seqs per step"
    if round(r.decode_seqs) != e.running_seqs:
        at += f"; this job runs up to {e.running_seqs:,}"
    span = f"{duration(e.low_seconds)} to {duration(e.seconds)}"
    return [
        ("time estimate", f"{span} (outputs of 1 token to all at max_tokens; model load not included)"),
        prefill,
        ("  decode", f"up to {e.output_tokens:,} tokens at {r.decode_tok_s:,.0f} tok/s ({at}): {duration(e.decode_seconds)}"),
        ("  rates from", source),
    ]  # fmt: skip


def _size(nbytes: int) -> str:
    """'512 KiB', '38.2 MiB', '1.50 GiB'."""
    if nbytes < 2**20:
        return f"{nbytes / 2**10:,.0f} KiB"
    if nbytes < 2**30:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**30:,.2f} GiB"


def duration(seconds: float) -> str:
    """'0.4 s', '12 s', '3 min 05 s', '2 h 07 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _token_range(group: SharedPrefix) -> str:
    """'621' or '621-645': what every record of the group shares, and the longest prefix
    some of them share."""
    if group.longest_tokens == group.tokens:
        return f"{group.tokens:,}"
    return f"{group.tokens:,}-{group.longest_tokens:,}"
