"""Sampling and stop strings: counter-based noise, the filters, the same tokens for a seed
in any batch and after preemption, and stop strings found on the newly decoded text."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import build_tiny_tokenizer

from pagedbatch import LLM, Record, SamplingParams
from pagedbatch.engine.detokenizer import IncrementalDetokenizer
from pagedbatch.engine.sampler import filter_top_k_top_p, sample_tokens, uniform_noise
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.sampling_params import derive_seed, sample_seed

U64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
CHI2_DF3_P001 = 16.27  # chi-square quantiles at p = 0.001
CHI2_DF1_P001 = 10.83


def mix64(z: int) -> int:
    """SplitMix64's finalizer on Python ints: the reference for the torch one."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def reference_uniform(seed: int, position: int, index: int) -> float:
    key = mix64((mix64((seed + GOLDEN) & U64) + position) & U64)
    return ((mix64((key + index * GOLDEN) & U64) >> 41) + 0.5) / 2**23


def sampled(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The tokens as the engine takes them: `sample_tokens`, then one copy to the host."""
    return sample_tokens(logits, seqs).tolist()


def seqs_of(params: SamplingParams, keys: list[tuple[int, int]]) -> list[Sequence]:
    """One sequence per (seed, position): it samples its token at that position."""
    return [
        Sequence(i, [0] * position, position, params, max_len=10**9, seed=seed)
        for i, (seed, position) in enumerate(keys)
    ]


def draws(logits: list[float], params: SamplingParams, count: int) -> list[int]:
    """`count` tokens sampled from one logits row, at fixed (seed, position) pairs."""
    keys = [(seed, position) for seed in range(count // 100) for position in range(100)]
    return sampled(torch.tensor([logits]).expand(len(keys), -1), seqs_of(params, keys))


def chi_square(tokens: list[int], probs: list[float]) -> float:
    counts = [tokens.count(i) for i in range(len(probs))]
    return sum((c - len(tokens) * p) ** 2 / (len(tokens) * p) for c, p in zip(counts, probs))


# --- the noise ---


def test_noise_is_splitmix64_of_seed_position_and_vocab_index():
    keys = [(0, 0), (1, 0), (0, 1), (2**62 + 12345, 7), (U64, 2**40), (2**63, 3)]
    signed = [s - (1 << 64) if s >> 63 else s for s, _ in keys]
    noise = uniform_noise(torch.tensor(signed), torch.tensor([p for _, p in keys]), 64)
    expected = [[reference_uniform(s, p, v) for v in range(64)] for s, p in keys]
    assert noise.dtype == torch.float32 and noise.tolist() == expected


def test_noise_of_a_seed_and_position_does_not_depend_on_the_batch_or_its_order():
    rng = random.Random(0)
    seeds = torch.tensor([rng.getrandbits(63) for _ in range(32)])
    positions = torch.tensor([rng.randrange(4096) for _ in range(32)])
    batch = uniform_noise(seeds, positions, 1000)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(uniform_noise(seeds[order], positions[order], 1000), batch[order])
    for i in (0, 17, 31):
        assert torch.equal(
            uniform_noise(seeds[i : i + 1], positions[i : i + 1], 1000), batch[i : i + 1]
        )


def test_noise_is_uniform_in_the_open_interval_and_rows_differ():
    seeds = torch.arange(64).repeat_interleave(4)
    positions = torch.arange(4).repeat(64)  # neighbouring positions of one seed, and seeds
    noise = uniform_noise(seeds, positions, 4096)
    assert noise.min() > 0 and noise.max() < 1
    counts = torch.histc(noise, bins=16, min=0, max=1)
    expected = noise.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7  # chi-square, 15 dof, p = 0.001
    corr = torch.corrcoef(noise)
    assert (corr - torch.eye(len(noise))).abs().max() < 0.1  # 4096 draws: sd 1/64


# --- the filters, on hand-made logits ---


def test_top_k_one_is_argmax_and_tiny_top_p_keeps_only_the_top_token():
    logits = torch.randn(300, 50, generator=torch.Generator().manual_seed(0)) * 3
    keys = [(seed, 5) for seed in range(300)]
    argmax = logits.argmax(dim=-1).tolist()
    assert sampled(logits, seqs_of(SamplingParams(temperature=2.0, top_k=1), keys)) == argmax
    assert sampled(logits, seqs_of(SamplingParams(temperature=2.0, top_p=1e-6), keys)) == argmax


def test_a_token_with_minus_infinite_logit_is_never_drawn():
    tokens = draws([1.0, float("-inf"), 0.5, 2.0], SamplingParams(temperature=1.5), 10_000)
    assert 1 not in tokens and set(tokens) == {0, 2, 3}


def test_draws_follow_softmax_at_the_temperature():
    logits, temperature = [2.0, 1.0, 0.0, -1.0], 0.8
    probs = torch.tensor(logits).div(temperature).softmax(dim=-1).tolist()
    tokens = draws(logits, SamplingParams(temperature=temperature), 20_000)
    assert chi_square(tokens, probs) < CHI2_DF3_P001


def test_top_k_and_top_p_draw_from_the_renormalised_kept_tokens():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    for params in (
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.7),
    ):
        tokens = draws(logits, params, 10_000)
        assert set(tokens) == {0, 1}, params  # top-p: 0.5 before token 2 is < 0.7, 0.8 is not
        assert chi_square(tokens, [5 / 8, 3 / 8]) < CHI2_DF1_P001, params


def test_sorting_only_the_largest_top_k_filters_as_the_whole_sort():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(2))
    top_k = torch.tensor([1, 5, 40, 40, 3, 17, 40, 2])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99, 0.3, 0.8, 1.0])
    whole = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filter_top_k_top_p(logits, top_k, top_p, width=40), whole)
    assert ((whole > float("-inf")).sum(dim=-1) <= top_k).all()


def test_greedy_rows_take_the_argmax_in_a_batch_with_random_and_filtered_rows():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5)] * 3
    seqs = [Sequence(i, [1, 2], 2, p, max_len=100, seed=i) for i, p in enumerate(params)]
    tokens = sample_tokens(logits, seqs)
    assert tokens.dtype == torch.int64
    assert tokens[0::2].tolist() == logits[0::2].argmax(dim=-1).tolist()


def test_a_row_samples_the_same_token_whatever_the_other_rows_are():
    """The same (seed, position, logits) row, alone and among greedy rows, plain random
    rows and rows that make the sampler sort the whole vocab or only the top-k."""
    logits = torch.randn(12, 400, generator=torch.Generator().manual_seed(4)) * 2
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95)
    greedy, top_k_3 = SamplingParams(top_p=0.5), SamplingParams(temperature=2.0, top_k=3)
    mixed = [greedy, top_k_3, SamplingParams(temperature=1.0)]
    mixed.append(SamplingParams(temperature=0.7, top_p=0.6))  # the whole vocab is sorted
    alone = [
        sampled(logits[i : i + 1], [Sequence(0, [0] * 9, 9, target, 10**9, seed=100 + i)])[0]
        for i in range(12)
    ]
    for trial in range(4):
        rng = random.Random(trial)
        # Odd trials: every random row has a top-k, so only the 20 largest logits are sorted.
        mates = [rng.choice(mixed if trial % 2 == 0 else mixed[:2]) for _ in range(12)]
        for row in range(12):
            rows = list(range(12))
            rng.shuffle(rows)
            seqs = [
                Sequence(0, [0] * 9, 9, target if r == row else mates[r], 10**9, seed=100 + r)
                for r in rows
            ]
            tokens = sampled(logits[rows], seqs)
            assert tokens[rows.index(row)] == alone[row], (trial, row)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_never_synchronises_and_draws_what_the_cpu_draws():
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(5)) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, top_p=0.9)]
    params += [SamplingParams(temperature=1.0), SamplingParams(temperature=1.2, top_p=0.8)]
    seqs = [Sequence(i, [0] * i, i, params[i % 4], 10**9, seed=i) for i in range(64)]
    device_logits = logits.cuda()
    sample_tokens(device_logits, seqs)  # pinned buffers and kernels ready
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_tokens(device_logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.tolist() == sampled(logits, seqs)


# --- whole runs on a tiny model ---


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", max_model_len=256)


def token_ids(outputs) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in o.completions] for o in outputs]


def test_a_seeded_record_samples_the_same_tokens_alone_and_in_any_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    target = {"id": "t", "prompt": "Once upon a time", "seed": 5, "top_k": 8, "top_p": 0.9}
    alone = llm.generate([target], params)[0]
    others = [
        {"prompt": "The end of the story", "temperature": 0.0},
        {"prompt": "A small model", "seed": 1},
        {"prompt": "In the spring", "seed": 2, "top_p": 0.5},  # the sampler sorts the vocab
        {"prompt": "Label the review", "seed": 3, "top_k": 40},
    ]
    for batch in (others + [target], [target] + others[::-1], others[2:3] + [target]):
        out = next(o for o in llm.generate(batch, params) if o.id == "t")
        assert out.completions[0].token_ids == alone.completions[0].token_ids
    seeded = llm.generate([{**target, "seed": s} for s in range(4)], params)
    assert len({o.completions[0].token_ids for o in seeded}) > 1  # the seed matters


def test_preemption_samples_the_same_tokens(tiny_model_dirs):
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((12, 30, 45, 20, 60, 38))]
    records = [
        Record(id=i, prompt_token_ids=tuple(p), overrides={"seed": i})
        for i, p in enumerate(prompts)
    ]
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, ignore_eos=True)
    roomy = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=8)
    small = LLM(
        tiny_model_dirs["llama"],
        device="cpu",
        dtype="float32",
        block_size=8,
        num_blocks=14,
        max_batch_tokens=48,
    )
    assert token_ids(small.generate(records, params)) == token_ids(roomy.generate(records, params))
    assert small.stats().preemptions > 0, "the pool was meant to be too small for all sequences"


@pytest.mark.parametrize("sharing", [True, False])
def test_sample_k_of_n_is_the_record_alone_with_its_derived_seed(tiny_model_dirs, sharing):
    llm = LLM(
        tiny_model_dirs["llama"],
        device="cpu",
        dtype="float32",
        block_size=8,
        prefix_sharing=sharing,
    )
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=30, seed=11, ignore_eos=True)
    record = Record(id="r", prompt_token_ids=tuple(range(5, 26)), overrides={"n": 3})
    samples = llm.generate([record], params)[0].completions
    assert len({c.token_ids for c in samples}) == 3
    seed = derive_seed(11, "r")  # the record has no seed of its own: from the job's and its id
    for k, choice in enumerate(samples):
        alone = Record(id="r", prompt_token_ids=record.prompt_token_ids,
                       overrides={"seed": sample_seed(seed, k)})  # fmt: skip
        assert llm.generate([alone], params)[0].completions[0].token_ids == choice.token_ids


def test_a_sequence_without_a_seed_draws_a_63_bit_one():
    seeds = {Sequence(i, [1], 1, SamplingParams(), 10).seed for i in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


# --- stop strings on the newly decoded text ---


def whole_output_stop(checker: StopChecker, output: list[int], stops: list[str]):
    """The check before incremental decoding: the whole output decoded every step."""
    for n in range(1, len(output) + 1):
        text = checker.decode(output[:n])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return n, text[: min(hits)]
    return len(output), checker.decode(output)


def incremental_stop(checker: StopChecker, output: list[int], stops: list[str]):
    params = SamplingParams(stop=tuple(stops), ignore_eos=True)
    seq = Sequence(0, [1, 5, 9], 3, params, max_len=10**9)
    for token in output:
        seq.token_ids.append(token)
        if checker.check(seq) is not None:
            break
    return seq.num_output_tokens, checker.text(seq)


SAMPLE_TEXTS = (
    "héllo wörld ✓ 日本語 and the quick brown fox",
    "Paris is the capital of France. Ünïcödé: €100, 😀 ok",
    "<|im_end|> special <|im_start|> tokens, ß and ñ",
)


def random_outputs(tokenizer, rng: random.Random, count: int, length: int = 40):
    """Token ids mixing pieces of real text (multi-byte characters split across tokens)
    with random ids (specials, stray bytes that decode to U+FFFD)."""
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            if rng.random() < 0.6:
                piece = tokenizer(rng.choice(SAMPLE_TEXTS))["input_ids"]
                start = rng.randrange(len(piece))
                ids += piece[start : start + rng.randint(1, 12)]
            else:
                ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 3))]
        yield ids[:length]


def random_stops(text: str, rng: random.Random) -> list[str]:
    """Stop strings cut from the text (so most hit, across token boundaries), or absent."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        start = rng.randrange(len(text)) if text else 0
        stops.append(text[start : start + rng.randint(1, 6)])
    if rng.random() < 0.3:
        stops.append("never there")
    return [s for s in stops if s] or ["never there"]


def check_stops_match_the_whole_output_check(tokenizer, count: int) -> int:
    checker, rng, stopped = StopChecker(tokenizer, frozenset()), random.Random(0), 0
    for output in random_outputs(tokenizer, rng, count):
        stops = random_stops(checker.decode(output), rng)
        expected = whole_output_stop(checker, output, stops)
        assert incremental_stop(checker, output, stops) == expected, (output, stops)
        stopped += expected[0] < len(output)
    return stopped


def test_stop_strings_end_the_output_where_the_whole_output_check_did():
    assert check_stops_match_the_whole_output_check(build_tiny_tokenizer(), 300) > 150


@pytest.mark.slow
def test_stop_strings_on_the_smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert check_stops_match_the_whole_output_check(tokenizer, 150) > 75


def test_the_incremental_text_is_the_whole_decode_at_every_step():
    tokenizer = build_tiny_tokenizer()
    checker, rng = StopChecker(tokenizer, frozenset()), random.Random(1)
    for output in random_outputs(tokenizer, rng, 50):
        detokenizer = IncrementalDetokenizer(checker.decode, 0, keep=10**9)
        for n in range(1, len(output) + 1):
            assert detokenizer.update(output[:n]) == checker.decode(output[:n])
        # Each step decodes a window: the tokens last read and the ones after them.
        assert detokenizer.read_offset - detokenizer.prefix_offset < 12


class ToyTokenizer:
    """A decoder that is not a plain concatenation of pieces: it drops the leading space
    of the text (as SentencePiece decoders do) or the space before '.' and ',' (as
    clean-up does). The incremental check is not exact for a decoder that does both."""

    PIECES = (" a", " b", "b", " .", ".", " ,", "x", " ", "é", "ab", " c.")

    def __init__(self, strips_leading_space: bool) -> None:
        self.strips_leading_space = strips_leading_space

    def __len__(self) -> int:
        return len(self.PIECES)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join(self.PIECES[i] for i in ids)
        if self.strips_leading_space:
            return text.removeprefix(" ")
        return text.replace(" .", ".").replace(" ,", ",")


@pytest.mark.parametrize("strips_leading_space", [True, False])
def test_stop_strings_with_decoders_that_strip_or_join_spaces(strips_leading_space):
    tokenizer = ToyTokenizer(strips_leading_space)
    checker, rng = StopChecker(tokenizer, frozenset()), random.Random(2)
    for _ in range(1000):
        output = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))]
        stops = random_stops(checker.decode(output), rng)
        expected = whole_output_stop(checker, output, stops)
        assert incremental_stop(checker, output, stops) == expected, (output, stops)
