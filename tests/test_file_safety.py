"""A job never hurts its user's files: real processes, real files, real signals.

Each test runs the `pagedbatch` command as a process of its own (forked by
tests/fork_server.py, which has done the imports once; `start` for a fresh interpreter
where start-up itself is under test) and checks the exit code, the one line on stderr
and the bytes of every file before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from job_helpers import by_id, read_lines, start, write_jsonl

FLAGS = [
    "--model", "tiny-random", "--max-tokens", "6", "--temperature", "0.7", "--seed", "3",
    "--num-blocks", "64", "--no-progress",
]  # fmt: skip


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"story number {i}"} for i in range(n)]


def snapshot(directory: Path) -> dict[str, bytes]:
    """name -> bytes of every regular file in `directory` (stderr captures left out)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".stderr")
    }


def one_line(code: int, stderr: str, expected: int = 2) -> str:
    assert code == expected, stderr
    text = stderr.strip()
    assert "Traceback" not in text and "\n" not in text and text.startswith("error: "), text
    return text


def run(forked, cwd: Path, *args: object, **kwargs: bool) -> tuple[int, str]:
    return forked.run(["run", *args], cwd, **kwargs)


def test_no_output_errors_file_or_fingerprint_may_be_the_input_or_each_other(forked, tmp_path):
    write_jsonl(tmp_path / "same.jsonl", rows(3))
    write_jsonl(tmp_path / "s2.jsonl", rows(3))
    os.link(tmp_path / "s2.jsonl", tmp_path / "hard.jsonl")
    (tmp_path / "link.jsonl").symlink_to("same.jsonl")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "part.jsonl", rows(2))
    before = snapshot(tmp_path)
    cases = [
        (["same.jsonl", "-o", "same.jsonl", "--overwrite"], "the output same.jsonl is the same file as the input same.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "o.jsonl", "--errors", "s2.jsonl", "--overwrite"], "the errors file s2.jsonl is the same file as the input s2.jsonl"),  # noqa: E501
        (["same.jsonl", "-o", "link.jsonl", "--resume", "--force"], "the output link.jsonl is the same file as the input same.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "hard.jsonl", "--overwrite"], "the output hard.jsonl is the same file as the input s2.jsonl"),  # noqa: E501
        (["same.jsonl", "-o", "o.jsonl", "--errors", "o.jsonl"], "the errors file o.jsonl is the same file as the output o.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "o.jsonl", "--errors", "o.jsonl.job.json"], "the fingerprint o.jsonl.job.json is the same file as the errors file"),  # noqa: E501
        (["data", "-o", "data/out.jsonl"], "the output data/out.jsonl is inside the input directory data"),  # noqa: E501
    ]  # fmt: skip
    for args, message in cases:
        code, stderr = run(forked, tmp_path, *args, *FLAGS)
        assert message in one_line(code, stderr), args
        assert snapshot(tmp_path) == before, args  # nothing written, nothing left behind


def test_a_second_run_on_an_output_in_use_is_refused_naming_the_first(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(40))
    out = tmp_path / "c.jsonl"
    first = forked.start(
        ["run", "t.jsonl", "-o", "c.jsonl", *FLAGS, "--max-num-seqs", "1"], tmp_path
    )
    first.poll_lines(out, 1)
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock, writes nothing until SIGCONT
    try:
        held = out.read_bytes()
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "c.jsonl", *FLAGS, *extra)
            error = one_line(code, stderr)
            assert (
                f"the output c.jsonl is in use by another pagedbatch run (process {first.pid})"
                in error
            )
            assert out.read_bytes() == held
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code, stderr = first.wait()
    assert code == 0, stderr
    assert len(by_id(read_lines(out))) == 40  # every id once
    assert not (tmp_path / "c.jsonl.lock").exists()
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "c.jsonl", *FLAGS, "--resume")
    assert code == 0 and "Nothing to do" in stderr, stderr  # the lock went with the job


def test_an_output_with_a_record_twice_is_not_resumed(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(4))
    out = tmp_path / "o.jsonl"
    assert run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS)[0] == 0
    lines = out.read_bytes().splitlines(keepends=True)
    changed = lines[0].replace(b'"text": "', b'"text": "other ')
    out.write_bytes(b"".join(lines[:3]) + changed + lines[1])
    before = snapshot(tmp_path)
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--resume")
    error = one_line(code, stderr)
    first, second = (json.loads(line)["id"] for line in lines[:2])
    twice = f"('{first}' on lines 1 and 4, '{second}' on lines 2 and 5)"
    assert f"o.jsonl holds a record more than once {twice}" in error
    assert "keep one line of each id" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before


