"""Stops a job's own local Ray cluster when the job's process ends, however it ends.

`connect` starts it (`start_watchdog`) beside a cluster it started: a small process of
its own session (a Ctrl-C to the terminal does not reach it) that reads a pipe from the
job. Ray stops its head processes (GCS, raylet) with the job, but after a kill -9 or a
Ctrl-C while replicas load, the raylet's agents (`ray::DashboardAgent`,
`ray::RuntimeEnvAgent`, ~170 MB) wait a minute or two for the dead GCS. While the job
lives, the watchdog notes every Ray process below it (pid and start time) every
`INTERVAL` seconds; once the pipe ends (the job exited or was killed), it kills those
still running: only that job's own cluster, never another's. Run as a script (it imports
nothing of pagedbatch, only psutil, which Ray needs too).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

INTERVAL = 0.5  # seconds between two looks at the job's processes


def start_watchdog() -> subprocess.Popen:
    """Watch this process's Ray processes, once it has noted those running now; keep the
    result while the cluster runs (its pipe closing, when it is collected or this process
    ends, is the signal)."""
    watchdog = subprocess.Popen(
        [sys.executable, str(Path(__file__)), str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    assert watchdog.stdout is not None
    watchdog.stdout.readline()  # "watching": the cluster's processes are noted
    watchdog.stdout.close()
    return watchdog


def watch(job: int, pipe: IO[bytes]) -> None:
    """Note `job`'s Ray descendants until `pipe` ends, then kill those still there."""
    seen: dict[int, float] = {}  # pid -> start time
    _note(job, seen)
    print("watching", flush=True)
    while not select.select([pipe], [], [], INTERVAL)[0]:
        if not _note(job, seen):
            break
    _kill(seen)


def _note(job: int, seen: dict[int, float]) -> bool:
    """Add `job`'s Ray descendants to `seen`; False when the job is gone."""
    import psutil

    try:
        below = psutil.Process(job).children(recursive=True)
    except psutil.Error:
        return False
    for process in below:
        if process.pid == os.getpid():
            continue
        try:
            if "ray" in " ".join(process.cmdline()):
                seen[process.pid] = process.create_time()
        except psutil.Error:
            continue
    return True


def _kill(seen: dict[int, float]) -> None:
    import psutil

    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:  # not another process given the same pid
                process.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.stdin.buffer)
