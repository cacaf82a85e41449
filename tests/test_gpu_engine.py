"""The engine on a CUDA GPU (skipped without one): exact greedy tokens with the Triton path.

Run by scripts/gpu_checks.sh on a machine that is lent a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import ARCHS, NUM_NEW, random_prompts
from transformers import AutoConfig, AutoModelForCausalLM

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


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decode_matches_eager_and_transformers(arch, tiny_model_dirs):
    # 16 prompts and max_num_seqs 12: decode steps of 12, then of fewer (padded buckets),
    # with the tail replayed from smaller graphs as sequences finish.
    runs = {}
    for graphs in (None, False):  # None: the CUDA default, on
        llm = LLM(tiny_model_dirs[arch], device="cuda", dtype="float32", attention="triton",
                  num_blocks=256, max_num_seqs=12, cuda_graphs=graphs)  # fmt: skip
        assert llm.cuda_graphs_problem is None
        prompts = random_prompts(llm.model.config.vocab_size)
        runs[graphs] = tokens(llm, prompts)
        graph_steps = llm.stats().graph_steps
        assert graph_steps > NUM_NEW // 2 if graphs is None else graph_steps == 0
    assert runs[None] == runs[False] == cuda_reference(tiny_model_dirs[arch], prompts)


# A tie in bf16, in logits. On the tiny llama (logits up to ~12, bf16 steps of 1/16 there)
# transformers' eager and sdpa attention, both bf16, move a top-2 gap by up to ~0.5 on
# prompts of 10 to 400 tokens; the two pagedbatch paths (Triton in its CPU interpreter)
# parted at gaps of 0.03 to 0.09. Twice the larger figure counts as a tie.
BF16_TIE = 1.0


def referee_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), vocab]: the logits each generated token was picked from, per a
    plain transformers `model` fed `prompt + generated` (teacher forcing)."""
    ids = torch.tensor([prompt + generated], device=model.device)
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 : -1].float()


def below_best(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[len(tokens)]: how far each token's logit is below the best logit of its row."""
    picked = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    return logits.max(dim=-1).values - picked


def check_bf16_paths(referee, prompts, first_path, second_path) -> int:
    """Assert the bf16 rule of the test below; return how many tokens the paths share."""
    shared = 0
    for i, (prompt, a, b) in enumerate(zip(prompts, first_path, second_path, strict=True)):
        for tokens in (a, b):
            below = below_best(referee_logits(referee, prompt, tokens), tokens)
            assert (below < BF16_TIE).all(), f"prompt {i}: a token far below the best: {below}"
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        shared += first
        if first < len(a):
            top2 = referee_logits(referee, prompt, b)[first].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < BF16_TIE, f"prompt {i}: paths differ at token {first}, top-2 gap {gap}"
    return shared


def test_triton_and_torch_agree_in_float32_and_in_bfloat16_up_to_a_tie(tiny_model_dirs):
    """float32: the same tokens. bfloat16: every token of either path is within BF16_TIE
    of the best logit of a bf16 transformers model fed that path's tokens, and the paths
    first differ only where that model sees a tie (top-2 gap below BF16_TIE)."""
    model_dir = tiny_model_dirs["llama"]
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    prompts = random_prompts(AutoConfig.from_pretrained(model_dir).vocab_size, count=8)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for attention in ("triton", "torch"):
            llm = LLM(model_dir, device="cuda", dtype=dtype, attention=attention, num_blocks=256)
            outs = llm.generate(prompts, params)
            runs[dtype, attention] = [list(o.completions[0].token_ids) for o in outs]
    assert runs["float32", "triton"] == runs["float32", "torch"]
    referee = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    shared = check_bf16_paths(
        referee, prompts, runs["bfloat16", "triton"], runs["bfloat16", "torch"]
    )
    assert shared >= 4 * len(prompts), "the paths part almost at once: look at the kernels"