def test_a_value_out_of_range_fails_its_record_only(forked, tmp_path):
    bad = {
        "seed_1e29": {"seed": 10**29, "temperature": 0.5},
        "seed_2_64": {"seed": 2**64, "temperature": 0.5},
        "top_k": {"top_k": 2**70, "temperature": 0.5},
        "temperature": {"temperature": 10**400},
        "n": {"n": 2**63},
        "max_tokens": {"max_tokens": 2**63},
    }
    good = {"seed_max": {"seed": 2**64 - 1, "temperature": 0.5}}
    records = [{"id": rid, "prompt": "Hi", **v} for rid, v in {**bad, **good}.items()]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS)
    assert code == 0 and "Traceback" not in stderr, stderr
    lines = by_id(read_lines(tmp_path / "o.jsonl"))
    assert {rid for rid, line in lines.items() if "choices" in line} == set(good)
    assert all(lines[rid]["error"]["code"] == "invalid_params" for rid in bad)
    assert "seed must be <= 18446744073709551615" in lines["seed_2_64"]["error"]["message"]
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--retry-errors")
    assert code == 0 and "Wrote 6 records" in stderr, stderr  # the same errors, no crash


def test_fifos_and_devices_are_refused_without_being_opened(forked, tmp_path):
    os.mkfifo(tmp_path / "f.jsonl")  # nobody writes: opening it to read would block
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    (tmp_path / "full.jsonl").symlink_to("/dev/full")
    cases = [
        (["f.jsonl", "-o", "o.jsonl"], "f.jsonl is a FIFO (named pipe), not a regular file"),
        (["t.jsonl", "-o", "full.jsonl", "--resume"], "the output full.jsonl is a character device"),  # noqa: E501
        (["t.jsonl", "-o", "o.jsonl", "--errors", "/dev/null"], "the errors file /dev/null is a character device"),  # noqa: E501
    ]  # fmt: skip
    for args, message in cases:
        assert message in one_line(*run(forked, tmp_path, *args, *FLAGS)), args
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "f.jsonl", "full.jsonl", "t.jsonl",
    ]  # fmt: skip


def test_deep_nesting_is_a_line_error_everywhere(forked, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(r) for r in rows(2)]
    (tmp_path / "d.jsonl").write_text(
        f'{{"id": "a", "prompt": {deep}}}\n' + "\n".join(lines) + "\n"
    )
    (tmp_path / "d.json").write_text(deep)
    code, stderr = run(forked, tmp_path, "d.jsonl", "-o", "o.jsonl", *FLAGS)
    assert "d.jsonl: line 1: invalid JSON: nested deeper than 64 levels" in one_line(code, stderr)
    code, stderr = run(forked, tmp_path, "d.json", "-o", "j.jsonl", *FLAGS)
    assert "d.json: line 1: invalid JSON: nested deeper than 64 levels" in one_line(code, stderr)
    code, stderr = run(forked, tmp_path, "d.jsonl", "-o", "o.jsonl", *FLAGS, "--skip-invalid")
    assert code == 0, stderr
    out = by_id(read_lines(tmp_path / "o.jsonl"))
    assert out[1]["error"] == {
        "code": "invalid_record",
        "message": "line 1: invalid JSON: nested deeper than 64 levels",
    }
    with (tmp_path / "o.jsonl").open("a") as f:
        f.write(f'{{"id": {deep}}}\n')
    args = ["d.jsonl", "-o", "o.jsonl", *FLAGS, "--skip-invalid", "--resume"]
    error = one_line(*run(forked, tmp_path, *args))
    assert "o.jsonl: line 4 is not a pagedbatch output line" in error


