"""SIGINT / SIGTERM / SIGHUP: before a job starts they stop it at once; during it the first
asks it to stop, the second ends it at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):  # noqa: N818 (not an error: a request to stop)
    """Raised by `raise_stopped` where a signal arrives before the job has started.

    A BaseException, like KeyboardInterrupt, so that `except Exception` does not swallow it;
    `with` blocks and `finally` clauses still run on the way out.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_stopped(signum: int, frame: FrameType | None = None) -> None:
    """A signal handler that raises Stopped."""
    raise Stopped(signum)


def stop_on_signals() -> None:
    """Make every signal of SIGNALS raise Stopped from now on (call first thing in a command,
    from the main thread). A signal this process was started ignoring (`nohup`, a shell's
    background job) stays ignored."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, raise_stopped)


class Interrupts:
    """A context manager that catches SIGINT, SIGTERM and SIGHUP while a job runs.

    Until `started` is set, a signal raises Stopped where the main thread is (nothing has
    been written yet, so stopping at once loses nothing). Then the first signal only sets
    `signum` (the job polls `requested`) and calls `on_first`; a second one calls
    `on_second`, which must not return (by default it exits with 128 + the signal
    number). Handlers run in the main thread between bytecodes; they are installed only
    there, not for a signal that is ignored (`nohup`), and the previous ones come back on
    exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.started = False
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
        if not self.started:
            raise Stopped(signum)
        if self.signum is None:
            self.signum = signum
            self.on_first(signum)
        else:
            self.on_second(signum)

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
