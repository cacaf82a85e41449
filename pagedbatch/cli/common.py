"""What every `pagedbatch` command shares: the stderr console, option helper, errors."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False)

Str, Int, Float = str | None, int | None, float | None


def opt(panel: str | None, help: str, *names: str) -> Any:
    """A Typer option shown without a default (help texts say it themselves)."""
    # Escaped: "[default: ...]" in a help text is not Rich markup.
    return typer.Option(*names, help=escape(help), rich_help_panel=panel, show_default=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """One red line on stderr, then exit with `code` (2: bad input or flags; 1: a failed run)."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def quiet_libraries() -> None:
    """Our own display replaces the progress bars and warnings of transformers (the job
    reader quiets `datasets` itself)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
