"""The `pagedbatch` command: its three subcommands, each in a module of its own."""

from __future__ import annotations

import os
import sys

import typer

from pagedbatch.cli.bench import bench
from pagedbatch.cli.common import Command, Group
from pagedbatch.cli.plan import plan
from pagedbatch.cli.run import run

app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    help="Offline batch generation for LLMs on a paged KV cache.",
)


@app.callback()
def main() -> None:
    """Offline batch generation for LLMs on a paged KV cache."""
    # Our own display replaces the tqdm bars of the libraries below (read at tqdm's import).
    os.environ.setdefault("TQDM_DISABLE", "1")


app.command(cls=Command, short_help="Generate a completion for every record of a job.")(run)
app.command(cls=Command, short_help="Time pagedbatch against transformers on one job.")(bench)
app.command(cls=Command, short_help="What a job will cost, from its prompts, before running it.")(
    plan
)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
