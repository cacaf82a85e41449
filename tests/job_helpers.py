"""Helpers of the job tests: run the CLI in process or as a real process, read outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from pagedbatch.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: holds the `pagedbatch` script


def invoke(*args: object):
    """`pagedbatch run ARGS` in this process; the CliRunner result."""
    return CliRunner().invoke(app, ["run", *map(str, args)])


def tiny_args(model_dir: Path, *extra: object) -> list[str]:
    """Flags of a fast job on a tiny model: a small KV cache, greedy, 8 tokens, float32
    (whose tokens do not depend on how the steps batched the records)."""
    return [
        "-m", str(model_dir), "--device", "cpu", "--dtype", "float32", "--num-blocks", "64",
        "--max-tokens", "8", "--no-progress", *map(str, extra),
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prompts(n: int, words: int = 3) -> list[dict]:
    """n plain records with distinct prompts and string ids r000, r001, ..."""
    return [{"id": f"r{i:03d}", "prompt": f"story number {i} " * words} for i in range(n)]


def read_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, each of which must be a whole JSON line."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the file must end on a whole line"
    return [json.loads(line) for line in text.splitlines()]


def by_id(lines: list[dict]) -> dict:
    """id -> line, checking that every id is there once."""
    ids = [line.get("custom_id", line.get("id")) for line in lines]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(ids, key=str)}"
    return dict(zip(ids, lines))


def one_line_error(result, code: int = 2) -> str:
    """The error the command printed: exactly one line, no traceback."""
    assert result.exit_code == code, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`pagedbatch run ARGS` as a real process (its own process group), output piped."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "pagedbatch", "run", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A printed command line, run by the shell with the venv's scripts on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 600) -> int:
    """Wait until `path` holds at least `count` newlines; returns how many it holds. (The
    timeout only stops a hang: a loaded machine may take minutes to start the job.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines >= count:
            return lines
        if process.poll() is not None:
            raise AssertionError(f"the job ended first: {process.communicate()[1][-2000:]}")
        time.sleep(0.005)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout} s")


def resume_command(stderr: str) -> str:
    """The command printed after 'Resume with:'."""
    lines = stderr.splitlines()
    index = next(i for i, line in enumerate(lines) if "Resume with:" in line)
    command = lines[index].split("Resume with:", 1)[1].strip() or lines[index + 1].strip()
    assert command.startswith("pagedbatch run "), command
    return command


class Forked:
    """Real `pagedbatch` processes forked by tests/fork_server.py (imports paid once)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fork_server.py")], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def start(
        self, args: list[object], cwd: Path, *, stderr: bool = True, fsize: int | None = None
    ) -> ForkedRun:
        """`pagedbatch ARGS` in `cwd`; without `stderr`, its stderr is a pipe nobody reads;
        `fsize`: no file it writes may grow past that many bytes (a full disk)."""
        err = cwd / f".stderr.{time.monotonic_ns()}"
        request = {
            "run": [str(a) for a in args], "cwd": str(cwd), "out": os.devnull,
            "err": str(err) if stderr else None, "fsize": fsize,
        }  # fmt: skip
        return ForkedRun(self, int(self._ask(request)), err)

    def run(self, args: list[object], cwd: Path, **kwargs: Any) -> tuple[int, str]:
        """(exit code, stderr) of `pagedbatch ARGS`, run to its end."""
        return self.start(args, cwd, **kwargs).wait()

    def _ask(self, request: dict) -> str:
        assert self._server.stdin is not None and self._server.stdout is not None
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        return self._server.stdout.readline().strip()

    def close(self) -> None:
        assert self._server.stdin is not None
        self._server.stdin.close()
        self._server.wait(timeout=60)


class ForkedRun:
    def __init__(self, server: Forked, pid: int, err: Path) -> None:
        self.server, self.pid, self._err = server, pid, err

    def wait(self) -> tuple[int, str]:
        """(exit code, -N when killed by signal N; stderr)."""
        code = int(self.server._ask({"wait": self.pid}))
        text = self._err.read_text() if self._err.exists() else ""
        self._err.unlink(missing_ok=True)
        return code, text

    def poll_lines(self, path: Path, count: int, timeout: float = 600) -> bool:
        """Wait until `path` holds `count` newlines: True, or False when the child ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_bytes().count(b"\n") >= count:
                return True
            if self.ended():
                return False
            time.sleep(0.002)
        raise AssertionError(f"{path} did not reach {count} lines in {timeout} s")

    def ended(self) -> bool:
        """Whether the child has exited (it stays a zombie until `wait`)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
