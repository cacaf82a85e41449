"""How many CPU threads torch should compute with when nobody says.

torch's intra-op threads meet at the end of every op, so one thread that shares a core
with another process stalls all of them: on a 2-core machine with one core kept busy, a
job ran 2.7x slower on 2 threads than on 1 (README, Options). The default is the CPUs
this process may use less those that other processes keep busy right now.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.1  # how long cpus_busy_elsewhere() watches the CPUs
REUSE_SECONDS = 10.0  # a process asks again (an LLM per test) without watching again

_last_sample: tuple[float, float] | None = None  # (monotonic time, busy CPUs)


def usable_cpus(
    affinity: Collection[int] | None, cpu_max: str | None, cpu_count: int | None
) -> int:
    """CPUs a process may keep busy: its affinity set (else `cpu_count`), capped by a cgroup
    v2 quota (`cpu.max`: "<quota> <period>", or "max <period>" for none), at least 1.

    A fractional quota rounds down: a thread beyond it is throttled, and the others wait
    for it at every parallel region.
    """
    cpus = len(affinity) if affinity else (cpu_count or 1)
    quota, _, period = (cpu_max or "max").strip().partition(" ")
    if quota.isdigit() and period.isdigit() and int(period) > 0:  # else no (readable) quota
        cpus = min(cpus, int(quota) // int(period))
    return max(1, cpus)


def process_cpus() -> int:
    """usable_cpus() of this process, from its affinity and its cgroup's cpu.max."""
    try:
        cpu_max: str | None = CGROUP_CPU_MAX.read_text()
    except OSError:
        cpu_max = None
    return usable_cpus(_affinity(), cpu_max, os.cpu_count())


def busy_cpus(before: str, after: str, cpus: Collection[int] | None) -> float:
    """How many of `cpus` (all when None) were busy between two reads of /proc/stat: the
    sum over those CPUs of their non-idle share of the time between the reads."""
    first, second = _cpu_times(before), _cpu_times(after)
    busy = 0.0
    for cpu, (idle, total) in second.items():
        if (cpus is not None and cpu not in cpus) or cpu not in first:
            continue
        elapsed = total - first[cpu][1]
        if elapsed > 0:
            busy += 1.0 - (idle - first[cpu][0]) / elapsed
    return busy


def cpus_busy_elsewhere() -> float:
    """busy_cpus() of this process's CPUs over SAMPLE_SECONDS, while this thread sleeps
    (so it counts other processes); 0 where /proc/stat cannot be read. A reading is
    reused for REUSE_SECONDS."""
    global _last_sample
    now = time.monotonic()
    if _last_sample is not None and now - _last_sample[0] < REUSE_SECONDS:
        return _last_sample[1]
    try:
        before = PROC_STAT.read_text()
        time.sleep(SAMPLE_SECONDS)
        after = PROC_STAT.read_text()
    except OSError:
        return 0.0
    busy = busy_cpus(before, after, _affinity())
    _last_sample = (now, busy)
    return busy


def default_threads(cpus: int, busy: float) -> int:
    """Threads for a CPU run: our `cpus` less the `busy` ones, rounded, at least 1."""
    return max(1, cpus - round(min(max(busy, 0.0), cpus)))


def _affinity() -> set[int] | None:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def _cpu_times(stat: str) -> dict[int, tuple[int, int]]:
    """Per CPU of a /proc/stat text: (idle + iowait, total) jiffies (guest time is already
    in user time, so the first 8 fields are the total)."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times
