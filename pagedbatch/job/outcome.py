"""What a finished run tells a monitor: whether its output holds more failed records than
`--max-errors` / `--max-error-rate` allow, and its summary as plain data (`--summary-json`).

The limits count the whole output, as a nightly job's monitor sees it: the error lines this
run wrote and those a resumed run skipped (with `--retry-errors` they run again instead).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pagedbatch.engine.stats import EngineStats
from pagedbatch.job.job import Job, JobResult
from pagedbatch.job.settings import RunSettings

TOO_MANY_ERRORS = 3  # the exit code of a run whose output exceeds the error limits


def error_limit_problem(settings: RunSettings, result: JobResult) -> str | None:
    """Why the output has too many error lines for the limits set, or None."""
    codes = result.output_codes
    lines = sum(codes.values())
    failed = lines - codes["ok"]
    if settings.max_errors is not None and failed > settings.max_errors:
        return f"{failed} of {lines} records failed, more than --max-errors {settings.max_errors}"
    rate = settings.max_error_rate
    if rate is not None and lines and failed / lines > rate:
        return (
            f"{failed} of {lines} records failed ({failed / lines:.1%}), more than "
            f"--max-error-rate {rate:g}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class RunTimes:
    """Seconds of a run: all of it, loading the model, and generating (tokenizing included)."""

    total: float
    loading: float = 0.0
    generating: float = 0.0


def run_summary(
    job: Job,
    result: JobResult,
    *,
    status: str,
    exit_code: int,
    times: RunTimes,
    stats: EngineStats | None = None,
    peak_kv_bytes: int | None = None,
    error_limit: str | None = None,
) -> dict[str, Any]:
    """The run as JSON-ready data: what it wrote by outcome and code, the whole output's
    codes, tokens, seconds, the prefix hit rate, the KV peak, the model and the settings."""
    settings = job.settings
    summary: dict[str, Any] = {
        "status": status,  # ok, too_many_errors or interrupted
        "exit_code": exit_code,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": job.source,
        "output": str(job.output),
        "model": job.settings.engine.model,
        "records": {
            "input": len(job.records),
            "written": result.written,
            "ok": result.codes["ok"],
            "failed": result.failed,
            "skipped": result.skipped,
            "not_run": result.not_run,
        },
        "written_by_code": dict(sorted(result.codes.items())),
        "output_by_code": dict(sorted(result.output_codes.items())),
        "seconds": {k: round(v, 3) for k, v in dataclasses.asdict(times).items()},
        "error_limit": error_limit,  # why the output exceeds --max-errors / --max-error-rate
        "settings": _settings_json(settings),
    }
    if stats is not None:
        generating = max(times.generating, 1e-9)
        summary["tokens"] = {
            "prompt": stats.prompt_tokens,
            "cached": stats.prefix_hit_tokens,
            "computed": stats.computed_tokens,
            "generated": stats.generated_tokens,
            "generated_per_second": round(stats.generated_tokens / generating, 2),
        }
        summary["prefix_hit_rate"] = round(stats.prefix_hit_rate, 4)
        summary["kv"] = {
            "peak_blocks": stats.peak_blocks_in_use,
            "blocks": stats.num_blocks,
            "peak_bytes": peak_kv_bytes,
            "preemptions": stats.preemptions,
        }
    return summary


def _settings_json(settings: RunSettings) -> dict[str, Any]:
    """Every setting of the run, flat, with paths and tuples as JSON has them."""
    flat = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    flat.update(dataclasses.asdict(flat.pop("engine")))
    flat.update(dataclasses.asdict(flat.pop("sampling")))
    return {k: _plain(v) for k, v in flat.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
