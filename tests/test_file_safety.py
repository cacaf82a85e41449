"""A job never hurts its user's files: real processes, real files, real signals.

Each test runs the `pagedbatch` command as a process of its own (forked by
tests/fork_server.py, which has done the imports once; `start` for a fresh interpreter
where start-up itself is under test) and checks the exit code, the one line on stderr
and the bytes of every file before and after.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import json
import os
import shutil
import signal
import socket
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
    write_jsonl(tmp_path / "r.memory.json", rows(2))  # what --memory-report -o r.jsonl writes
    before = snapshot(tmp_path)
    cases = [
        (["same.jsonl", "-o", "same.jsonl", "--overwrite"], "the output same.jsonl is the same file as the input same.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "o.jsonl", "--errors", "s2.jsonl", "--overwrite"], "the errors file s2.jsonl is the same file as the input s2.jsonl"),  # noqa: E501
        (["same.jsonl", "-o", "link.jsonl", "--resume", "--force"], "the output link.jsonl is the same file as the input same.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "hard.jsonl", "--overwrite"], "the output hard.jsonl is the same file as the input s2.jsonl"),  # noqa: E501
        (["same.jsonl", "-o", "o.jsonl", "--errors", "o.jsonl"], "the errors file o.jsonl is the same file as the output o.jsonl"),  # noqa: E501
        (["s2.jsonl", "-o", "o.jsonl", "--errors", "o.jsonl.job.json"], "the fingerprint o.jsonl.job.json is the same file as the errors file o.jsonl.job.json; give the errors file another path"),  # noqa: E501
        (["data", "-o", "data/out.jsonl"], "the output data/out.jsonl is inside the input directory data"),  # noqa: E501
        (["same.jsonl", "-o", "same.jsonl", "--resume", "--force"], "the output same.jsonl is the same file as the input same.jsonl"),  # noqa: E501
        (["r.memory.json", "-o", "r.jsonl", "--memory-report"], "the memory report r.memory.json is the same file as the input r.memory.json; give the output another path"),  # noqa: E501
        (["same.jsonl", "-o", "o.jsonl", "--errors", "o.jsonl.lock"], "the output's lock file o.jsonl.lock is the same file as the errors file o.jsonl.lock; give the errors file another path"),  # noqa: E501
        (["same.jsonl", "-o", "-"], "the output cannot be stdout ('-'): it is a file that --resume reads back"),  # noqa: E501
        (["same.jsonl", "-o", "o.jsonl", "--errors", "-"], "the errors file cannot be stdout ('-')"),  # noqa: E501
        (["same.jsonl", "-o", "data"], "the output data is a directory, not a regular file"),
    ]  # fmt: skip
    for args, message in cases:
        code, stderr = run(forked, tmp_path, *args, *FLAGS)
        assert message in one_line(code, stderr), args
        assert snapshot(tmp_path) == before, args  # nothing written, nothing left behind


def test_a_leftover_temporary_file_is_not_written_through(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [*rows(2), {"id": "bad", "prompt": 5}])
    data = (tmp_path / "t.jsonl").read_bytes()
    # The files written whole are written beside their place first (<name>.tmp), then renamed.
    for name in ("o.jsonl.job.json.tmp", "e.jsonl.tmp"):
        (tmp_path / name).symlink_to("t.jsonl")
    args = ["t.jsonl", "-o", "o.jsonl", "--errors", "e.jsonl", *FLAGS]
    code, stderr = run(forked, tmp_path, *args)
    assert code == 0, stderr
    assert (tmp_path / "t.jsonl").read_bytes() == data
    assert [line["id"] for line in read_lines(tmp_path / "e.jsonl")] == ["bad"]
    assert json.loads((tmp_path / "o.jsonl.job.json").read_text())["input_path"].endswith("t.jsonl")


def test_resume_force_does_not_cut_a_file_pagedbatch_did_not_write(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    (tmp_path / "notes.txt").write_bytes(b"my notes, one line without a newline")
    before = snapshot(tmp_path)
    for flags in (["--resume", "--force"], ["--overwrite"]):
        error = one_line(*run(forked, tmp_path, "t.jsonl", "-o", "notes.txt", *FLAGS, *flags))
        assert "notes.txt: line 1 (the last, without a newline) is not the start of a" in error
        assert "give another output path; pagedbatch does not replace it" in error
        assert snapshot(tmp_path) == before


def test_resume_does_not_replace_a_file_that_is_not_an_errors_file(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [*rows(2), {"id": "bad", "prompt": 5}])
    args = ["t.jsonl", "-o", "o.jsonl", *FLAGS]
    assert run(forked, tmp_path, *args, "--errors", "e.jsonl")[0] == 0
    write_jsonl(tmp_path / "notes.jsonl", [{"id": "mine", "text": "not pagedbatch's"}])
    before = snapshot(tmp_path)
    error = one_line(*run(forked, tmp_path, *args, "--resume", "--errors", "notes.jsonl"))
    assert (
        "notes.jsonl: line 1 is not a failed record's line (each holds 'pagedbatch_error')" in error
    )
    assert "give another --errors path" in error
    assert snapshot(tmp_path) == before
    with (tmp_path / "e.jsonl").open("ab") as f:
        f.write(b'{"id": "bad", "pro')  # a killed writer's torn line is the job's own
    code, stderr = run(forked, tmp_path, *args, "--resume", "--errors", "e.jsonl")
    assert code == 0 and "Nothing to do" in stderr, stderr
    assert [line["id"] for line in read_lines(tmp_path / "e.jsonl")] == ["bad"]  # rebuilt


def test_files_rewritten_whole_keep_their_permissions(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [*rows(2), {"id": "bad", "prompt": 5}])
    args = ["t.jsonl", "-o", "o.jsonl", "--errors", "e.jsonl", *FLAGS]
    assert run(forked, tmp_path, *args)[0] == 0
    for name in ("o.jsonl", "e.jsonl"):
        (tmp_path / name).chmod(0o600)  # private results
    code, stderr = run(forked, tmp_path, *args, "--retry-errors")  # both are rewritten
    assert code == 0 and "Wrote 1 record" in stderr, stderr
    for name in ("o.jsonl", "e.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name


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
    bad = {  # id: (overrides, what the error says)
        "seed_1e29": ({"seed": 10**29, "temperature": 0.5}, "seed must be <= 18446744073709551615"),
        "seed_2_64": ({"seed": 2**64, "temperature": 0.5}, "seed must be <= 18446744073709551615"),
        "seed_neg": ({"seed": -1}, "seed must be >= 0, got -1"),
        "seed_1e30": ({"seed": 1e30}, "seed must be an integer, got 1e+30"),
        "seed_true": ({"seed": True}, "seed must be an integer, got True"),
        "seed_str": ({"seed": "3"}, "seed must be an integer, got '3'"),
        "top_k": ({"top_k": 2**70, "temperature": 0.5}, "top_k must be <= 9223372036854775807"),
        "top_k_2_63": ({"top_k": 2**63}, "top_k must be <= 9223372036854775807"),
        "temperature": ({"temperature": 10**400}, "temperature must be a finite number"),
        "top_p_neg0": ({"top_p": -0.0}, "top_p must be in (0, 1], got -0.0"),
        "n": ({"n": 2**63}, "n must be <= 4096"),
        "n_1e9": ({"n": 10**9}, "n must be <= 4096, got 1000000000"),
        "max_tokens": ({"max_tokens": 2**63}, "max_tokens must be <= 9223372036854775807"),
        "logprobs": ({"logprobs": 2**31}, "logprobs must be <= 20, got 2147483648"),
    }
    good = {
        "seed_max": {"seed": 2**64 - 1, "temperature": 0.5},
        "stop_10k": {"stop": [f"never{i}" for i in range(10_000)]},
        "tiny_temperature": {"temperature": 1e-320},
        "n_4096": {"n": 4096, "max_tokens": 1},
    }
    records = [{"id": rid, "prompt": "Hi", **v} for rid, (v, _) in bad.items()]
    records += [{"id": rid, "prompt": "Hi", **v} for rid, v in good.items()]
    text = "".join(json.dumps(r) + "\n" for r in records)
    # JSON numbers Python reads as NaN and infinity, and one past the engine's token budget.
    text += '{"id": "seed_nan", "prompt": "Hi", "seed": NaN}\n'
    text += '{"id": "temperature_1e309", "prompt": "Hi", "temperature": 1e309}\n'
    text += f'{{"id": "max_tokens_2_40", "prompt": "Hi", "max_tokens": {2**40}}}\n'
    (tmp_path / "t.jsonl").write_text(text)
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS)
    assert code == 0 and "Traceback" not in stderr, stderr
    lines = by_id(read_lines(tmp_path / "o.jsonl"))
    assert {rid for rid, line in lines.items() if "choices" in line} == set(good)
    assert len(lines["n_4096"]["choices"]) == 4096
    for rid, (_, message) in bad.items():
        assert lines[rid]["error"]["code"] == "invalid_params", rid
        assert message in lines[rid]["error"]["message"], rid
    assert "seed must be an integer, got nan" in lines["seed_nan"]["error"]["message"]
    assert "got inf" in lines["temperature_1e309"]["error"]["message"]
    assert lines["max_tokens_2_40"]["error"]["code"] == "prompt_too_long"
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--retry-errors")
    assert code == 0 and f"Wrote {len(bad) + 3} records" in stderr, stderr  # the same errors


def test_fifos_devices_and_sockets_are_refused_without_being_opened(forked, tmp_path):
    os.mkfifo(tmp_path / "f.jsonl")  # nobody writes: opening it to read would block
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    (tmp_path / "full.jsonl").symlink_to("/dev/full")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s.jsonl"))
    cases = [
        (["f.jsonl", "-o", "o.jsonl"], "f.jsonl is a FIFO (named pipe), not a regular file"),
        (["s.jsonl", "-o", "o.jsonl"], "s.jsonl is a socket, not a regular file"),
        (["t.jsonl", "-o", "full.jsonl", "--resume"], "the output full.jsonl is a character device"),  # noqa: E501
        (["t.jsonl", "-o", "f.jsonl", "--resume"], "the output f.jsonl is a FIFO (named pipe)"),
        (["t.jsonl", "-o", "s.jsonl"], "the output s.jsonl is a socket, not a regular file"),
        (["t.jsonl", "-o", "o.jsonl", "--errors", "/dev/null"], "the errors file /dev/null is a character device"),  # noqa: E501
        (["t.jsonl", "-o", "o.jsonl", "--errors", "f.jsonl"], "the errors file f.jsonl is a FIFO"),  # noqa: E501
        (["t.jsonl", "-o", "o.jsonl", "--errors", "s.jsonl"], "the errors file s.jsonl is a socket"),  # noqa: E501
    ]  # fmt: skip
    try:
        for args, message in cases:
            assert message in one_line(*run(forked, tmp_path, *args, *FLAGS)), args
    finally:
        server.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "f.jsonl", "full.jsonl", "s.jsonl", "t.jsonl",
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
    (tmp_path / "sealed").mkdir()
    immutable = [tmp_path / "o.jsonl", tmp_path / "e.jsonl", tmp_path / "sealed"]
    for path in immutable[:2]:
        write_jsonl(path, [])
    if subprocess.run(["chattr", "+i", *map(str, immutable)], capture_output=True).returncode:
        subprocess.run(["chattr", "-i", *map(str, immutable)], capture_output=True)
        pytest.skip("chattr +i is not permitted here")
    # A model that does not exist: were it loaded first, that would be the error.
    flags = [*FLAGS, "--overwrite", "-m", "./no-such-model"]
    cases = [
        (["-o", "o.jsonl"], "o.jsonl: cannot write it (Operation not permitted)"),
        (["-o", "p.jsonl", "--errors", "e.jsonl"], "e.jsonl: cannot write it (Operation not permitted)"),  # noqa: E501
        (["-o", "sealed/o.jsonl"], "sealed/o.jsonl.lock: cannot create the lock file (Operation not permitted)"),  # noqa: E501
    ]  # fmt: skip
    try:
        before = snapshot(tmp_path)
        for args, message in cases:
            assert message in one_line(*run(forked, tmp_path, "t.jsonl", *args, *flags)), args
            assert snapshot(tmp_path) == before
    finally:
        subprocess.run(["chattr", "-i", *map(str, immutable)], check=True)


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_files_written_whole_in_a_sealed_directory_are_refused_before_the_model_loads(
    forked, tmp_path
):
    """An immutable directory holding the output, its lock and its fingerprint: appending
    works there, creating a file does not. The errors file (rebuilt), the output on
    --retry-errors (its error lines dropped) and the memory report are written through new
    files: each used to fail once the job had run (a traceback after the last line for the
    memory report)."""
    records = rows(4)
    records[1]["max_tokens"] = -1  # an error line
    write_jsonl(tmp_path / "t.jsonl", records)
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    job = ["t.jsonl", "-o", "sealed/o.jsonl", "--errors", "sealed/e.jsonl", *FLAGS]
    assert run(forked, tmp_path, *job)[0] == 0
    lines = (sealed / "o.jsonl").read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if b'"r003"' not in line]  # r003 is left to run
    (sealed / "o.jsonl").write_bytes(b"".join(kept))
    for lock in ("o.jsonl.lock", "e.jsonl.lock"):
        (sealed / lock).write_text("")  # as a killed job leaves them
    if subprocess.run(["chattr", "+i", str(sealed)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    sealed_off = "cannot write it (no new file can be created in sealed: Operation not permitted)"
    cases = [
        ([*job, "--resume"], f"sealed/e.jsonl: {sealed_off}"),
        ([*job[:3], *FLAGS, "--retry-errors"], f"sealed/o.jsonl: {sealed_off}"),
        ([*job[:3], *FLAGS, "--resume", "--memory-report"], f"sealed/o.memory.json: {sealed_off}"),
    ]

    def files() -> dict[str, bytes]:  # (a lock file holds its last owner's pid)
        return {name: data for name, data in snapshot(sealed).items() if ".lock" not in name}

    try:
        before = files()
        for args, message in cases:
            error = one_line(*run(forked, tmp_path, *args))  # exit 2: before the model loads
            assert error == f"error: {message}", args
            assert files() == before
    finally:
        subprocess.run(["chattr", "-i", str(sealed)], check=True)


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


def test_a_changed_input_is_explained_and_an_appended_one_resumed(forked, tmp_path):
    records = rows(6)
    write_jsonl(tmp_path / "t.jsonl", records[:4])
    assert run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS)[0] == 0
    done = (tmp_path / "o.jsonl").read_bytes()
    write_jsonl(tmp_path / "t.jsonl", [records[0], {**records[1], "prompt": "new"}, *records[2:4]])
    before = snapshot(tmp_path)
    error = one_line(*run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--resume"))
    assert "o.jsonl was written from another version of t.jsonl: 1 record it holds" in error
    assert "changed ('r001'); restore them, pass --force" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before
    write_jsonl(tmp_path / "t.jsonl", records)  # restored, and two records appended
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--resume")
    assert code == 0, stderr
    assert "none of the 4 records it holds did: 2 to run" in stderr and "Wrote 2 records" in stderr
    out = (tmp_path / "o.jsonl").read_bytes()
    assert out.startswith(done) and len(by_id(read_lines(tmp_path / "o.jsonl"))) == 6
    stored = json.loads((tmp_path / "o.jsonl.job.json").read_text())
    assert len(base64.b64decode(stored["record_digests"])) == 6 * 8  # now covers all six
    code, stderr = run(forked, tmp_path, "t.jsonl", "-o", "o.jsonl", *FLAGS, "--resume")
    assert code == 0 and "Nothing to do" in stderr, stderr


def test_an_input_appended_to_while_the_job_runs(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(30))
    args = ["t.jsonl", "-o", "o.jsonl", *FLAGS, "--max-num-seqs", "1"]
    child = forked.start(["run", *args], tmp_path)
    child.poll_lines(tmp_path / "o.jsonl", 2)
    with (tmp_path / "t.jsonl").open("a") as f:
        f.write(json.dumps({"id": "late", "prompt": "appended while it ran"}) + "\n")
    code, stderr = child.wait()
    if code != 0:  # it read a record again after the append (else it had read them all)
        error = one_line(code, stderr, expected=1)
        assert "t.jsonl: changed while the job ran" in error
        assert "the lines before are safe. Resume with: pagedbatch run t.jsonl" in error
    lines = read_lines(tmp_path / "o.jsonl")
    assert len(by_id(lines)) == len(lines) <= 30  # whole lines, each id once, none appended
    code, stderr = run(forked, tmp_path, *args, "--resume")
    assert code == 0, stderr
    assert set(by_id(read_lines(tmp_path / "o.jsonl"))) == {r["id"] for r in rows(30)} | {"late"}


def test_a_full_disk_under_the_errors_file_names_it_and_the_job_resumes(forked, tmp_path):
    failing = [{"id": f"f{i}", "prompt": "x" * 4000, "max_tokens": -1} for i in range(6)]
    write_jsonl(tmp_path / "t.jsonl", [*failing, *rows(3)])
    args = ["t.jsonl", "-o", "o.jsonl", "--errors", "e.jsonl", *FLAGS, "--order", "input"]
    # Each errors line holds its 4 kB prompt; the output's lines are short.
    code, stderr = run(forked, tmp_path, *args, fsize=10_000)
    error = one_line(code, stderr, expected=1)
    assert "cannot write e.jsonl: File too large; the lines before are safe" in error
    assert "Resume with: pagedbatch run t.jsonl" in error
    assert len(read_lines(tmp_path / "e.jsonl")) == 2  # whole lines only
    code, stderr = run(forked, tmp_path, *args, "--resume")
    assert code == 0, stderr
    assert len(by_id(read_lines(tmp_path / "o.jsonl"))) == 9
    quarantined = by_id(read_lines(tmp_path / "e.jsonl"))
    assert sorted(quarantined) == [r["id"] for r in failing]  # exactly the failed records
    assert all(line["prompt"] == "x" * 4000 for line in quarantined.values())


def test_odd_but_valid_inputs_run_and_resume(forked, tmp_path):
    lines = [
        {"id": 2**80, "prompt": "a huge integer id"},
        {"id": "", "prompt": "an empty id"},
        {"id": "len31", "prompt": "a" * 31},  # the context is 32: one token to generate
        {"id": "len32", "prompt": "a" * 32},  # exactly the context: no room to generate
        {"id": "big", "prompt": "x" * 5_000_000},  # a 5 MB line
    ]
    text = "\r\n".join(json.dumps(line) for line in lines) + "\r\n"
    data = codecs.BOM_UTF8 + b"\r\n" * 100_000 + text.encode()
    (tmp_path / "odd.jsonl").write_bytes(data)
    args = ["odd.jsonl", "-o", "o.jsonl", *FLAGS, "--max-model-len", "32", "--max-tokens", "4"]
    code, stderr = run(forked, tmp_path, *args)
    assert code == 0, stderr
    out = by_id(read_lines(tmp_path / "o.jsonl"))
    assert sorted(out, key=str) == sorted((line["id"] for line in lines), key=str)
    assert out["len31"]["usage"]["completion_tokens"] == 1
    assert out["len32"]["error"]["message"] == "the prompt has 32 tokens; the model's context is 32"
    assert out["big"]["error"]["code"] == "prompt_too_long"
    assert "choices" in out[2**80] and "choices" in out[""]
    code, stderr = run(forked, tmp_path, *args, "--resume")
    assert code == 0 and "Nothing to do: all 5 records" in stderr, stderr
    assert (tmp_path / "odd.jsonl").read_bytes() == data


def test_odd_settings_and_files_are_a_result_or_one_line(forked, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(3))
    write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "prompt": "word " * 100}])
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress((tmp_path / "t.jsonl").read_bytes()))
    (tmp_path / "u16.jsonl").write_bytes((tmp_path / "t.jsonl").read_text().encode("utf-16"))
    before = snapshot(tmp_path)
    refused = [
        (["t.jsonl", "--block-size", "3"], "block_size must be a power of two, got 3"),
        (["t.jsonl", "--kv-memory", "0"], "kv_memory must be positive, got '0'"),
        (["t.jsonl", "--kv-memory", "100TiB"], "the KV cache would take 102,400.0 GiB but cpu has"),  # noqa: E501
        (["t.jsonl.gz"], "t.jsonl.gz: unsupported file type '.gz'"),
        (["u16.jsonl"], "u16.jsonl: line 1: not valid UTF-8"),
    ]
    for args, message in refused:
        flags = [f for f in FLAGS if f != "64" and f != "--num-blocks"]
        code, stderr = run(forked, tmp_path, *args, "-o", "o.jsonl", *flags)
        assert message in one_line(code, stderr), args
        assert snapshot(tmp_path) == before, args
    code, stderr = run(forked, tmp_path, "long.jsonl", "-o", "l.jsonl", *FLAGS, "--num-blocks", "1")
    assert code == 0, stderr
    assert read_lines(tmp_path / "l.jsonl")[0]["error"]["code"] == "prompt_too_long"
    code, stderr = run(
        forked, tmp_path, "t.jsonl", "-o", "m.jsonl", *FLAGS, "--max-batch-tokens", "1"
    )
    assert code == 0 and len(by_id(read_lines(tmp_path / "m.jsonl"))) == 3, stderr
    for _ in range(2):  # a first run, then nothing to do
        code, stderr = run(
            forked, tmp_path, "t.jsonl", "-o", "r.jsonl", *FLAGS, "--retry-errors", "--force"
        )
        assert code == 0 and len(by_id(read_lines(tmp_path / "r.jsonl"))) == 3, stderr
    assert "Nothing to do" in stderr


def test_a_parquet_file_with_nested_columns(forked, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "id": ["a", "b"], "prompt": ["hi", "yo"],
        "meta": [{"x": [1, 2], "y": {"z": "q"}}, {"x": [], "y": {"z": "r"}}],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "nested.parquet")
    code, stderr = run(
        forked, tmp_path, "nested.parquet", "-o", "o.jsonl", *FLAGS, "--errors", "e.jsonl"
    )
    assert code == 0, stderr
    assert sorted(by_id(read_lines(tmp_path / "o.jsonl"))) == ["a", "b"]
    code, stderr = run(forked, tmp_path, "nested.parquet", "-o", "o.jsonl", *FLAGS, "--resume")
    assert code == 0 and "Nothing to do" in stderr, stderr


def test_a_table_is_fingerprinted_by_the_rows_it_read_not_by_its_file(forked, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": [r["id"] for r in rows(4)], "prompt": [r["prompt"] for r in rows(4)]})
    pq.write_table(table, tmp_path / "t.parquet", compression="snappy")
    assert run(forked, tmp_path, "t.parquet", "-o", "o.jsonl", *FLAGS)[0] == 0
    stored = json.loads((tmp_path / "o.jsonl.job.json").read_text())
    # Other bytes, the same rows: the same input (a whole-file hash would call it changed).
    old = (tmp_path / "t.parquet").read_bytes()
    pq.write_table(table, tmp_path / "t.parquet", compression="gzip", row_group_size=2)
    assert (tmp_path / "t.parquet").read_bytes() != old
    code, stderr = run(forked, tmp_path, "t.parquet", "-o", "o.jsonl", *FLAGS, "--resume")
    assert code == 0 and "Nothing to do" in stderr, stderr
    assert json.loads((tmp_path / "o.jsonl.job.json").read_text())["input"] == stored["input"]
    changed = table.set_column(1, "prompt", pa.array(["a", "story number 1", "c", "d"][:4]))
    pq.write_table(changed, tmp_path / "t.parquet")
    error = one_line(*run(forked, tmp_path, "t.parquet", "-o", "o.jsonl", *FLAGS, "--resume"))
    assert "3 records it holds changed ('r000', 'r002', 'r003')" in error, error


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
