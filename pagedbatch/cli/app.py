"""The `pagedbatch` command: its three subcommands, each in a module of its own."""

from __future__ import annotations

import sys

import typer

from pagedbatch.cli.bench import bench
from pagedbatch.cli.plan import plan
from pagedbatch.cli.run import run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Offline batch generation for LLMs on a paged KV cache.",
)


@app.callback()
def main() -> None:
    """Offline batch generation for LLMs on a paged KV cache."""


app.command()(run)
app.command()(bench)
app.command()(plan)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
