"""`pagedbatch bench --workload scale`: what a job of N records costs the job pipeline.

An N-record JSONL job (prompts of 30 to 60 tokens of the byte-level tiny-random model,
90% of them starting with the same 30 tokens) runs as a user runs it, `pagedbatch run
--model tiny-random --max-tokens 1 --num-blocks 4096` in a child process, so that the
model costs nearly nothing and what is measured is reading, tokenizing, ordering,
admitting and writing.
Reported: the child's peak RSS, the seconds from its start to the first output line,
records/s from the first line to the last (or to `seconds` after the first line, when
the child is stopped there with SIGTERM), and the same peak RSS and wall time for
`pagedbatch plan` over all N.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SHARED_PREFIX = "Label the review as positive or negative:"[:30]  # 30 bytes: 30 tokens
SHARED_FRACTION = 0.9
WORDS = ("good", "bad", "fine", "slow", "fast", "broken", "great", "cheap", "loud", "soft")
POLL_SECONDS = 0.05
# The KV pool of the run: 8 MB of tiny-random's KV, so that what grows with the records is
# the job pipeline's memory, not KV pages touched for the first time (the default pool, a
# share of free RAM, is touched block by block as a long job goes on), and the run evicts.
KV_BLOCKS = 4096


@dataclass(frozen=True)
class ProcessFigures:
    """One child process: its wall time, peak RSS, exit code; for `run`, its output lines,
    the seconds to the first one and records/s after it."""

    seconds: float
    peak_rss_mb: float
    exit_code: int
    lines: int = 0
    first_line_s: float | None = None
    records_per_s: float | None = None


@dataclass(frozen=True)
class ScaleReport:
    records: int
    run: ProcessFigures
    plan: ProcessFigures | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scale_job(path: Path, records: int, seed: int = 0) -> None:
    """Write the N-record job: 30-60 byte prompts, 90% after the shared 30-byte prefix."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            length = rng.randint(30, 60)
            head = SHARED_PREFIX if rng.random() < SHARED_FRACTION else ""
            text = head
            while len(text) < length:
                text += " " + rng.choice(WORDS)
            f.write(f'{{"id": {i}, "prompt": "{text[:length]}"}}\n')


def measure_scale(
    records: int, *, seconds: float | None = None, plan: bool = True, threads: int = 1
) -> ScaleReport:
    """Build the job in a temporary directory and measure `run` (and `plan`) on it."""
    with tempfile.TemporaryDirectory(prefix="pagedbatch-scale-") as tmp:
        job = Path(tmp) / "scale.jsonl"
        scale_job(job, records)
        out = Path(tmp) / "scale.output.jsonl"
        common = [
            "--model", "tiny-random", "--device", "cpu", "--num-blocks", str(KV_BLOCKS),
            "--threads", str(threads),
        ]  # fmt: skip
        run = _measure(
            ["run", str(job), "-o", str(out), "--max-tokens", "1", "--no-progress", *common],
            out, seconds,
        )  # fmt: skip
        planned = None
        if plan:
            planned = _measure(["plan", str(job), "--no-estimate", "--json", *common[:6]], None)
        return ScaleReport(records, run, planned)


def _measure(args: list[str], output: Path | None, seconds: float | None = None) -> ProcessFigures:
    """Run `pagedbatch ARGS` as a child; poll `output` for lines; SIGTERM it `seconds` after
    the first line. Its peak RSS comes from wait4, so the child is reaped here, not by
    Popen."""
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "pagedbatch", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = stop_at = None
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        now = time.monotonic()
        if pid:
            break
        if output is not None and first is None and _lines(output):
            first = now - started
            stop_at = now + seconds if seconds is not None else None
        if stop_at is not None and now >= stop_at:
            child.send_signal(signal.SIGTERM)
            stop_at = None
        time.sleep(POLL_SECONDS)
    child.returncode = os.waitstatus_to_exitcode(status)
    ended = now - started
    lines = _lines(output) if output is not None else 0
    if output is not None and first is None and lines:
        first = ended  # every line came in the last poll
    rate = (lines - 1) / (ended - first) if first is not None and ended > first else None
    return ProcessFigures(ended, usage.ru_maxrss / 1024, child.returncode, lines, first, rate)


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
