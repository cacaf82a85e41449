"""Tensor parallelism (engine/tensor_parallel.py) on CPU: 2 ranks over gloo, real processes.

Exactness rule: the ranks sum partial matmuls (o_proj, down_proj) in another order than
one process does, so fp32 logits differ in the last bits. Each generated token is
compared with one process's; where they differ, one process's top-2 logprob margin at
that position must be a near-tie (< NEAR_TIE), and the logprobs before it must agree
within LOGPROB_TOL. On these tiny models no token differs (asserted: the test reports it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from job_helpers import (
    by_id,
    invoke,
    prompts,
    read_lines,
    resume_command,
    run_shell,
    start,
    tiny_args,
    wait_for_lines,
    write_jsonl,
)
from tiny_models import tiny_config

from pagedbatch import LLM, SamplingParams
from pagedbatch.cli.plan import kv_blocks
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.tensor_parallel import TensorParallelError
from pagedbatch.engine.tp_shards import (
    config_rank_weight_bytes,
    local_weight_bytes,
    support_problem,
)
from pagedbatch.models.loader import ModelLoadError

LOGPROB_TOL = 1e-4
NEAR_TIE = 1e-3
# The tiny preset's pool and budget: chunked prefill, preemption (configs/tiny.toml).
SMALL = {"device": "cpu", "threads": 1, "block_size": 8, "num_blocks": 24,
         "max_batch_tokens": 32, "max_num_seqs": 8}  # fmt: skip
SHARED = "Label the following review as positive or negative. The food was "
PROMPTS = [
    SHARED + "cold.",
    SHARED + "great, the room quiet.",
    "Once upon a time there was a small model",
    SHARED + "slow and the room loud.",
    "Question: What is the capital of France? Answer:",
]


def _records() -> list[dict]:
    records = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
    records.append({"id": "forks", "prompt": SHARED + "fine.", "n": 3, "temperature": 0.8,
                    "seed": 7})  # fmt: skip
    records.append({"id": "choice", "prompt": SHARED + "bad. Label:",
                    "choices": [" positive", " negative"]})  # fmt: skip
    return records


PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)


def _compare(tp, one) -> int:
    """Assert tp's outputs match one process's (module doc's rule); return tokens compared."""
    compared = 0
    for a, b in zip(tp, one, strict=True):
        assert a.id == b.id
        if b.choices is not None:
            for x, y in zip(a.choices, b.choices, strict=True):
                assert x.logprob == pytest.approx(y.logprob, abs=LOGPROB_TOL)
            continue
        for x, y in zip(a.completions, b.completions, strict=True):
            for k, (u, v) in enumerate(zip(x.logprobs, y.logprobs, strict=True)):
                if u.token_id != v.token_id:
                    margin = v.top[0][2] - v.top[1][2]
                    assert margin < NEAR_TIE, f"{a.id}: token {k} differs at margin {margin}"
                    break
                assert u.logprob == pytest.approx(v.logprob, abs=LOGPROB_TOL)
                compared += 1
    return compared


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_ranks_generate_what_one_process_does(tiny_model_dirs, arch):
    """Greedy with shared prefixes, forks (n=3 sampled from the parent's row), a scored
    choice, chunked prefill and preemption in a small pool: the same tokens as one process."""
    path = str(tiny_model_dirs[arch])
    llm = LLM(path, tensor_parallel=2, **SMALL)
    try:
        assert llm.kv_cache.spec.num_kv_heads == 1  # rank 0 holds its one of 2 KV heads
        tp = llm.generate(_records(), PARAMS)
        stats, report = llm.stats(), llm.memory_report()
    finally:
        llm.close()
    alone = LLM(path, **SMALL)
    one = alone.generate(_records(), PARAMS)
    whole = alone.memory_report()
    assert (
        report["kv_pool_bytes"]
        == whole["kv_pool_bytes"]
        == 2 * report["tensor_parallel"]["rank_kv_pool_bytes"]
    )
    assert report["model_bytes"] == whole["model_bytes"]
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0
    total = sum(len(c.token_ids) for o in one if o.completions for c in o.completions)
    assert _compare(tp, one) == total  # no token differed


def test_a_killed_rank_ends_generate_at_once_with_the_rank_named(tiny_model_dirs):
    """SIGKILL a worker mid-run: generate raises within seconds naming rank 1 and the
    signal; the outputs finished before were handed out; the LLM's workers are gone."""
    path = str(tiny_model_dirs["llama"])
    small = {**SMALL, "num_blocks": None, "kv_memory": "96KiB"}
    with pytest.raises(ValueError, match="holds no KV block"):  # the workers are stopped
        LLM(path, tensor_parallel=2, **{**small, "kv_memory": "1KiB"})
    assert not torch.distributed.is_initialized()
    llm = LLM(path, tensor_parallel=2, **small)
    # `plan` sizes what LLM allocates: the pool (1/2 of each block's bytes on each rank)
    # and a rank's weights, from the config alone
    engine, model_config = llm.config, llm.model.config
    assert kv_blocks(engine, model_config) == llm.kv_cache.num_blocks == 24
    assert local_weight_bytes(llm.model) == config_rank_weight_bytes(model_config, torch.float32, 2)
    worker = llm.tensor_parallel.workers[0]
    done, killed_at = [], []

    def on_step(stats):
        if stats.steps == 3:
            os.kill(worker.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    records = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS * 3)]
    with pytest.raises(TensorParallelError) as raised:
        llm.generate(records, params, on_step=on_step, on_output=done.append)
    assert time.monotonic() - killed_at[0] < 10
    message = str(raised.value)
    assert "rank 1" in message and "SIGKILL" in message and "\n" not in message
    assert worker.poll() is not None and llm.tensor_parallel.closed
    with pytest.raises(TensorParallelError):  # the group stays failed
        llm.generate(records[:1], params)


