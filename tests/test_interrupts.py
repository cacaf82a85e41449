"""Killed, torn and interrupted jobs lose nothing finished and duplicate nothing.

The real-process tests start `pagedbatch run` (about 5 s of imports each), so they are
few and share one small job; each stops itself at an exact line before the test signals
it. The in-process ones send the signal from the job's own progress callback.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from job_helpers import (
    BIN,
    by_id,
    invoke,
    prompts,
    read_lines,
    resume_command,
    run_shell,
    start,
    tiny_args,
    write_jsonl,
)

from pagedbatch.cli.progress import JobProgress

NUM_RECORDS = 30


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dirs):
    """(directory, input name, flags, id -> line of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("job")
    write_jsonl(root / "in.jsonl", prompts(NUM_RECORDS))
    # Two sequences at a time: the job runs long enough to be interrupted mid-way.
    flags = tiny_args(tiny_model_dirs["llama"], "--max-num-seqs", "2", "--max-tokens", "12")
    result = invoke(root / "in.jsonl", "-o", root / "reference.jsonl", *flags)
    assert result.exit_code == 0, result.output
    return root, "in.jsonl", flags, by_id(read_lines(root / "reference.jsonl"))


# `pagedbatch run ARGS` that stops itself (SIGSTOP) as soon as its PAUSE-th line is written:
# the test signals it at that exact point, however slow or loaded the machine is.
_PAUSING_RUN = """
import os, signal, sys
from pagedbatch.cli.progress import JobProgress
pause, record_done, count = int(sys.argv[1]), JobProgress.record_done, 0
def counting(self, *args, **kwargs):
    global count
    record_done(self, *args, **kwargs)
    count += 1
    if count == pause:
        os.kill(os.getpid(), signal.SIGSTOP)
JobProgress.record_done = counting
sys.argv = ["pagedbatch", "run", *sys.argv[2:]]
from pagedbatch.cli.main import main
main()
"""


def start_pausing(args: list[str], cwd: Path, pause: int) -> subprocess.Popen:
    """`pagedbatch run ARGS` as a real process, returned once it has stopped itself with
    `pause` lines written (SIGCONT lets it go on)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_RUN, str(pause), *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 600  # only against a hang: a loaded start takes minutes
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        if process.poll() is not None:
            raise AssertionError(f"the job ended first: {process.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"the job did not write {pause} lines"
        time.sleep(0.01)
    return process


@dataclass
class Scenario:
    """What a real job went through: SIGKILLs, a torn line, SIGINT, then its resume command."""

    after_kill: bytes  # the output right after the mid-job SIGKILL
    sigint: subprocess.CompletedProcess  # the resumed run, stopped by SIGINT
    after_sigint: bytes
    resume: str  # the command it printed
    resumed: subprocess.CompletedProcess  # that command, run by the shell
    final: dict


@pytest.fixture(scope="module")
def scenario(job, tmp_path_factory) -> Scenario:
    root, src, flags, _ = job
    cwd = tmp_path_factory.mktemp("scenario")
    out = cwd / "out.jsonl"
    args = [str(root / src), "-o", "out.jsonl", *flags, "--resume"]
    process = start(args, cwd)
    process.kill()  # SIGKILL while starting: nothing written yet
    process.communicate(timeout=30)
    process = start_pausing(args, cwd, 4)
    process.kill()  # SIGKILL mid-job, its 4th line written
    process.communicate(timeout=30)
    after_kill = out.read_bytes()
    # As if the process had died in the middle of writing its last line:
    lines = after_kill.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    process = start_pausing(args, cwd, 4)  # resumed: 3 lines kept, 4 more written
    process.send_signal(signal.SIGINT)  # pending until it runs again
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=60)
    sigint = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    after_sigint = out.read_bytes()
    command = resume_command(stderr)
    resumed = run_shell(command, cwd)
    return Scenario(after_kill, sigint, after_sigint, command, resumed, by_id(read_lines(out)))


def test_sigkill_leaves_whole_lines(scenario):
    text = scenario.after_kill.decode()
    assert text.endswith("\n") and text.count("\n") == 4
    by_id([json.loads(line) for line in text.splitlines()])


def test_sigint_exits_130_with_a_valid_file_and_a_resume_command_that_works(scenario):
    sigint, resumed = scenario.sigint, scenario.resumed
    assert sigint.returncode == 130, sigint.stderr
    assert "Traceback" not in sigint.stderr
    written = by_id([json.loads(line) for line in scenario.after_sigint.decode().splitlines()])
    # 3 whole lines kept, 4 written before the signal, then at most the step's others
    assert scenario.after_sigint.endswith(b"\n") and 3 + 4 <= len(written) < NUM_RECORDS
    assert (
        f"Interrupted by SIGINT: {NUM_RECORDS - len(written)} records not run yet" in sigint.stderr
    )
    assert scenario.resume.endswith(" --resume") and "--output out.jsonl" in scenario.resume
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {len(written)} already done" in resumed.stderr


def test_after_kills_a_torn_line_and_sigint_the_file_equals_an_uninterrupted_run(job, scenario):
    assert scenario.final == job[3]  # every id once, the same text


def test_sigterm_in_process_exits_143_and_resumes(job, tmp_path, monkeypatch):
    root, src, flags, expected = job
    out = tmp_path / "out.jsonl"
    signal_after(monkeypatch, 3, signal.SIGTERM)
    result = invoke(root / src, "-o", out, *flags)
    assert result.exit_code == 143, result.output
    written = by_id(read_lines(out))
    assert 3 <= len(written) < NUM_RECORDS
    monkeypatch.undo()
    command = resume_command(result.stderr)
    result = invoke(*shlex.split(command)[2:])  # the printed command, minus `pagedbatch run`
    assert result.exit_code == 0, result.output
    assert by_id(read_lines(out)) == expected


def test_an_interrupted_input_order_file_is_a_prefix_and_resumes_exactly(
    job, tmp_path, monkeypatch
):
    root, src, flags, _ = job
    monkeypatch.setattr("pagedbatch.job.job.MIN_WINDOW", 8)
    flags = [*flags, "--order", "input"]
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert invoke(root / src, "-o", reference, *flags).exit_code == 0
    signal_after(monkeypatch, 3, signal.SIGTERM)
    assert invoke(root / src, "-o", out, *flags).exit_code == 143
    assert reference.read_bytes().startswith(out.read_bytes()) and out.read_bytes()
    monkeypatch.setattr(JobProgress, "record_done", lambda self, *args, **kwargs: None)
    assert invoke(root / src, "-o", out, *flags, "--resume").exit_code == 0
    assert out.read_bytes() == reference.read_bytes()


def test_a_second_signal_exits_at_once_on_a_whole_line(job, tmp_path, monkeypatch, capfd):
    root, src, flags, _ = job
    out = tmp_path / "out.jsonl"

    def exit_now(code):  # os._exit would end the test run too
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    signal_after(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    result = invoke(root / src, "-o", out, *flags)
    assert result.exit_code == 130
    assert len(read_lines(out)) == 3  # nothing after the second signal
    stderr = capfd.readouterr().err
    assert "SIGINT: stopping after the current step" in stderr
    assert f"SIGINT again: exiting now; {out} ends on a whole line" in stderr
    assert resume_command(stderr).endswith("--resume")


def signal_after(monkeypatch, records: int, *signums: int) -> None:
    """Send `signums` to this process as the job's `records`-th record is written."""
    count = 0
    record_done = JobProgress.record_done

    def counting(self: JobProgress, *args: int, **kwargs: bool) -> None:
        nonlocal count
        record_done(self, *args, **kwargs)
        count += 1
        if count == records:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(JobProgress, "record_done", counting)


_SIGNAL_AS_IT_ENDS = """
import os, signal, sys
import pagedbatch.cli.app

class HupOnFlush:  # stdout whose flush brings a SIGHUP: one that comes as the command ends
    def __init__(self, stream):
        self.stream = stream
    def flush(self):
        os.kill(os.getpid(), signal.SIGHUP)
        self.stream.flush()
    def __getattr__(self, name):
        return getattr(self.stream, name)

def stopped_job(prog_name):  # a job that a first SIGHUP stopped: exit 129
    raise SystemExit(129)

sys.stdout = HupOnFlush(sys.stdout)
pagedbatch.cli.app.app = stopped_job
from pagedbatch.cli.main import main
main()
"""


def test_a_signal_as_the_command_ends_keeps_its_exit_code():
    """A second SIGHUP 5 ms after the first used to hit main()'s final flush: an uncaught
    Stopped, a traceback and exit 1 instead of 129."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AS_IT_ENDS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 129, done.stderr
    assert done.stderr == "", done.stderr
