"""The live Rich display of a job: records, tokens per second, KV blocks, time."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pagedbatch.engine.stats import EngineStats


class JobProgress:
    """Context manager fed by the engine's callbacks; shows nothing when disabled."""

    def __init__(self, console: Console, total: int, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]records"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[blocks]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("job", total=total, speed="", blocks="")
        self._started = time.monotonic()

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def record_done(self) -> None:
        self._progress.advance(self._task)

    def step(self, stats: EngineStats) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._progress.update(
            self._task,
            speed=f"{stats.generated_tokens / elapsed:7.1f} tok/s",
            blocks=f"KV {stats.blocks_in_use} used + {stats.cached_blocks} cached"
            f" / {stats.num_blocks} blocks",
        )
