"""Measured generation rates of a model on this machine, and the last run's, kept on disk.

A `pagedbatch run` stores the rates its steps reached (prompt tokens per second in the
steps that compute prompts, output tokens per second in decode-only steps, and the mean
batch of those) in `<cache dir>/rates.json`, keyed by model, device, dtype and torch
threads; `pagedbatch plan` estimates a job's time from them when the key matches.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedbatch.files import atomic_write

if TYPE_CHECKING:  # torch, transformers and the engine load only when a function runs
    from pagedbatch.engine.config import EngineConfig
    from pagedbatch.engine.stats import EngineStats

RATES_FILE = "rates.json"
PROBE, LAST_RUN = "probe", "last run"


@dataclass(frozen=True)
class Rates:
    """Tokens per second of one model on one machine, and where they come from."""

    prefill_tok_s: float  # tokens computed per second in steps that compute prompts
    decode_tok_s: float  # tokens per second in decode-only steps
    decode_seqs: float  # mean sequences per decode-only step (the batch decode_tok_s is at)
    source: str  # PROBE or LAST_RUN
    measured_at: str = ""  # local time of the measurement, "2025-01-31 14:05"

    def __post_init__(self) -> None:
        if self.prefill_tok_s <= 0 or self.decode_tok_s <= 0 or self.decode_seqs <= 0:
            raise ValueError(f"rates must be positive, got {self}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rates_from_stats(stats: EngineStats, source: str) -> Rates | None:
    """The rates of the steps `stats` counted; None without both prefill and decode steps."""
    if not (stats.prefill_step_seconds > 0 and stats.prefill_step_tokens):
        return None
    if not (stats.decode_step_seconds > 0 and stats.decode_steps):
        return None
    return Rates(
        prefill_tok_s=stats.prefill_step_tokens / stats.prefill_step_seconds,
        decode_tok_s=stats.decode_step_tokens / stats.decode_step_seconds,
        decode_seqs=stats.decode_step_tokens / stats.decode_steps,
        source=source,
        measured_at=time.strftime("%Y-%m-%d %H:%M"),
    )


def rates_key(config: EngineConfig, threads: int) -> str:
    """What the rates depend on: model, device (the GPU's name on CUDA; the tensor-parallel
    ranks), dtype, threads, and the weights' quantization and KV dtype when they are not
    the defaults."""
    import torch

    model = os.path.abspath(config.model) if os.path.exists(config.model) else config.model
    device = config.torch_device
    where = device.type
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    if config.tensor_parallel > 1:
        where += f" x{config.tensor_parallel} tensor-parallel"
    dtype = str(config.torch_dtype).removeprefix("torch.")
    key = f"{model} | {where} | {dtype} | {threads} threads"
    if config.quantize is not None:
        key += f" | weights {config.quantize}"
    if config.torch_kv_dtype != config.torch_dtype:
        key += f" | kv {str(config.torch_kv_dtype).removeprefix('torch.')}"
    return key


def planned_threads(config: EngineConfig) -> int:
    """The torch threads an `LLM` made from `config` now would compute with."""
    import torch

    return config.torch_threads or torch.get_num_threads()


def rates_path(config: EngineConfig) -> Path:
    from pagedbatch.models.loader import default_cache_dir

    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return root / RATES_FILE


def load_rates(path: Path, key: str) -> Rates | None:
    """The rates stored under `key`; None when there are none (or the file is unreadable)."""
    try:
        entry = json.loads(path.read_text())[key]
        return Rates(**{**entry, "source": LAST_RUN})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_rates(path: Path, key: str, rates: Rates) -> None:
    """Store `rates` under `key`, keeping the other keys; the file is replaced atomically."""
    try:
        stored = json.loads(path.read_text())
        stored = stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        stored = {}
    stored[key] = {k: v for k, v in rates.to_json().items() if k != "source"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(stored, f, indent=1, sort_keys=True)


def store_run_rates(config: EngineConfig, stats: EngineStats) -> Rates | None:
    """After a run: store its rates for `pagedbatch plan` (best effort: a file that cannot
    be written is skipped, never the job's failure). Returns what was stored."""
    import torch

    rates = rates_from_stats(stats, LAST_RUN)
    if rates is None:
        return None
    try:
        store_rates(rates_path(config), rates_key(config, torch.get_num_threads()), rates)
    except OSError:
        return None
    return rates


def last_run_rates(config: EngineConfig) -> Rates | None:
    """The rates the last run with this model, device, dtype and thread count stored."""
    return load_rates(rates_path(config), rates_key(config, planned_threads(config)))
