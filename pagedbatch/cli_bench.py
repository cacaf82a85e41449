"""`pagedbatch bench`: pagedbatch against the transformers baselines, as a table."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pagedbatch.bench import BenchResult, run_file_benchmark
from pagedbatch.models import DEFAULT_MODEL


def bench(
    input: Annotated[
        str,
        typer.Argument(
            help="JSONL job to run with every contender (e.g. examples/label_job.jsonl)."
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model for every contender.")
    ] = DEFAULT_MODEL,
    max_tokens: Annotated[
        int, typer.Option(help="Tokens generated per record, EOS ignored, by every contender.")
    ] = 8,
    batch_size: Annotated[
        int, typer.Option(help="Static batch size of the transformers generate baseline.")
    ] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Time pagedbatch (with and without prefix sharing, and the whole CLI process) against
    transformers generate (padded static batches) and generate_batch, in one run."""
    console = Console()
    console.print(f"Benchmark of {input} on {model}, {max_tokens} tokens per record ...")
    results: list[BenchResult] = []

    def show(result: BenchResult) -> None:
        results.append(result)
        console.print(f"  {result.name}: {result.seconds:.1f} s")

    run_file_benchmark(input, model, max_tokens, batch_size, device, on_result=show)
    console.print(_table(results))


def _table(results: list[BenchResult]) -> Table:
    base = next(r for r in results if r.name.startswith("transformers generate ("))
    table = Table(title="ratio = records/s against transformers generate, same run")
    columns = ("contender", "s", "records/s", "out tok/s", "ratio", "hit rate", "peak KV blocks")
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    for r in results:
        d = r.details
        table.add_row(
            r.name, f"{r.seconds:.1f}", f"{r.records_per_s:.2f}", f"{r.tokens_per_s:.1f}",
            f"{r.records_per_s / base.records_per_s:.2f}x",
            f"{d['prefix_hit_rate']:.2f}" if "prefix_hit_rate" in d else "",
            str(d.get("peak_blocks", "")),
        )  # fmt: skip
    return table
