"""CPU time per phase of an engine step, from wrapped calls (bench --host-overhead).

A phase is a method (or module function) of the engine whose calls are timed. Times are
exclusive: a call's time less that of the wrapped calls it made, so phases add up. A
phase is `host` work or a `device` window (the forward, the sampling ops): on CPU the
device's work runs in this thread too, and the host's share of a step is what is left
once the device windows are taken out.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

READS = "clock_reads"  # the key of `take()`'s count of clock reads


def _read_cost(clock: Callable[[], float], reads: int = 2000) -> float:
    """Seconds one read of `clock` takes (the least of a few tries)."""
    best = float("inf")
    for _ in range(5):
        start = clock()
        for _ in range(reads):
            clock()
        best = min(best, (clock() - start) / (reads + 1))
    return best


class PhaseTimer:
    """Exclusive `clock` time per phase since the last `take()`.

    Reading a CPU-time clock is a system call (about a microsecond), and a step makes a few
    dozen timed calls: `READS` counts the reads since the last `take()` (the timer's and
    any made through `clock`), so that their cost, `read_seconds` each (measured once),
    can be taken out of a step's total. A phase's own time still holds the reads of the
    calls timed inside it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.device_phases: set[str] = set()
        self._totals: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open call: time of the wrapped calls inside it
        self.read_seconds = _read_cost(clock)

    def clock(self) -> float:
        """A counted read of the clock."""
        self._totals[READS] += 1
        return self._clock()

    @contextmanager
    def wrapped(self, owner: Any, name: str, phase: str, device: bool = False) -> Iterator[None]:
        """Time the calls of `owner.name` as `phase` until the block ends (then restored)."""
        inner = getattr(owner, name)
        own = name in vars(owner)  # a module's function, or an attribute of the instance
        if device:
            self.device_phases.add(phase)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._nested.append(0.0)
            start = self.clock()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                self._totals[phase] += elapsed - self._nested.pop()
                if self._nested:
                    self._nested[-1] += elapsed

        setattr(owner, name, timed)
        try:
            yield
        finally:
            if own:
                setattr(owner, name, inner)
            else:  # the class's method again
                delattr(owner, name)

    def take(self) -> dict[str, float]:
        """The totals since the last call (seconds per phase; READS: clock reads), then
        start again."""
        totals, self._totals = dict(self._totals), defaultdict(float)
        return totals
