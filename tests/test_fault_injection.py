"""SIGKILL at random points of real jobs, resumed each time: every record exactly once,
with the text of an uninterrupted run.

Seeded: the points are drawn from `random.Random(SEED)` in four phases: while starting
(a short random delay: imports done, reading, loading the model), at the first line,
after a random number of lines, and once every line is there (the final fsync, closing,
the summary). Records sample (temperature, top-k) with n = 3, some fail (into the
errors file); a second chain runs an OpenAI batch file. A process killed between two
writes leaves whole lines, one killed inside a write leaves a torn last line: both are
what a resume is built for, and which one happens does not change what is checked.

Inputs rewritten in place at seeded random points (JSONL, saved dataset, CSV, Parquet):
every line written is its own id's record's, as the job read it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shlex
import shutil
import signal
import time

import pytest
from job_helpers import by_id, read_lines

SEED = 16
FLAGS = [
    "--model", "tiny-random", "--dtype", "float32", "--max-tokens", "5", "--temperature", "0.9",
    "--top-k", "40", "--n", "3", "--num-blocks", "256", "--max-num-seqs", "4", "--no-progress",
    "--seed", "7",
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


# --- Inputs rewritten in place at random points ----------------------------------------

REWRITE_FLAGS = [
    "--device", "cpu", "--dtype", "float32", "--num-blocks", "64", "--max-tokens", "4",
    "--max-num-seqs", "1",
    "--threads", "1", "--no-progress",
]  # fmt: skip
ANIMALS = ("cat", "dog", "owl", "fox", "cow", "pig", "rat", "bee")
# (input kind, trials): each trial rewrites the input after a random number of lines, or
# at a random moment while the job starts; the first JSONL trial's rewrite comes after 3
# lines, while records are still to be read again (a window of 64 is admitted ahead),
# so that one surely stops the job.
REWRITES = (("jsonl", 3), ("dataset", 2), ("csv", 1), ("parquet", 1))


def poem_versions(rng: random.Random, n: int) -> tuple[list[dict], list[dict]]:
    """Version A of an input and version B of the same size as every file kind writes it:
    a third of the records' animals changed, a fifth of the records swapped in pairs."""
    a = [{"id": f"r{i:03d}", "prompt": f"A short poem about a {ANIMALS[i % 8]}, no {i:03d}:"}
         for i in range(n)]  # fmt: skip
    b = [dict(r) for r in a]
    for i in rng.sample(range(n), n // 3):
        b[i]["prompt"] = f"A short poem about a {ANIMALS[(i + 1) % 8]}, no {i:03d}:"
    picked = rng.sample(range(n), n // 5 * 2)
    for i, j in zip(picked[::2], picked[1::2]):
        b[i], b[j] = b[j], b[i]
    return a, b


def input_bytes(kind: str, rows: list[dict], scratch) -> bytes:
    """The bytes of the one file of `kind` that holds `rows` (a saved dataset: its Arrow file)."""
    if kind == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "csv":
        text = io.StringIO()
        csv.DictWriter(text, ["id", "prompt"]).writerows([{"id": "id", "prompt": "prompt"}, *rows])
        return text.getvalue().encode()
    if kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(rows), scratch / "t.parquet")
        return (scratch / "t.parquet").read_bytes()
    datasets = pytest.importorskip("datasets")
    shutil.rmtree(scratch / "ds", ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(scratch / "ds")
    return next((scratch / "ds").glob("*.arrow")).read_bytes()


def rewrite_in_place(path, data: bytes) -> None:
    with path.open("r+b") as f:
        f.write(data)
        f.truncate(len(data))


@pytest.mark.fault_injection
def test_inputs_rewritten_in_place_at_random_points_never_put_text_under_another_id(
    forked, tiny_model_dirs, tmp_path
):
    """Each input kind is rewritten in place (to version B, then back to A) while a job
    runs; every line the job writes is its own id's record's, as the job first read it
    (version A, or either while it was first read): a JSONL job stops with one line when
    a record it reads again changed, and resumes; the other kinds are read from a copy or
    a conversion made at the start."""
    rng = random.Random(SEED)
    a, b = poem_versions(rng, 96)
    flags = ["-m", tiny_model_dirs["llama"], *REWRITE_FLAGS]
    refs = {}
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_bytes(input_bytes("jsonl", rows, tmp_path))
        code, stderr = forked.run(["run", f"{name}.jsonl", "-o", f"{name}.ref", *flags], tmp_path)
        assert code == 0, stderr
        refs[name] = untimed(read_lines(tmp_path / f"{name}.ref"))
    assert sum(refs["a"][r["id"]] != refs["b"][r["id"]] for r in a) > len(a) // 4
    stops = 0
    for kind, trials in REWRITES:
        scratch = tmp_path / kind
        scratch.mkdir()
        versions = [input_bytes(kind, rows, scratch) for rows in (a, b)]
        source = scratch / ("ds" if kind == "dataset" else f"in.{kind}")
        if kind != "dataset":  # (the saved dataset is scratch/ds already)
            source.write_bytes(versions[0])
        target = next(source.glob("*.arrow")) if kind == "dataset" else source
        for trial in range(trials):
            point = rng.choice([None, rng.randint(1, 30)]) if kind != "jsonl" or trial else 3
            rewrite_in_place(target, versions[0])
            out = scratch / f"out{trial}.jsonl"
            child = forked.start(["run", source.name, "-o", out.name, *flags], scratch)
            if point is None:
                time.sleep(rng.uniform(0, 1.5))
            else:
                child.poll_lines(out, point)
            rewrite_in_place(target, versions[1])
            code, stderr = child.wait()
            lines = untimed(read_lines(out)) if out.exists() else {}
            # Rewritten while the job read it first, a record may be either version: the
            # job runs each record as it first read it.
            read_as = [refs["a"]] if point else [refs["a"], refs["b"]]
            for rid, line in lines.items():
                assert any(line == ref.get(rid) for ref in read_as), (kind, trial, rid)
            if code == 2 and point is None:  # the first read found it torn (duplicate ids)
                assert not lines and stderr.count("\n") == 1, stderr
                continue
            if code == 0:
                assert len(lines) == len(a), (kind, trial)
                continue
            assert kind == "jsonl", (kind, trial, stderr)  # the others never read it again
            assert code == 1 and stderr.count("\n") == 1, stderr
            assert f"{source.name}: changed while the job ran" in stderr, stderr
            stops += 1
            resume = shlex.split(stderr.split("Resume with:", 1)[1])[1:]
            code, stderr = forked.run(resume, scratch)  # on version B
            if code == 0:  # every line it held was of a record B did not change
                assert untimed(read_lines(out)) == refs["b"], (kind, trial)
            else:
                assert code == 2 and "was written from another version of" in stderr, stderr
    assert stops >= 1