def test_refusals_are_one_line():
    refusals = {
        "CUDA graphs": {"cuda_graphs": True},
        "torch attention only": {"attention": "triton"},
        "cuda:r": {"device": "cuda:1"},
    }
    for words, kw in refusals.items():
        with pytest.raises(ValueError, match=words):
            EngineConfig(tensor_parallel=2, **kw)
    with pytest.raises(ValueError, match="tensor_parallel must be >= 1"):
        EngineConfig(tensor_parallel=0)
    assert EngineConfig(tensor_parallel=2, device="cpu").attention_backend == "torch"
    assert not EngineConfig(tensor_parallel=2, device="cpu").use_cuda_graphs


def test_models_whose_shapes_do_not_split_are_refused_before_any_process_starts():
    config = tiny_config("llama", 448, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    assert "KV heads" in support_problem(config, 2)
    assert "attention heads" in support_problem(config, 4)
    assert support_problem(tiny_config("qwen3", 448), 2) is None
    assert "vocabulary" in support_problem(tiny_config("llama", 447), 2)
    with pytest.raises(ModelLoadError, match="random preset"):
        LLM("tiny-random", tensor_parallel=2, device="cpu")


def test_an_architecture_without_a_plan_is_refused_by_name():
    from transformers import GPT2Config

    config = GPT2Config(architectures=["GPT2LMHeadModel"])
    if getattr(config, "base_model_tp_plan", None):
        pytest.skip("GPT-2 has a tensor-parallel plan in this transformers")
    assert support_problem(config, 2) == (
        "tensor parallel needs a transformers tensor-parallel plan; GPT2LMHeadModel has none"
    )


def _worker_pids(pid: int) -> list[int]:
    """The tensor-parallel workers among the children of process `pid`."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c) for c in children
        if b"tp_worker" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]  # fmt: skip


def test_a_job_whose_rank_is_killed_stops_in_seconds_and_resumes_to_the_full_output(
    tiny_model_dirs, tmp_path
):
    """A real `pagedbatch run --tensor-parallel 2`: SIGKILL rank 1 once lines are written;
    the job exits 1 within seconds with one error line naming the rank and the resume
    command; the output ends on a whole line; the printed resume finishes it, and every
    line equals a one-process run's."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(48))  # still running at the kill
    out = tmp_path / "out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--threads", "1", "--max-num-seqs", "2",
                     "--max-tokens", "16", "--ignore-eos", "-o", out)  # fmt: skip
    job = start([str(source), *args, "--tensor-parallel", "2"], tmp_path)
    wait_for_lines(out, 2, job)
    (worker,) = _worker_pids(job.pid)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert job.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert f"rank 1 (pid {worker}) was killed by SIGKILL" in errors[0]
    written = read_lines(out)
    assert 2 <= len(written) < 48
    resumed = run_shell(resume_command(stderr), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "one.jsonl"
    assert invoke(source, *args[:-1], reference).exit_code == 0
    got, want = by_id(read_lines(out)), by_id(read_lines(reference))
    assert got.keys() == want.keys()
    for key, line in want.items():
        assert got[key]["choices"] == line["choices"], key


def test_cascade_attention_under_two_ranks_matches_one_process(tiny_model_dirs):
    """Records decoding behind a shared prefix of 512+ tokens (the torch cascade rule):
    each rank reads its KV heads' prefix pages once per group, with the same tokens."""
    path = str(tiny_model_dirs["llama"])
    shared = " ".join(["Summarize the text below in one sentence."] * 60)
    records = [{"id": i, "prompt": f"{shared} Part {i}:"} for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
    kw = {"device": "cpu", "threads": 1, "num_blocks": 160, "max_batch_tokens": 1024}
    llm = LLM(path, tensor_parallel=2, **kw)
    try:
        tp = llm.generate(records, params)
        saved = llm.stats().cascade_saved_token_reads
    finally:
        llm.close()
    one = LLM(path, **kw).generate(records, params)
    assert saved > 0
    assert _compare(tp, one) == 4 * 6


def test_ctrl_c_to_the_process_group_stops_the_job_after_its_step_and_the_workers(
    tiny_model_dirs, tmp_path
):
    """A terminal's SIGINT reaches rank 0 and the workers alike: rank 0 stops after the
    step as without tensor parallelism (exit 130, the resume command), and the workers
    wait to be told, then exit."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(200))  # still running at the signal
    out = tmp_path / "out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--threads", "1", "--max-num-seqs", "2",
                     "--max-tokens", "16", "--ignore-eos", "-o", out)  # fmt: skip
    # A shell without job control starts background commands (this test run, perhaps)
    # ignoring SIGINT, which the job would inherit and keep ignoring like `nohup`: a
    # handler here is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = start([str(source), *args, "--tensor-parallel", "2"], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for_lines(out, 1, job)
    (worker,) = _worker_pids(job.pid)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert "Interrupted by SIGINT" in stderr and "tensor parallel stopped" not in stderr
    assert not Path(f"/proc/{worker}").exists() or "Z" in _state(worker)
    assert 1 <= len(read_lines(out)) < 200


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]


@pytest.mark.slow
def test_smollm2_over_three_ranks_generates_what_one_process_does(smollm2_dir):
    """The embedded SmolLM2 (9 query and 3 KV heads, tied embeddings) over 3 ranks: each
    holds 3 query heads and 1 KV head; greedy tokens per the module doc's rule."""
    records = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:3])]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    kw = {"device": "cpu", "threads": 1, "num_blocks": 64}
    llm = LLM(str(smollm2_dir), tensor_parallel=3, **kw)
    try:
        assert llm.kv_cache.spec.num_kv_heads == 1
        tp = llm.generate(records, params)
    finally:
        llm.close()
    one = LLM(str(smollm2_dir), **kw).generate(records, params)
    assert _compare(tp, one) == 3 * 8


def test_a_stuck_rank_ends_generate_after_the_collective_timeout(tiny_model_dirs, monkeypatch):
    """SIGSTOP rank 1 (alive, silent): rank 0 waits PAGEDBATCH_TP_TIMEOUT seconds in the
    step's first collective, then raises saying so; the stopped worker is killed."""
    monkeypatch.setenv("PAGEDBATCH_TP_TIMEOUT", "4")
    llm = LLM(str(tiny_model_dirs["llama"]), tensor_parallel=2, **SMALL)
    worker = llm.tensor_parallel.workers[0]
    os.kill(worker.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="waited longer than 4 s"):
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4))
    assert time.monotonic() - started < 4 + 15
    assert worker.poll() is not None
