"""SIGKILL at random points of real jobs, resumed each time: every record exactly once,
with the text of an uninterrupted run.

Seeded: the points are drawn from `random.Random(SEED)` in four phases: while starting
(a short random delay: imports done, reading, loading the model), at the first line,
after a random number of lines, and once every line is there (the final fsync, closing,
the summary). Records sample (temperature, top-k) with n = 3, some fail (into the
errors file); a second chain runs an OpenAI batch file. A process killed between two
writes leaves whole lines, one killed inside a write leaves a torn last line: both are
what a resume is built for, and which one happens does not change what is checked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from job_helpers import by_id, read_lines

SEED = 16
FLAGS = [
    "--model", "tiny-random", "--max-tokens", "5", "--temperature", "0.9", "--top-k", "40",
    "--n", "3", "--num-blocks", "256", "--max-num-seqs", "4", "--no-progress", "--seed", "7",
]  # fmt: skip
PHASES = ("start", "first line", "mid-job", "all lines")


def plain_records(n: int) -> list[dict]:
    records = [{"id": f"r{i:02d}", "prompt": f"tell story {i} " * (1 + i % 4)} for i in range(n)]
    records[3]["max_tokens"] = 0  # fails: invalid_params, into the errors file
    records[8] = {"id": "r08", "prompt": 8}  # fails: invalid_record
    records[5]["seed"] = 2**64 - 1
    return records


def batch_records(n: int) -> list[dict]:
    return [
        {
            "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"question {i}"}], "seed": i},
        }
        for i in range(n)
    ]  # fmt: skip


def untimed(lines: list[dict]) -> dict:
    """id -> line (every id once), without what depends on when and with which others a
    record ran: an OpenAI batch body's `created` time, the prompt tokens found cached."""
    for line in lines:
        body = (line.get("response") or {}).get("body")
        if body is not None:
            body.pop("created")
            body["usage"]["prompt_tokens_details"].pop("cached_tokens")
        elif "usage" in line:
            line["usage"].pop("cached_tokens")
    return by_id(lines)


@pytest.mark.fault_injection
@pytest.mark.parametrize(
    ("records", "kills"), [(plain_records(30), 13), (batch_records(16), 7)], ids=["plain", "batch"]
)
def test_killed_at_random_points_the_job_ends_exactly_as_an_uninterrupted_one(
    forked, tmp_path, records, kills
):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["run", "in.jsonl", *FLAGS]
    code, stderr = forked.run([*args, "-o", "ref.jsonl", "--errors", "ref.errors.jsonl"], tmp_path)
    assert code == 0, stderr
    out = tmp_path / "out.jsonl"
    job = [*args, "-o", "out.jsonl", "--errors", "errors.jsonl", "--resume"]
    rng = random.Random(SEED + len(records))
    seen = set()
    kills_left_lines: list[int] = []  # whole lines after each kill
    # The job advances a few lines per kill; the last kill waits for every line.
    for phase in [rng.choice(PHASES[:3]) for _ in range(kills - 1)] + [PHASES[3]]:
        seen.add(phase)
        whole = out.read_bytes().count(b"\n") if out.exists() else 0
        child = forked.start(job, tmp_path)
        if phase == "start":
            time.sleep(rng.uniform(0, 0.6))
        else:
            left = len(records) - whole
            more = {"first line": 1, "mid-job": rng.randint(2, 3), "all lines": left}
            child.poll_lines(out, whole + min(more[phase], left))
        os.kill(child.pid, signal.SIGKILL)
        code, stderr = child.wait()
        kills_left_lines.append(out.read_bytes().count(b"\n") if out.exists() else 0)
        assert code in (-signal.SIGKILL, 0), stderr  # killed, or done before the kill
    assert seen == set(PHASES), seen
    # Some kill before the last came mid-job (how many lines a kill finds depends on how
    # fast the child runs beside the poll: a loaded machine, an idle one; not asserted).
    assert any(0 < n < len(records) for n in kills_left_lines[:-1]), kills_left_lines
    code, stderr = forked.run(job, tmp_path)
    assert code == 0, stderr
    assert untimed(read_lines(out)) == untimed(read_lines(tmp_path / "ref.jsonl"))
    if (tmp_path / "ref.errors.jsonl").read_bytes():
        assert sorted(read_lines(tmp_path / "errors.jsonl"), key=str) == sorted(
            read_lines(tmp_path / "ref.errors.jsonl"), key=str
        )
    assert not (tmp_path / "out.jsonl.lock").exists()
