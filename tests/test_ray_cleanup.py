"""A `--ray` job's own local cluster goes with the job however it ends (ray/watchdog.py).

Its own module: Ray's "auto" joins any cluster running on this machine (it looks for GCS
processes), so no cluster of the test process (tests/test_ray.py's) may be running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from job_helpers import write_jsonl


def _rows() -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"Here is story number {i}:"} for i in range(96)]


def _ray_below(pid: int) -> dict[int, float]:
    """The Ray processes below process `pid`: pid -> start time."""
    import psutil

    found = {}
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ray" in " ".join(process.cmdline()):
                found[process.pid] = process.create_time()
    return found


def _running(processes: dict[int, float]) -> list[str]:
    """Those of `processes` still running (zombies are gone but for their parent's wait)."""
    import psutil

    left = []
    for pid, started in processes.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process.name())
    return left


@pytest.mark.parametrize(
    ("when", "how"),
    [("loading", signal.SIGKILL), ("generating", signal.SIGKILL), ("loading", signal.SIGINT)],
)
def test_a_killed_driver_leaves_no_process_of_its_own_cluster(tmp_path, tiny_model_dirs, when, how):
    """kill -9 (or Ctrl-C) of a `--ray` job that started its own local cluster, while its
    replica loads or generates: Ray stops the GCS and raylet with it, and the job's
    watchdog the agents (they used to wait 1-2 min)."""
    pytest.importorskip("ray")
    import psutil

    write_jsonl(tmp_path / "in.jsonl", _rows())
    # A temp dir of its own: no other cluster's address file for "auto" to read.
    ray_dir = tempfile.mkdtemp(prefix="pbray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --ray looks
    env["RAY_TMPDIR"] = ray_dir
    args = [sys.executable, "-m", "pagedbatch", "run", "in.jsonl", "-o", "out.jsonl",
            "-m", str(tiny_model_dirs["llama"]), "--device", "cpu", "--threads", "1",
            "--max-tokens", "64", "--max-num-seqs", "2", "--no-progress", "--ray",
            "--replicas", "1"]  # fmt: skip
    driver = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and driver.poll() is None:
            cluster = _ray_below(driver.pid)
            names = " ".join(psutil.Process(p).name() for p in cluster if psutil.pid_exists(p))
            ready = "DashboardAgent" in names and "ray::Replica" in names  # loading
            if when == "generating":
                out = tmp_path / "out.jsonl"
                ready = ready and out.exists() and out.stat().st_size > 0
            if ready:
                break
            time.sleep(0.2)
        else:
            pytest.fail(
                f"the job did not get to {when} on a cluster of its own (Ray's auto joins any "
                f"cluster running on this machine): {driver.stderr.read()[-2000:]}"
            )
        cluster = _ray_below(driver.pid)  # the agents, the GCS, the raylet, the replica
        os.kill(driver.pid, how)
        driver.wait(timeout=60)
        deadline = time.monotonic() + 15
        while (left := _running(cluster)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running 15 s after the kill: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
