"""The `pagedbatch` command: Typer options in, Rich progress and JSONL out."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pagedbatch.settings import RunSettings, resolve_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Offline batch generation for LLMs on a paged KV cache.",
)
console = Console(stderr=True, highlight=False)
D = RunSettings()  # defaults, shown in --help

INPUT, OUTPUT, MODEL, MEMORY, SAMPLING = "Input", "Output", "Model", "KV cache and batching", "Sampling"


@app.callback()
def main() -> None:
    """Offline batch generation for LLMs on a paged KV cache."""


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="JSONL file, local data file (json, csv, parquet), dataset saved with save_to_disk, or a Hugging Face dataset name.", show_default=False)],  # noqa: E501
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output JSONL path. [default: <input name>.output.jsonl]", rich_help_panel=OUTPUT, show_default=False)] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option(help="Preset name from configs/ (e.g. cpu, gpu, tiny) or a TOML file; flags given here win.", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    split: Annotated[str | None, typer.Option(help="Dataset split. [default: train, or the only one]", rich_help_panel=INPUT, show_default=False)] = None,  # noqa: E501
    prompt_field: Annotated[str | None, typer.Option(help=f"Field holding the prompt text. [default: {D.prompt_field}]", rich_help_panel=INPUT, show_default=False)] = None,  # noqa: E501
    messages_field: Annotated[str | None, typer.Option(help=f"Field holding chat messages. [default: {D.messages_field}]", rich_help_panel=INPUT, show_default=False)] = None,  # noqa: E501
    id_field: Annotated[str | None, typer.Option(help=f"Field holding the record id (missing: line number, or row index). [default: {D.id_field}]", rich_help_panel=INPUT, show_default=False)] = None,  # noqa: E501
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Render plain prompts through the model's chat template too. [default: no-chat]", rich_help_panel=INPUT, show_default=False)] = None,  # noqa: E501
    model: Annotated[str | None, typer.Option("--model", "-m", help=f"Local model directory, .gguf file, hub id, or the alias smollm2-135m (embedded). [default: {D.model}]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    device: Annotated[str | None, typer.Option(help=f"auto, cpu or cuda. [default: {D.device}]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    dtype: Annotated[str | None, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16. [default: auto]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    attention: Annotated[str | None, typer.Option(help="Attention implementation: auto or torch (triton is not available yet). [default: auto]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    max_model_len: Annotated[int | None, typer.Option(help="Cap on prompt + output tokens. [default: the model's context]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    cache_dir: Annotated[str | None, typer.Option(help="Where converted models are cached. [default: $PAGEDBATCH_CACHE or ~/.cache/pagedbatch]", rich_help_panel=MODEL, show_default=False)] = None,  # noqa: E501
    block_size: Annotated[int | None, typer.Option(help=f"Tokens per KV block (power of two). [default: {D.block_size}]", rich_help_panel=MEMORY, show_default=False)] = None,  # noqa: E501
    num_blocks: Annotated[int | None, typer.Option(help="Number of KV blocks (instead of --kv-memory).", rich_help_panel=MEMORY, show_default=False)] = None,  # noqa: E501
    kv_memory: Annotated[str | None, typer.Option(help="KV cache size: bytes like 2GiB or 512MB, or a fraction of free memory like 0.5. [default: 0.8 on CUDA; 0.25 of available RAM up to 4GiB on CPU]", rich_help_panel=MEMORY, show_default=False)] = None,  # noqa: E501
    max_batch_tokens: Annotated[int | None, typer.Option(help=f"Token budget of one step; longer prompts are prefilled in chunks. [default: {D.max_batch_tokens}]", rich_help_panel=MEMORY, show_default=False)] = None,  # noqa: E501
    max_num_seqs: Annotated[int | None, typer.Option(help=f"Most sequences running at once. [default: {D.max_num_seqs}]", rich_help_panel=MEMORY, show_default=False)] = None,  # noqa: E501
    max_tokens: Annotated[int | None, typer.Option(help=f"Most tokens generated per record (a record's max_tokens wins). [default: {D.max_tokens}]", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    temperature: Annotated[float | None, typer.Option(help=f"0 is greedy. [default: {D.temperature}]", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    top_p: Annotated[float | None, typer.Option(help=f"Nucleus sampling mass, in (0, 1]. [default: {D.top_p}]", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    top_k: Annotated[int | None, typer.Option(help=f"Sample among the k most likely tokens; 0 is off. [default: {D.top_k}]", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    seed: Annotated[int | None, typer.Option(help="Seed of every record without its own seed. [default: random]", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); the text ends before it.", rich_help_panel=SAMPLING, show_default=False)] = None,  # noqa: E501
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the live progress display.", rich_help_panel=OUTPUT)] = True,  # noqa: E501
) -> None:
    """Generate a completion for every record of INPUT and write them to a JSONL file."""
    given = {k: v for k, v in locals().items() if v is not None and k not in ("input", "config", "progress")}  # noqa: E501
    try:
        settings = resolve_settings(given, config)
    except ValueError as e:
        fail(str(e))
    _run_job(input, settings, progress)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _run_job(source: str, settings: RunSettings, show_progress: bool) -> None:
    from pagedbatch.io import InputError, OutputWriter, read_records
    from pagedbatch.llm import LLM
    from pagedbatch.models import ModelLoadError
    from pagedbatch.progress import JobProgress

    try:
        records = read_records(source, split=settings.split, fields=settings.fields)
    except InputError as e:
        fail(str(e))
    output = settings.output or Path(f"{Path(source.rstrip('/')).stem}.output.jsonl")
    started = time.monotonic()
    try:
        with console.status(f"Loading {settings.engine.model} ..."):
            llm = LLM(config=settings.engine)
    except (ModelLoadError, ValueError) as e:
        fail(str(e))
    codes: Counter[str] = Counter()
    with OutputWriter(output) as writer, JobProgress(console, len(records), show_progress) as bar:

        def on_output(out: Any) -> None:
            writer.write(out)
            codes[out.error.code if out.error else "ok"] += 1
            bar.record_done()

        llm.generate(records, settings.sampling, on_output=on_output, on_step=bar.step)
    _summary(output, codes, llm.stats(), time.monotonic() - started)


def _summary(output: Path, codes: Counter[str], stats: Any, seconds: float) -> None:
    failed = sum(n for code, n in codes.items() if code != "ok")
    detail = ", ".join(f"{n} {code}" for code, n in sorted(codes.items()) if code != "ok")
    console.print(
        f"Wrote {sum(codes.values())} records to {output} ({codes['ok']} ok"
        + (f", {failed} failed: {detail}" if failed else "")
        + f") in {seconds:.1f} s; {stats.generated_tokens / max(seconds, 1e-9):.1f} output tok/s, "
        f"peak KV blocks {stats.peak_blocks_in_use}/{stats.num_blocks}, "
        f"{stats.preemptions} preemptions."
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
