"""The engine on a CUDA GPU (skipped without one): exact greedy tokens with the Triton path.

Run by scripts/gpu_checks.sh on a machine that is lent a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import ARCHS, NUM_NEW, random_prompts
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_reference(model_dir, prompts):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW,
                             do_sample=False)  # fmt: skip
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def tokens(llm: LLM, prompts) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=NUM_NEW))
    return [list(o.completions[0].token_ids) for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_float32_matches_transformers_on_cuda(arch, tiny_model_dirs):
    llm = LLM(tiny_model_dirs[arch], device="cuda", dtype="float32", attention="triton",
              num_blocks=64, max_batch_tokens=128)  # fmt: skip
    prompts = random_prompts(llm.model.config.vocab_size)
    assert tokens(llm, prompts) == cuda_reference(tiny_model_dirs[arch], prompts)
    assert llm.stats().preemptions > 0  # 64 blocks: the small pool path on the GPU too


def test_triton_and_torch_agree_in_bfloat16(tiny_model_dirs):
    llms = [
        LLM(tiny_model_dirs["llama"], device="cuda", attention=a, num_blocks=256)
        for a in ("triton", "torch")
    ]
    prompts = random_prompts(llms[0].model.config.vocab_size, count=8)
    runs = [tokens(llm, prompts) for llm in llms]
    first = [t[:4] for t in runs[0]], [t[:4] for t in runs[1]]
    assert first[0] == first[1]  # bf16 rounding may split later near-ties
