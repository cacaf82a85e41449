"""Torch's CPU threads: the CPUs a process may use, the default, --threads and presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
from job_helpers import ROOT, invoke, one_line_error, prompts, read_lines, tiny_args, write_jsonl

from pagedbatch.engine import threads
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.threads import busy_cpus, default_threads, usable_cpus
from pagedbatch.job.settings import resolve_settings


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cpu_count", "expected"),
    [
        ({0, 1, 2, 3}, None, 8, 4),  # the affinity set, not the machine's count
        ({0, 1, 2, 3}, "max 100000\n", 8, 4),  # no quota
        ({0, 1, 2, 3}, "200000 100000\n", 8, 2),  # a 2-CPU quota caps it
        ({0, 1, 2, 3}, "150000 100000\n", 8, 1),  # 1.5 CPUs round down
        ({0, 1}, "800000 100000\n", 8, 2),  # a quota above the affinity caps nothing
        ({0}, "50000 100000\n", 8, 1),  # at least 1
        (None, None, 8, 8),  # no affinity (macOS): the machine's count
        (None, None, None, 1),
        ({0, 1}, "not a quota", 8, 2),  # unreadable: ignored
    ],
)
def test_usable_cpus(affinity, cpu_max, cpu_count, expected):
    assert usable_cpus(affinity, cpu_max, cpu_count) == expected


@pytest.mark.parametrize(
    ("cpus", "busy", "expected"),
    [
        (2, 0.1, 2),  # idle: every CPU
        (2, 0.5, 2),  # half a core busy: rounds to none
        (2, 1.0, 1),  # another process holds one core
        (2, 7.0, 1),  # overloaded: still 1
        (16, 4.2, 12),
        (2, -1.0, 2),
    ],
)
def test_default_threads(cpus, busy, expected):
    assert default_threads(cpus, busy) == expected


# Two reads of /proc/stat 100 jiffies apart: cpu0 all busy (user+system), cpu1 all idle,
# cpu2 a quarter busy (iowait counts as idle; guest time is inside user time).
_BEFORE = """cpu  900 0 300 5000 10 0 0 0 0 0
cpu0 100 0 100 1000 0 0 0 0 0 0
cpu1 100 0 100 2000 10 0 0 0 0 0
cpu2 100 0 100 2000 0 0 0 0 50 0
intr 12345
"""
_AFTER = """cpu  1100 0 350 5150 20 0 0 0 0 0
cpu0 170 0 130 1000 0 0 0 0 0 0
cpu1 100 0 100 2090 20 0 0 0 0 0
cpu2 125 0 100 2065 10 0 0 0 75 0
intr 12399
"""


def test_busy_cpus_sums_the_non_idle_share_of_the_cpus_asked_about():
    assert busy_cpus(_BEFORE, _AFTER, None) == pytest.approx(1.25)
    assert busy_cpus(_BEFORE, _AFTER, {1, 2}) == pytest.approx(0.25)
    assert busy_cpus(_BEFORE, _AFTER, {0}) == pytest.approx(1.0)
    assert busy_cpus(_BEFORE, _BEFORE, None) == 0.0  # no time passed


# Says when it spins, then spins: a runnable process on our CPUs keeps at least one of
# them busy however loaded the machine is (others only add to what is busy).
_SPIN = "print('spinning', flush=True)\nwhile True: pass"


@pytest.mark.skipif(not threads.PROC_STAT.exists(), reason="needs /proc/stat")
def test_a_process_spinning_on_our_cpus_is_seen_busy(monkeypatch):
    monkeypatch.setattr(threads, "_last_sample", None)
    monkeypatch.setattr(threads, "SAMPLE_SECONDS", 0.5)
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == "spinning\n"
        assert threads.cpus_busy_elsewhere() >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_threads_given_win_and_omp_num_threads_is_respected(monkeypatch):
    assert EngineConfig(device="cpu", dtype="float32", threads=3).torch_threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert EngineConfig(device="cpu", dtype="float32").torch_threads is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert EngineConfig(device="cpu", dtype="float32").torch_threads >= 1


def test_zero_threads_is_refused():
    with pytest.raises(ValueError, match=r"threads must be >= 1, got 0; leave it unset"):
        EngineConfig(threads=0)
    message = one_line_error(invoke("in.jsonl", "--threads", "0"))
    assert "threads must be >= 1, got 0" in message


def test_a_preset_sets_threads_and_the_flag_wins(tmp_path):
    preset = tmp_path / "one.toml"
    preset.write_text('device = "cpu"\nthreads = 1\n')
    assert resolve_settings({}, str(preset)).engine.threads == 1
    assert resolve_settings({"threads": 2}, str(preset)).engine.threads == 2
    assert resolve_settings({}, "cpu").engine.threads is None


def test_help_shows_threads_and_its_default():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "--threads" in result.output and "OMP_NUM_THREADS" in result.output


# Runs `pagedbatch run ARGS` in a fresh process, then prints torch's thread count there.
_RUN_AND_REPORT_THREADS = """
import sys, torch
from pagedbatch.cli.app import app
torch.set_num_threads(3)  # not what the run asks for
try:
    app(["run", *sys.argv[1:]])
finally:
    print("threads", torch.get_num_threads())
"""


def test_run_with_threads_sets_torchs_thread_count(tmp_path, tiny_model_dirs):
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.jsonl"
    args = [source, "-o", out, *tiny_args(tiny_model_dirs["llama"], "--threads", "1")]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_THREADS, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "threads 1"
    assert sorted(line["id"] for line in read_lines(out)) == ["r000", "r001", "r002"]
