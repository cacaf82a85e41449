"""What every `pagedbatch` command shares: the stderr console, option helper, errors."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

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


# What an option's value is, in help: typer would show Python types (<str>, <bool>).
_METAVARS = {"str": "TEXT", "int": "N", "float": "X", "Path": "PATH", "list[str]": "TEXT"}


def _tidy_metavars(params: list[Any]) -> list[Any]:
    """Help that reads as a command's: INPUT, not {input}; no <bool> after a flag."""
    for param in params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = (param.name or "").upper()
            param.display_type_rich = lambda ctx: None  # its help says what it is
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            param.metavar = _METAVARS.get(param.bare_type(), "VALUE")
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_metavars(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`[OPTIONS] INPUT` (typer writes a required argument as {INPUT})."""
        pieces = [self.options_metavar or "[OPTIONS]"]
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_metavars(super().get_params(ctx))
