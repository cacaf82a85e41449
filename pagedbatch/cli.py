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

INPUT, OUTPUT, MODEL, MEMORY, SAMPLING = (
    "Input",
    "Output",
    "Model",
    "KV cache and batching",
    "Sampling",
)


@app.callback()
def main() -> None:
    """Offline batch generation for LLMs on a paged KV cache."""


def opt(panel: str, help: str, *names: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


E, S = D.engine, D.sampling
Str, Int, Float = str | None, int | None, float | None


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="JSONL file, local data file (json, csv, parquet), dataset saved with save_to_disk, or a Hugging Face dataset name.", show_default=False)],
    output: Annotated[Path | None, opt(OUTPUT, "Output JSONL path. [default: <input name>.output.jsonl]", "--output", "-o")] = None,
    config: Annotated[Str, opt(MODEL, "Preset name from configs/ (cpu, gpu, tiny) or a TOML file; flags given here win.")] = None,
    split: Annotated[Str, opt(INPUT, "Dataset split. [default: train, or the only one]")] = None,
    prompt_field: Annotated[Str, opt(INPUT, f"Field holding the prompt text. [default: {D.prompt_field}]")] = None,
    messages_field: Annotated[Str, opt(INPUT, f"Field holding chat messages. [default: {D.messages_field}]")] = None,
    id_field: Annotated[Str, opt(INPUT, f"Field holding the record id (missing: line number, or row index). [default: {D.id_field}]")] = None,
    chat: Annotated[bool | None, opt(INPUT, "Render plain prompts through the model's chat template too. [default: no-chat]", "--chat/--no-chat")] = None,
    model: Annotated[Str, opt(MODEL, f"Local model directory, .gguf file, hub id, or the alias smollm2-135m (embedded). [default: {E.model}]", "--model", "-m")] = None,
    device: Annotated[Str, opt(MODEL, f"auto, cpu or cuda. [default: {E.device}]")] = None,
    dtype: Annotated[Str, opt(MODEL, "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16. [default: auto]")] = None,
    attention: Annotated[Str, opt(MODEL, "Attention implementation: auto or torch (triton is not available yet). [default: auto]")] = None,
    max_model_len: Annotated[Int, opt(MODEL, "Cap on prompt + output tokens. [default: the model's context]")] = None,
    cache_dir: Annotated[Str, opt(MODEL, "Where converted models are cached. [default: $PAGEDBATCH_CACHE or ~/.cache/pagedbatch]")] = None,
    block_size: Annotated[Int, opt(MEMORY, f"Tokens per KV block (power of two). [default: {E.block_size}]")] = None,
    num_blocks: Annotated[Int, opt(MEMORY, "Number of KV blocks (instead of --kv-memory).")] = None,
    kv_memory: Annotated[Str, opt(MEMORY, "KV cache size: bytes like 2GiB or 512MB, or a fraction of free memory like 0.5. [default: 0.8 on CUDA; 0.25 of available RAM up to 4GiB on CPU]")] = None,
    max_batch_tokens: Annotated[Int, opt(MEMORY, f"Token budget of one step; longer prompts are prefilled in chunks. [default: {E.max_batch_tokens}]")] = None,
    max_num_seqs: Annotated[Int, opt(MEMORY, f"Most sequences running at once. [default: {E.max_num_seqs}]")] = None,
    max_tokens: Annotated[Int, opt(SAMPLING, f"Most tokens generated per record (a record's max_tokens wins). [default: {S.max_tokens}]")] = None,
    temperature: Annotated[Float, opt(SAMPLING, f"0 is greedy. [default: {S.temperature}]")] = None,
    top_p: Annotated[Float, opt(SAMPLING, f"Nucleus sampling mass, in (0, 1]. [default: {S.top_p}]")] = None,
    top_k: Annotated[Int, opt(SAMPLING, f"Sample among the k most likely tokens; 0 is off. [default: {S.top_k}]")] = None,
    seed: Annotated[Int, opt(SAMPLING, "Seed of every record without its own seed. [default: random]")] = None,
    stop: Annotated[list[str] | None, opt(SAMPLING, "Stop string (repeatable); the text ends before it.")] = None,
    n: Annotated[Int, opt(SAMPLING, f"Samples per record (a record's n wins); the prompt is computed once and its pages shared. [default: {S.n}]", "--n")] = None,
    prefix_sharing: Annotated[bool | None, opt(MEMORY, "Share the KV pages of common prompt prefixes (radix cache) and run records sharing a prefix together. [default: prefix-sharing]", "--prefix-sharing/--no-prefix-sharing")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the live progress display.", rich_help_panel=OUTPUT)] = True,
) -> None:  # fmt: skip
    """Generate a completion for every record of INPUT and write them to a JSONL file."""
    given = {
        k: v
        for k, v in locals().items()
        if v is not None and k not in ("input", "config", "progress")
    }
    try:
        settings = resolve_settings(given, config)
    except ValueError as e:
        fail(str(e))
    _run_job(input, settings, progress)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _run_job(source: str, settings: RunSettings, show_progress: bool) -> None:
    from pagedbatch.io import InputError, OutputWriter, read_records
    from pagedbatch.llm import LLM
    from pagedbatch.models import ModelLoadError
    from pagedbatch.progress import JobProgress

    _quiet_libraries()

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


def _quiet_libraries() -> None:
    """Our own display replaces the progress bars and warnings of the libraries below."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _summary(output: Path, codes: Counter[str], stats: Any, seconds: float) -> None:
    failed = sum(n for code, n in codes.items() if code != "ok")
    detail = ", ".join(f"{n} {code}" for code, n in sorted(codes.items()) if code != "ok")
    console.print(
        f"Wrote {sum(codes.values())} records to {output} ({codes['ok']} ok"
        + (f", {failed} failed: {detail}" if failed else "")
        + f") in {seconds:.1f} s; {stats.generated_tokens / max(seconds, 1e-9):.1f} output tok/s, "
        f"peak KV blocks {stats.peak_blocks_in_use}/{stats.num_blocks}, "
        f"{stats.preemptions} preemptions.",
        soft_wrap=True,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
