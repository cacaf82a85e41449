"""SIGINT / SIGTERM during a job: the first asks it to stop, the second ends it at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """A context manager that catches SIGINT and SIGTERM while a job runs.

    The first signal only sets `signum` (the job polls `requested`) and calls
    `on_first`; a second one calls `on_second`, which must not return (by default it
    exits with 128 + the signal number). Handlers run in the main thread between
    bytecodes; they are installed only there, and the previous ones come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.on_first: Callable[[int], None] = lambda signum: None
        self.on_second: Callable[[int], None] = lambda signum: os._exit(128 + signum)
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.on_first(signum)
        else:
            self.on_second(signum)

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
