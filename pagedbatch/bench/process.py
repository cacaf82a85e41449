"""The `run` contender of `pagedbatch bench`: the whole `pagedbatch run` command in a child
process (interpreter, load, job, output file), as a user starts it; and what a pagedbatch
contender is given."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pagedbatch.bench.result import BenchResult
from pagedbatch.engine.config import EngineConfig
from pagedbatch.requests.records import Record


def engine_given(config: EngineConfig, num_blocks: int | str | None) -> dict[str, Any]:
    """What pagedbatch is given: its budgets per step, its cache, the order it admits in."""
    return {
        "max_num_seqs": config.max_num_seqs,
        "max_batch_tokens": config.max_batch_tokens,
        "num_blocks": num_blocks,
        "block_size": config.block_size,
        "order": "by prompt token ids" if config.prefix_sharing else "input order",
        "cascade": config.cascade,
    }


def pagedbatch_process(records: list[Record], max_tokens: int, engine: EngineConfig) -> BenchResult:
    """The whole `pagedbatch run` command as a user starts it: interpreter, load, job.

    Its settings go in a TOML config (`run` has no flag for ignore_eos)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out, config = (Path(tmp) / n for n in ("in.jsonl", "out.jsonl", "bench.toml"))
        source.write_text("".join(json.dumps(_as_line(r)) + "\n" for r in records))
        config.write_text(_run_config(engine, max_tokens))
        command = [
            sys.executable, "-m", "pagedbatch", "run", str(source), "--config", str(config),
            "--no-progress", "--output", str(out),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"`pagedbatch run` failed ({shlex.join(command)}): {done.stderr}")
        lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    tokens = {row.get("id"): row.get("usage", {}).get("completion_tokens", 0) for row in rows}
    errors = [f"record {row.get('id')}: {row['error']}" for row in rows if row.get("error")]
    if len(rows) != len(records) and not errors:
        errors.append(f"wrote {len(rows)} lines for {len(records)} records")
    produced = [tokens.get(r.id, 0) for r in records]
    requested = [max_tokens] * len(records)
    given = engine_given(engine, engine.num_blocks or engine.kv_memory or "default")
    name = "pagedbatch run (process)"
    return BenchResult.counted("run", name, seconds, requested, produced, given, *errors[:1])


def _run_config(engine: EngineConfig, max_tokens: int) -> str:
    """`engine` and the benchmark's sampling as a `pagedbatch run` TOML config."""
    values = {**dataclasses.asdict(engine), "max_tokens": max_tokens, "ignore_eos": True}
    # JSON strings, numbers and booleans are TOML values too.
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)


def _as_line(record: Record) -> dict:
    if record.messages is not None:
        return {"id": record.id, "messages": list(record.messages)}
    return {"id": record.id, "prompt": record.prompt}