def test_signals_before_the_job_starts_stop_it_at_once_in_one_line(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(3))
    # A fresh interpreter: the signal arrives while the command is still importing.
    process = start(["t.jsonl", "-o", "o.jsonl", *FLAGS], tmp_path)
    _wait_for_handler(process.pid, signal.SIGHUP)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)  # a hang guard only
    assert process.returncode == 130, stderr
    assert stderr.strip() in ("error: stopped by SIGINT", _before_start("SIGINT")), stderr
    for sig in (signal.SIGTERM, signal.SIGHUP):
        child = forked.start(["run", "t.jsonl", "-o", "o.jsonl", *FLAGS], tmp_path)
        _wait_for_handler(child.pid, sig)
        os.kill(child.pid, sig)
        code, stderr = child.wait()
        assert code == 128 + sig, stderr
        assert stderr.strip() in (f"error: stopped by {sig.name}", _before_start(sig.name))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["t.jsonl"]


def test_sighup_mid_job_stops_like_sigterm_and_the_job_resumes(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(30))
    args = ["run", "t.jsonl", "-o", "o.jsonl", *FLAGS, "--max-num-seqs", "1"]
    child = forked.start(args, tmp_path)
    child.poll_lines(tmp_path / "o.jsonl", 2)
    os.kill(child.pid, signal.SIGHUP)
    code, stderr = child.wait()
    assert code == 129 and "Interrupted by SIGHUP" in stderr and "--resume" in stderr, stderr
    assert run(forked, tmp_path, *args[1:], "--resume")[0] == 0
    assert len(by_id(read_lines(tmp_path / "o.jsonl"))) == 30


def test_a_closed_stderr_pipe_leaves_the_exit_code_and_the_output_alone(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(5))
    code, _ = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, stderr=False)
    assert code == 0
    assert len(by_id(read_lines(tmp_path / "o.jsonl"))) == 5
    code, _ = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, stderr=False)
    assert code == 2  # refused (the output has lines): its own code, not 1


def test_the_errors_file_is_strict_json(forked, tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"id": "nan", "prompt": "Hi", "temperature": NaN, "extra": [Infinity, 1.5]}\n'
    )
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--errors", "e.jsonl")
    assert code == 0, stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    for name in ("o.jsonl", "e.jsonl"):
        for line in (tmp_path / name).read_text().splitlines():
            json.loads(line, parse_constant=no_constants)
    (line,) = read_lines(tmp_path / "e.jsonl")
    assert line["temperature"] is None and line["extra"] == [None, 1.5]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_an_unwritable_output_is_refused_before_the_model_loads(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    out = tmp_path / "o.jsonl"
    write_jsonl(out, [])
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        # A model that does not exist: were it loaded first, that would be the error.
        args = ["t.jsonl", "-o", "o.jsonl", *FLAGS, "--overwrite", "-m", "./no-such-model"]
        error = one_line(*run(forked, tmp_path, *args))
        assert "o.jsonl: cannot write it (Operation not permitted)" in error
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_messages_name_the_real_problem(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(3))
    assert run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS)[0] == 0
    (tmp_path / "o.jsonl.job.json").write_text("garbage\n")
    error = one_line(*run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--resume"))
    assert "o.jsonl.job.json is unreadable (not a pagedbatch job fingerprint)" in error
    (tmp_path / "ids.jsonl").write_text('{"id": 2.0, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    error = one_line(*run(forked, tmp_path, "ids.jsonl", "-o", "i.jsonl", *FLAGS))
    assert (
        "ids.jsonl: line 2: duplicate id 1 (first on line 1, whose 'id' 2.0 is not a string or "
        "an integer, so it is numbered by its line; fix that line's 'id')"
    ) in error


def _before_start(name: str) -> str:
    return f"error: stopped by {name} before the job started; nothing was written"


def _wait_for_handler(pid: int, sig: int, timeout: float = 120) -> None:
    """Wait until process `pid` catches `sig` (its handlers are installed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not install its handlers in {timeout} s")
