"""The `pagedbatch` command's entry point: signals and stderr are made safe before anything
else is imported, so that a Ctrl-C during start-up or a closed stderr pipe is one line (or
silence) and the right exit code, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import sys
from types import FrameType
from typing import IO, Any

from pagedbatch.job.interrupts import SIGNALS, Stopped, stop_on_signals


def main() -> None:
    """Run the `pagedbatch` command (console script and `python -m pagedbatch`)."""
    stop_on_signals()
    sys.stdout = QuietOnClose(sys.stdout)
    sys.stderr = QuietOnClose(sys.stderr)
    code = 1
    try:
        try:
            from pagedbatch.cli.app import app

            app(prog_name="pagedbatch")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Stopped as e:
            code = e.exit_code
            with contextlib.suppress(OSError):
                os.write(2, f"error: stopped by {e.name}\n".encode())
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            code = 1  # anywhere (importing the libraries scans directories): one line
            with contextlib.suppress(OSError):
                os.write(2, f"error: {_too_many_files(e)}\n".encode())
        # The command is done: a signal from now on (a second SIGHUP just after the job
        # stopped for the first) changes nothing, and its exit code stands.
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, _done)
        sys.stdout.flush()
        sys.stderr.flush()
    except Stopped:  # a signal that came before its handler was replaced
        pass
    # Its files are closed: exit now, without the interpreter's slow teardown (torch's),
    # during which a signal would end the process by its default action.
    os._exit(code)


def _too_many_files(e: OSError) -> str:
    if e.errno == errno.ENFILE:
        return "the system has too many open files; try again once it has fewer"
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"too many open files: this process may open only {limit} at once; raise ulimit -n"


def _done(signum: int, frame: FrameType | None) -> None:
    """The handler of a signal that arrives once the command is done: nothing to stop."""


class QuietOnClose:
    """A text stream that, once its reader is gone (a closed pipe, a hung-up terminal), drops
    what is written to it instead of raising: the command's exit code stays its own.

    The file descriptor is then pointed at /dev/null, so that the flushes Python does at
    exit succeed too.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._closed = False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except OSError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except OSError:
                self._silence()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _silence(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
