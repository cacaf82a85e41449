"""What a job shows while it runs: its phase, then records, tokens per second, KV blocks, ETA.

On a terminal, a live Rich display: a spinner while the input is read and the model
loads, then one bar that counts records as they are tokenized and then as they finish.
When stderr is not a terminal (a log file, a pipe), a plain line for each phase (read,
loaded, tokenized, with its time) once the next begins, one every `interval` seconds and a last one
when the records are done, so that a log neither fills with redraws nor cuts lines to
the terminal's width.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

from pagedbatch.cli.eta import Eta
from pagedbatch.engine.stats import EngineStats

DEFAULT_LOG_INTERVAL = 10.0  # seconds between plain lines; PAGEDBATCH_LOG_INTERVAL overrides


def clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_interval() -> float:
    try:
        return max(float(os.environ.get("PAGEDBATCH_LOG_INTERVAL", DEFAULT_LOG_INTERVAL)), 0.01)
    except ValueError:
        return DEFAULT_LOG_INTERVAL


class JobProgress:
    """The display of one job; a no-op when disabled. Feed it `phase` before generation
    (reading, loading), then `generating`, `prepared`, `step` and `record_done`."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._phase = ""
        self._phase_started = time.monotonic()
        self._counted: int | None = None  # records the phase has read
        self._done_phase: str | None = None  # the plain line of the phase that ended
        self._status: Any = None  # the terminal's spinner, during a phase
        self._started = time.monotonic()
        self._ended: float | None = None
        self._eta: Eta | None = None
        self._prepared = 0
        self._stats: EngineStats | None = None
        self._progress: Progress | None = None
        self._counting = False  # the bar counts records done (else: records tokenized)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> JobProgress:
        if self.enabled and not self.live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_ticker()
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def phase(self, text: str) -> Iterator[None]:
        """A phase before generation, shown as a spinner (terminal) or in the plain lines;
        `counted(n)` inside it adds how many records it has read and how fast."""
        self._print_done_phase()
        with self._lock:
            self._phase, self._phase_started, self._counted = text, time.monotonic(), None
        if self.live:
            with self.console.status(escape(text) + " ...") as status:
                self._status = status
                yield
            self._status = None
        else:
            yield
            if self.enabled:  # the phase's last plain line: what it did and how long it took
                self._done_phase = self._phase_line()
        with self._lock:
            self._phase = ""

    def _print_done_phase(self) -> None:
        """The line of the phase that ended, once the next begins: an error found between
        the two (a model name, after reading) stays the only line."""
        if self._done_phase is not None:
            self._print(self._done_phase)
            self._done_phase = None

    def counted(self, records: int) -> None:
        """The phase has read `records` records so far."""
        with self._lock:
            self._counted = records
        if self._status is not None:
            self._status.update(escape(self._phase_line()))

    def _phase_line(self) -> str:
        elapsed = time.monotonic() - self._phase_started
        if self._counted is None:
            return f"{self._phase} ({clock(elapsed)})"
        rate = f", {self._counted / elapsed:,.0f}/s" if elapsed > 0 else ""
        return f"{self._phase}: {self._counted:,} records{rate} ({clock(elapsed)})"

    def generating(self, records: int, prior_tokens_per_record: float) -> None:
        """The records are about to be tokenized and run."""
        self._print_done_phase()
        self._eta = Eta(records, prior_tokens_per_record)
        self._started = time.monotonic()
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("tokenizing", total=records, detail="")
        self._progress.start()

    def prepared(self, done: int, total: int, output_tokens: float | None = None) -> None:
        """`done` of the `total` records are tokenized; `output_tokens`: the most a record
        tokenized so far may generate, on average (the ETA's prior, until one has)."""
        self._prepared = done
        if output_tokens is not None and self._eta is not None:
            with self._lock:
                self._eta.prior = output_tokens
        if self._progress is not None and not self._counting:
            self._progress.update(self._task, completed=done, total=total)

    def step(self, stats: EngineStats) -> None:
        if self._stats is None and self.enabled and not self.live and self._eta is not None:
            elapsed = clock(time.monotonic() - self._started)  # the tokenizing phase's line
            self._print(f"tokenized {self._prepared:,}/{self._eta.records:,} records ({elapsed})")
        with self._lock:
            self._stats = stats
            if self._eta is not None:
                self._eta.step(
                    time.monotonic(), stats.generated_tokens, stats.running_seqs,
                    stats.computed_tokens,
                )  # fmt: skip
        self._redraw()

    def record_done(self, output_tokens: int = 0, failed: bool = False) -> None:
        with self._lock:
            if self._eta is not None:
                self._eta.record_done(output_tokens, failed)
        self._redraw()

    @property
    def generation_seconds(self) -> float:
        """Seconds from `generating` to `finish` (0 when nothing was generated)."""
        if self._eta is None:
            return 0.0
        return (self._ended or time.monotonic()) - self._started

    def finish(self) -> None:
        """The records are done (or stopped): the bar's last state, or a last plain line,
        with the job's mean rate (as the summary that follows says it), before anything
        else is printed."""
        self._ended = time.monotonic()
        if self._progress is not None:
            self._redraw()
            self._progress.stop()  # no redraw after the summary
            self._progress = None
        elif self.enabled and not self.live and self._eta is not None:
            self._stop_ticker()  # its last line must not come after this one
            self._print(self.line())

    def _print(self, line: str) -> None:
        self.console.print(line, soft_wrap=True, markup=False, highlight=False)

    def line(self) -> str:
        """The state in one plain line."""
        with self._lock:
            if self._eta is None:
                return self._phase_line()
            eta = self._eta
            if eta.records_done == 0 and self._stats is None:
                return f"tokenizing {self._prepared}/{eta.records} records"
            share = eta.records_done / eta.records if eta.records else 1.0
            return f"records {eta.records_done}/{eta.records} ({share:.0%}) | {self._detail()}"

    def _detail(self) -> str:
        """Rate | ETA | elapsed | KV (what a narrow terminal cuts last first); once finished,
        the job's mean rate (none when no record ran) and no ETA."""
        eta, stats = self._eta, self._stats
        assert eta is not None
        now = self._ended or time.monotonic()
        parts = [] if self._ended and not eta.records_ran else [self._rate(now)]
        if self._ended is None:
            parts.append(f"ETA {clock(eta.seconds_left())}")
        parts.append(f"elapsed {clock(now - self._started)}")
        if stats is not None:
            parts.append(
                f"KV {stats.blocks_in_use} used + {stats.cached_blocks} cached / "
                f"{stats.num_blocks} blocks"
            )
        return " | ".join(parts)

    def _rate(self, now: float) -> str:
        """Output tokens per second (the moving average; once finished, the mean, as the
        summary has it), or records per second when nothing is generated."""
        eta, stats = self._eta, self._stats
        assert eta is not None
        seconds = max(now - self._started, 1e-9)
        if eta.scoring:
            return f"{eta.records_ran / seconds:.1f} records/s"
        if self._ended is not None:
            generated = stats.generated_tokens if stats is not None else 0
            return f"{generated / seconds:.1f} tok/s"
        return f"{eta.rate:.1f} tok/s" if eta.rate is not None else "- tok/s"

    def _redraw(self) -> None:
        if self._progress is None or self._eta is None:
            return
        with self._lock:
            detail = self._detail()
            done = self._eta.records_done
        self._counting = True  # the bar counts records done from now on, not tokenized
        self._progress.update(self._task, description="records", completed=done, detail=detail)

    def _stop_ticker(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()  # however loaded the machine: no line of its comes after

    def _tick(self) -> None:
        interval = log_interval()
        while not self._stop.wait(interval):
            with self._lock:
                idle = not self._phase and self._eta is None
                done = self._eta is not None and self._eta.records_done >= self._eta.records
            if not idle and not done:  # the last line is finish()'s
                self._print(self.line())
