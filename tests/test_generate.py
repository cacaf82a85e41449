"""End-to-end generation: token-exact against transformers `generate`, on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
NUM_NEW = 32


def random_prompts(vocab_size: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    """`count` prompts of 10 to 400 token ids (no special tokens), lengths spread out."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(10, 400, count).long().tolist()
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def reference_tokens(
    model_dir, prompts: list[list[int]], max_new: int = NUM_NEW, dtype=torch.float32
) -> list[list[int]]:
    """transformers `generate(do_sample=False)`, one prompt at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).config.vocab_size
            prompts = random_prompts(vocab)
            cache[arch] = (prompts, reference_tokens(tiny_model_dirs[arch], prompts))
        return cache[arch]

    return get


def generated(llm: LLM, prompts, params: SamplingParams) -> list[list[int]]:
    return [list(out.completions[0].token_ids) for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(arch, tiny_model_dirs, references):
    prompts, expected = references(arch)
    llm = LLM(tiny_model_dirs[arch], device="cpu", dtype="float32")
    assert generated(llm, prompts, SamplingParams(max_tokens=NUM_NEW)) == expected
    stats = llm.stats()
    assert stats.preemptions == 0
    assert stats.blocks_in_use == 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_with_preemption_and_chunked_prefill(arch, tiny_model_dirs, references):
    prompts, expected = references(arch)
    # 40 blocks of 16 tokens hold about two of the long prompts; 64 tokens per step
    # split every prompt longer than that into chunks.
    llm = LLM(
        tiny_model_dirs[arch], device="cpu", dtype="float32", num_blocks=40, max_batch_tokens=64
    )
    assert generated(llm, prompts, SamplingParams(max_tokens=NUM_NEW)) == expected
    stats = llm.stats()
    assert stats.preemptions > 0, "the pool was meant to be too small for all sequences"
    assert stats.recomputed_tokens > 0
    assert stats.peak_blocks_in_use == 40
    assert stats.blocks_in_use == 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_greedy_agrees_with_transformers_in_bfloat16(arch, tiny_model_dirs, references):
    """Both round to bfloat16 in different places (our batches and paged attention, its
    padded-free single prompts), so a near tie may go either way later in a generation:
    every first token agrees, and most generations agree to the end (15 of 16 here)."""
    prompts, _ = references(arch)
    expected = reference_tokens(tiny_model_dirs[arch], prompts, dtype=torch.bfloat16)
    llm = LLM(tiny_model_dirs[arch], device="cpu", dtype="bfloat16")
    assert llm.dtype == "bfloat16" and llm.kv_cache.k[0].dtype == torch.bfloat16
    got = generated(llm, prompts, SamplingParams(max_tokens=NUM_NEW))
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert sum(g == e for g, e in zip(got, expected)) >= 12, (got, expected)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_block_size_does_not_change_greedy_tokens(block_size, tiny_model_dirs, references):
    prompts, expected = references("llama")
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=block_size)
    assert generated(llm, prompts[:6], SamplingParams(max_tokens=NUM_NEW)) == expected[:6]


TEXT = (
    "The night shift at the lighthouse began, as always, with a cup of bitter tea and a check "
    "of the lamp. Mara climbed the spiral stairs, counting the steps out of habit, and found the "
    "lens clean and the oil full. Outside, the sea was restless; gulls wheeled above the rocks and "
    "a fishing boat fought its way home against the tide. She wrote the time in the logbook, "
    "noted the wind from the north-east, and settled by the window to watch. Reviews of the new "
    "harbour cafe were mixed: some loved the chowder, others said the service was slow and the "
    "prices far too high for what you got. Translate the following sentence into French: the "
    "weather is cold but the people are warm. Summarise the main argument of the essay in one "
    "line. Question: what is the capital of Portugal, and why did it move there? Answer briefly. "
)


@pytest.mark.slow
def test_greedy_matches_transformers_generate_on_the_embedded_smollm2(smollm2_dir):
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32")
    ids = llm.tokenizer(TEXT * 3)["input_ids"]
    lengths = torch.linspace(10, 400, 16).long().tolist()
    prompts = [ids[(7 * i) % 50 : (7 * i) % 50 + n] for i, n in enumerate(lengths)]
    prompts[3] = llm.prompts.token_ids(
        llm_record({"messages": [{"role": "user", "content": "Name three colours."}]})
    )
    expected = reference_tokens(smollm2_dir, prompts)
    assert generated(llm, prompts, SamplingParams(max_tokens=NUM_NEW)) == expected


def llm_record(row):
    from pagedbatch.requests.records import parse_record

    return parse_record(row, default_id=0)
