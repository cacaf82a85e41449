"""Prefix sharing end to end: same tokens as without it, less computed, less memory."""

from __future__ import annotations

import pytest
import torch

from pagedbatch import LLM, Record, SamplingParams
from pagedbatch.sampling_params import sample_seed


def shared_prefix_job(vocab: int, seed: int = 0) -> list[Record]:
    """Records sharing prefixes of 5, 16, 37 and 100 tokens (mid-block, exact block ...),
    an exact duplicate, and a record that is a prefix of another."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    base = rand(100)
    prompts = []
    for prefix_len in (5, 16, 37, 100):
        for tail in (3, 11, 20):
            prompts.append(base[:prefix_len] + rand(tail))
    prompts.append(list(prompts[4]))  # a duplicate
    prompts.append(prompts[7][:30])  # a prefix of another record
    prompts.append(rand(50))  # shares nothing
    return [Record(id=f"r{i}", prompt_token_ids=tuple(p)) for i, p in enumerate(prompts)]


def tokens(outputs) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.completions] for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_outputs_are_identical_with_and_without_sharing(arch, tiny_model_dirs):
    params = SamplingParams(max_tokens=24)
    with_sharing = LLM(tiny_model_dirs[arch], device="cpu", dtype="float32", block_size=8)
    without = LLM(
        tiny_model_dirs[arch], device="cpu", dtype="float32", block_size=8, prefix_sharing=False
    )
    job = shared_prefix_job(with_sharing.model.config.vocab_size)
    shared_out = with_sharing.generate(job, params)
    plain_out = without.generate(job, params)
    assert tokens(shared_out) == tokens(plain_out)
    assert [o.id for o in shared_out] == [r.id for r in job]  # input order kept
    s, p = with_sharing.stats(), without.stats()
    assert p.prefix_hit_tokens == 0 and all(o.cached_tokens == 0 for o in plain_out)
    assert s.prefix_hit_tokens == sum(o.cached_tokens for o in shared_out) > 0
    assert all(o.cached_tokens % 8 == 0 and o.cached_tokens < o.prompt_tokens for o in shared_out)
    assert s.computed_tokens == p.computed_tokens - s.prefix_hit_tokens
    with_sharing.engine.check_integrity()
    assert s.blocks_in_use == 0 and s.cached_blocks == s.num_blocks - s.free_blocks > 0


def test_hit_rate_is_exact_when_records_run_one_after_another(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4, max_num_seqs=1)
    shared = list(range(10, 22))  # 12 tokens: 3 full blocks
    job = [Record(id=i, prompt_token_ids=tuple(shared + [30 + i, 40 + i])) for i in range(5)]
    outs = llm.generate(job, SamplingParams(max_tokens=3))
    assert [o.cached_tokens for o in outs] == [0, 12, 12, 12, 12]
    stats = llm.stats()
    assert stats.prompt_tokens == 5 * 14 and stats.prefix_hit_tokens == 48
    assert stats.prefix_hit_rate == pytest.approx(48 / 70)


def test_sharing_stores_a_common_prefix_once(tiny_model_dirs):
    prefix = list(range(3, 3 + 96))
    job = [Record(id=i, prompt_token_ids=tuple(prefix + [200 + i])) for i in range(12)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    peaks = {}
    for sharing in (True, False):
        llm = LLM(
            tiny_model_dirs["llama"],
            device="cpu",
            dtype="float32",
            block_size=16,
            prefix_sharing=sharing,
        )
        llm.generate(job, params)
        peaks[sharing] = llm.stats()
    shared, plain = peaks[True], peaks[False]
    assert plain.sharing_saving == 0
    assert shared.peak_blocks_in_use * 2 <= plain.peak_blocks_in_use
    assert shared.sharing_saving > 0.5


def test_n_samples_share_the_prompt_and_equal_single_runs_with_their_seeds(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=8)
    prompt = tuple(range(5, 5 + 21))  # 21 tokens: the last block is partly filled
    params = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    before = llm.stats().computed_tokens
    record = Record(id="x", prompt_token_ids=prompt, overrides={"n": 3, "seed": 7})
    out = llm.generate([record], params)[0]
    computed = llm.stats().computed_tokens - before
    assert [c.index for c in out.completions] == [0, 1, 2]
    # The prompt is computed once; each sample then feeds back all but its last token.
    assert computed == len(prompt) + 3 * (10 - 1)
    assert len({c.token_ids for c in out.completions}) == 3
    for k, choice in enumerate(out.completions):
        alone = LLM(
            tiny_model_dirs["llama"], device="cpu", dtype="float32", prefix_sharing=False
        ).generate(
            [Record(id="x", prompt_token_ids=prompt, overrides={"seed": sample_seed(7, k)})], params
        )[0]
        assert alone.completions[0].token_ids == choice.token_ids, f"sample {k}"
    llm.engine.check_integrity()


def test_sharing_with_preemption_and_eviction_keeps_greedy_tokens(tiny_model_dirs):
    params = SamplingParams(max_tokens=24)
    plain = LLM(
        tiny_model_dirs["mistral"],
        device="cpu",
        dtype="float32",
        block_size=8,
        prefix_sharing=False,
    )
    job = shared_prefix_job(plain.model.config.vocab_size, seed=3)
    expected = tokens(plain.generate(job, params))
    small = LLM(
        tiny_model_dirs["mistral"],
        device="cpu",
        dtype="float32",
        block_size=8,
        num_blocks=24,
        max_batch_tokens=48,
    )
    assert tokens(small.generate(job, params)) == expected
    stats = small.stats()
    assert stats.preemptions > 0 and stats.evicted_blocks > 0
    small.engine.check_integrity()


@pytest.mark.slow
def test_embedded_smollm2_gives_the_same_labels_with_and_without_sharing(smollm2_dir):
    from pathlib import Path

    from pagedbatch.inputs.reader import read_records

    job = read_records(Path(__file__).parent.parent / "examples" / "label_job.jsonl")[:6]
    params = SamplingParams(max_tokens=8)
    runs = {}
    for sharing in (True, False):
        llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", prefix_sharing=sharing)
        runs[sharing] = (llm.generate(job, params), llm.stats())
    assert tokens(runs[True][0]) == tokens(runs[False][0])
    # The first record computes the ~620-token instruction; every other one reuses it.
    cached = sorted(o.cached_tokens for o in runs[True][0])
    assert cached[0] == 0 and cached[1] >= 600
    assert runs[True][1].computed_tokens < runs[False][1].computed_tokens / 4


def test_a_prompt_computed_again_takes_the_cached_copy_and_fits_the_pool_it_fills(tiny_model_dirs):
    # A block-aligned prompt that is already cached recomputes its last block (its last
    # token's logits are needed). The sequence then holds the cache's copy of that block,
    # not both: 24 prompt + 4 output tokens fill all 7 blocks with no preemption.
    prompt = tuple(range(10, 34))
    job = [Record(id=i, prompt_token_ids=prompt) for i in range(2)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4, num_blocks=7)
    outs = llm.generate(job, params)
    stats = llm.stats()
    assert stats.preemptions == 0 and stats.peak_blocks_in_use == 7
    assert [o.cached_tokens for o in outs] == [0, 20]
    alone = LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4, prefix_sharing=False
    )
    assert tokens(outs) == tokens(alone.generate(job[:1], params)) * 2
    llm.engine.check_integrity()
