"""A CPU job's KV pool is sized from the job (engine/job_pool.py): `run` allocates what
`plan` reports, far below the default, and writes the same lines as the default pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from job_helpers import BIN, by_id, read_lines, write_jsonl

from pagedbatch.cli.plan import kv_blocks
from pagedbatch.job.settings import resolve_settings
from pagedbatch.models.loader import load_tokenizer_and_config

INSTRUCTION = "Read the review below and say in one word whether it is kind or not. " * 3


def _records() -> list[dict]:
    rows = [{"id": f"r{i:02d}", "prompt": f"{INSTRUCTION}Review {i}: fine {i}"} for i in range(24)]
    rows.append({"id": "n2", "prompt": f"{INSTRUCTION}Review two samples", "n": 2})
    rows.append({"id": "c", "prompt": f"{INSTRUCTION}Choose", "choices": ["kind", "not kind"]})
    return rows


def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`pagedbatch ARGS` as a real process."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "pagedbatch", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cpu_pool_is_sized_from_the_job(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    data = write_jsonl(tmp_path / "in.jsonl", _records())
    flags = ["-m", model, "--device", "cpu", "--dtype", "float32", "--max-tokens", "6",
             "--threads", "1"]  # fmt: skip
    planned = _cli("plan", data, *flags, "--json", "--no-estimate", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    engine = resolve_settings({"model": str(model), "device": "cpu"}).engine
    default = kv_blocks(engine, load_tokenizer_and_config(str(model))[1])
    assert plan["pool_from_job"] and plan["num_blocks"] < default / 100

    fitted = _cli("run", data, "-o", "fit.jsonl", *flags, "--no-progress", "--memory-report",
                  cwd=tmp_path)  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    report = json.loads((tmp_path / "fit.memory.json").read_text())
    assert report["num_blocks"] == plan["num_blocks"]
    assert report["preemptions"] == 0 and report["evictions"] == 0
    assert f"/{plan['num_blocks']}," in fitted.stderr  # the summary's peak KV blocks x/N

    # The default pool, by count: the same lines, the same prefix hits.
    whole = _cli("run", data, "-o", "whole.jsonl", *flags, "--no-progress", "--num-blocks",
                 default, "--memory-report", cwd=tmp_path)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    assert json.loads((tmp_path / "whole.memory.json").read_text())["num_blocks"] == default
    lines, expected = (
        by_id(read_lines(tmp_path / "fit.jsonl")),
        by_id(read_lines(tmp_path / "whole.jsonl")),
    )
    assert lines == expected


def test_a_given_pool_is_kept(tmp_path, tiny_model_dirs):
    data = write_jsonl(tmp_path / "in.jsonl", _records()[:3])
    flags = ["-m", tiny_model_dirs["llama"], "--device", "cpu", "--max-tokens", "2"]
    for given, blocks in ((["--num-blocks", "777"], 777), (["--kv-memory", "1MiB"], None)):
        planned = _cli("plan", data, *flags, *given, "--json", "--no-estimate", cwd=tmp_path)
        plan = json.loads(planned.stdout)
        assert not plan["pool_from_job"]
        if blocks is not None:
            assert plan["num_blocks"] == blocks
