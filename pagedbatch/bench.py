"""Benchmarks against the transformers baselines, in one process, as plain results.

Every contender generates exactly `max_tokens` tokens per record (EOS ignored) for the
same prompt token ids, so records/s and output tokens/s compare like with like.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pagedbatch.records import Record


@dataclass(frozen=True)
class BenchResult:
    name: str
    seconds: float
    records: int
    output_tokens: int
    details: dict = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def pagedbatch_in_process(
    model: str, records: list[Record], max_tokens: int, prefix_sharing: bool, **engine: object
) -> BenchResult:
    """Load the model and generate, timing both (what a library user pays)."""
    from pagedbatch.llm import LLM
    from pagedbatch.sampling_params import SamplingParams

    started = time.perf_counter()
    llm = LLM(model, prefix_sharing=prefix_sharing, **engine)
    loaded = time.perf_counter()
    outs = llm.generate(records, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    done = time.perf_counter()
    stats = llm.stats()
    name = "pagedbatch" + ("" if prefix_sharing else " --no-prefix-sharing")
    return BenchResult(
        name, done - started, len(outs), stats.generated_tokens,
        {"load_s": loaded - started, "prefix_hit_rate": stats.prefix_hit_rate,
         "peak_blocks": stats.peak_blocks_in_use, "sharing_saving": stats.sharing_saving},
    )  # fmt: skip


def pagedbatch_process(records: list[Record], model: str, max_tokens: int, device: str):
    """The whole `pagedbatch run` command as a user starts it: interpreter, load, job."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps(_as_line(r)) + "\n" for r in records))
        command = [
            sys.executable, "-m", "pagedbatch", "run", str(source), "--model", model,
            "--max-tokens", str(max_tokens), "--ignore-eos", "--no-progress",
            "--device", device, "--output", str(out),
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        lines = out.read_text().splitlines()
    if len(lines) != len(records):
        raise RuntimeError(f"pagedbatch wrote {len(lines)} lines for {len(records)} records")
    tokens = len(lines) * max_tokens
    return BenchResult("pagedbatch run (whole process)", seconds, len(lines), tokens)


def _as_line(record: Record) -> dict:
    if record.messages is not None:
        return {"id": record.id, "messages": list(record.messages)}
    return {"id": record.id, "prompt": record.prompt}


def load_baseline_model(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int):
    """transformers `generate` over static batches, left-padded to the longest prompt."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
            min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    name = f"transformers generate (batches of {batch_size})"
    return BenchResult(name, seconds, len(prompts), len(prompts) * max_tokens)


def hf_generate_batch(model, prompts: list[list[int]], max_tokens: int):
    """transformers `generate_batch`: continuous batching over its own paged cache.

    Not under inference_mode: its worker thread would then meet inference tensors.
    """
    from transformers import GenerationConfig

    # eos_token_id -1 never matches: every request runs to max_new_tokens.
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1)
    started = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.generated_tokens) for r in results.values())
    if tokens != len(prompts) * max_tokens:
        expected = len(prompts) * max_tokens
        raise RuntimeError(f"generate_batch produced {tokens} of {expected} tokens")
    return BenchResult("transformers generate_batch", seconds, len(prompts), tokens)


def run_file_benchmark(
    source: str,
    model: str,
    max_tokens: int,
    batch_size: int,
    device: str,
    on_result: Callable[[BenchResult], None] = lambda r: None,
) -> list[BenchResult]:
    """All contenders on the records of `source`, in one run on this machine."""
    from pagedbatch.io import read_records
    from pagedbatch.llm import LLM

    # Per-record overrides would make contenders generate different lengths: dropped.
    records = [replace(r, overrides={}) for r in read_records(source) if r.error is None]
    results = []

    def record(result: BenchResult) -> None:
        results.append(result)
        on_result(result)

    record(pagedbatch_process(records, model, max_tokens, device))
    for sharing in (True, False):
        record(pagedbatch_in_process(model, records, max_tokens, sharing, device=device))
    llm = LLM(model, device=device, num_blocks=16)  # for its tokenizer and converted weights
    prompts = [llm.prompts.token_ids(r) for r in records]
    model_dir = llm.model.config._name_or_path
    baseline = load_baseline_model(model_dir, llm.device, llm.model.dtype)
    del llm
    pad_id = baseline.config.pad_token_id or 0
    record(hf_generate(baseline, prompts, max_tokens, batch_size, pad_id))
    record(hf_generate_batch(baseline, prompts, max_tokens))
    return results
