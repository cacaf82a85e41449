"""`pagedbatch plan`: what a job will cost, from its prompts alone (no model weights run)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pagedbatch.cli.common import Int, Str, fail
from pagedbatch.cli.common import opt as common_opt

if TYPE_CHECKING:
    from pagedbatch.engine.config import EngineConfig
    from pagedbatch.job.plan import Plan, SharedPrefix
    from pagedbatch.job.settings import RunSettings


def opt(help: str, *names: str) -> Any:
    return common_opt(None, help, *names)


def plan(
    input: Annotated[
        str, typer.Argument(help="The job's input, as for `pagedbatch run`.", show_default=False)
    ],
    model: Annotated[
        Str, opt("Model whose tokenizer, context and KV shape to plan for.", "--model", "-m")
    ] = None,
    config: Annotated[Str, opt("Preset name or TOML file, as for run.")] = None,
    split: Annotated[Str, opt("Dataset split.")] = None,
    prompt_field: Annotated[Str, opt("Field holding the prompt text.")] = None,
    messages_field: Annotated[Str, opt("Field holding chat messages.")] = None,
    id_field: Annotated[Str, opt("Field holding the record id.")] = None,
    template: Annotated[Str, opt("Prompt template, as for run.")] = None,
    system: Annotated[Str, opt("System message, as for run (implies --chat).")] = None,
    chat: Annotated[
        bool | None, opt("Render plain prompts through the chat template.", "--chat/--no-chat")
    ] = None,
    max_tokens: Annotated[Int, opt("Tokens per record (a record's max_tokens wins).")] = None,
    max_model_len: Annotated[Int, opt("Cap on prompt + output tokens.")] = None,
    block_size: Annotated[Int, opt("Tokens per KV block.")] = None,
    num_blocks: Annotated[Int, opt("KV blocks (instead of --kv-memory).")] = None,
    kv_memory: Annotated[
        Str,
        opt(
            "KV cache size: 2GiB, 512MB or a fraction of the memory free once the weights are loaded."
        ),
    ] = None,
    device: Annotated[Str, opt("auto, cpu or cuda: where the KV memory would live.")] = None,
    dtype: Annotated[Str, opt("KV dtype: auto, float32, bfloat16, float16.")] = None,
    prefix_sharing: Annotated[
        bool | None,
        opt(
            "Plan with prefix sharing (default) or without.", "--prefix-sharing/--no-prefix-sharing"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Tokenize every record and build the prefix tree, without running the model: records,
    prompt tokens, tokens left to compute after sharing, predicted hit rate, the largest
    shared prefixes, records too long, KV blocks needed and sequences that fit at once."""
    given = {
        k: v
        for k, v in locals().items()
        if v is not None and k not in ("input", "config", "as_json")
    }
    from pagedbatch.job.reader import InputError
    from pagedbatch.job.settings import resolve_settings
    from pagedbatch.models.loader import ModelLoadError

    try:
        settings = resolve_settings(given, config)
        result = plan_job(input, settings)
    except (ValueError, InputError, ModelLoadError) as e:
        fail(str(e))
    console = Console()
    if as_json:
        console.print_json(json.dumps(result.to_json()))
    else:
        console.print(_tables(result, settings.engine.block_size))


def plan_job(source: str, settings: RunSettings) -> Plan:
    """Read and tokenize the job's records as `run` would, then plan them."""
    from pagedbatch.job.plan import make_plan
    from pagedbatch.job.prompts import PromptBuilder, PromptError
    from pagedbatch.job.reader import read_records
    from pagedbatch.models.loader import load_tokenizer_and_config

    engine = settings.engine
    tokenizer, model_config = load_tokenizer_and_config(engine.model, engine.cache_dir)
    builder = PromptBuilder(tokenizer, engine.chat)
    context = model_config.max_position_embeddings
    prompts = []
    for record in read_records(source, split=settings.split, fields=settings.fields):
        try:
            params = settings.sampling.with_overrides(record.overrides)
            ids = builder.token_ids(record) if record.error is None else None
        except (TypeError, ValueError, PromptError):
            ids = None
        if ids:
            prompts.append((record.id, ids, params.max_tokens))
    return make_plan(
        prompts,
        block_size=engine.block_size,
        num_blocks=kv_blocks(engine, model_config),
        max_model_len=min(engine.max_model_len or context, context),
        prefix_sharing=engine.prefix_sharing,
    )


def kv_blocks(engine: EngineConfig, model_config: Any) -> int:
    """The KV blocks `LLM(config=engine)` would allocate here now, without loading weights:
    the same `num_blocks_for`, with the weights' bytes computed from the config."""
    from pagedbatch.engine.kv_cache import KVCacheSpec, num_blocks_for
    from pagedbatch.models.weights import config_model_bytes

    dtype = engine.torch_dtype
    spec = KVCacheSpec.from_model_config(model_config, engine.block_size, dtype)
    weights = 0 if engine.num_blocks is not None else config_model_bytes(model_config, dtype)
    return num_blocks_for(
        spec, engine.torch_device, engine.num_blocks, engine.kv_memory, weight_bytes=weights
    )


def _tables(p: Plan, block_size: int) -> Table:
    table = Table(title="Plan", show_header=False, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("records that would run", f"{p.records - len(p.too_long)} of {p.records}"),
        ("prompt tokens", f"{p.prompt_tokens:,}"),
        ("tokens to compute after sharing", f"{p.tokens_to_compute:,}"),
        ("predicted prefix hit rate", f"{p.predicted_hit_rate:.1%}"),
        ("too long for the model", ", ".join(map(str, p.too_long[:10])) or "none"),
        ("KV blocks for all at once, no sharing", f"{p.blocks_needed:,}"),
        ("KV blocks for all at once, shared", f"{p.blocks_needed_shared:,}"),
        ("KV blocks configured", f"{p.num_blocks:,} of {block_size} tokens"),
        ("sequences that fit at once", f"{p.concurrent_sequences:,}"),
    ]
    rows += [
        (f"shared prefix #{i + 1}", f"{_token_range(g)} tokens x {g.records} records")
        for i, g in enumerate(p.largest_shared_prefixes)
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _token_range(group: SharedPrefix) -> str:
    """'621' or '621-645': what every record of the group shares, and the longest prefix
    some of them share."""
    if group.longest_tokens == group.tokens:
        return f"{group.tokens:,}"
    return f"{group.tokens:,}-{group.longest_tokens:,}"
