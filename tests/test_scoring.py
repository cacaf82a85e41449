"""Choice scoring in the engine (engine/scoring.py): the family the engine builds from a
request, the blocks its sequences hold step by step, the logits rows each step scores, and
the one rule of which scheduled sequences sample."""

from __future__ import annotations

import math
from array import array

import pytest
import torch
from test_choices import reference_score
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.scheduler import ScheduledSeq, SchedulerOutput
from pagedbatch.engine.scoring import choice_family, choice_logprobs
from pagedbatch.engine.sequence import Sequence

PROMPT = array("i", range(10, 20))  # 10 tokens: blocks of 4, 4 and 2 tokens
CHOICES = [[5], [6, 7], [6, 8, 9]]
PARAMS = SamplingParams(choices=("a", "b c", "b d e"))


def recorded(llm: LLM) -> list:
    """The engine's batches, as the real runner prepares them, one per step."""
    batches, prepare = [], llm.engine.runner.prepare

    def recording(out):
        batches.append(prepare(out))
        return batches[-1]

    llm.engine.runner.prepare = recording
    return batches


def check_scores(tiny_model_dirs, family: list[Sequence]) -> None:
    """Each choice's token log-probabilities equal a transformers forward's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.float32)
    choices = [s for s in family if s.choice_ids is not None]
    for seq, tokens in zip(choices, CHOICES, strict=True):
        for k in range(len(tokens)):
            want = reference_score(model, [*PROMPT, *tokens[:k]], [tokens[k]])
            assert seq.choice_logprobs[k] == pytest.approx(want, abs=1e-4), (tokens, k)
    sums = [(reference_score(model, list(PROMPT), t), len(t)) for t in CHOICES]
    assert choice_logprobs(family) == [(pytest.approx(s, abs=1e-4), n) for s, n in sums]


def test_the_engine_forks_the_choices_onto_the_prompt_blocks_and_scores_each_token(
    tiny_model_dirs,
):
    llm = LLM(tiny_model_dirs["qwen2"], device="cpu", dtype="float32", num_blocks=16, block_size=4)
    engine, batches = llm.engine, recorded(llm)
    family = engine.add_choices(PROMPT, CHOICES, PARAMS, request_id="r")
    parent, one, two, three = family
    assert parent.scores_only and parent.forks == [one, two, three]
    assert [list(s.token_ids) for s in family] == [
        [*PROMPT], [*PROMPT], [*PROMPT, 6], [*PROMPT, 6, 8]
    ]  # fmt: skip
    assert [s.choice_ids for s in family] == [None, (5,), (6, 7), (6, 8, 9)]
    assert {s.request_id for s in family} == {"r"} and engine.num_waiting() == 1

    # Step 1: the parent computes the prompt; its last row scores every first token; the
    # choices fork from it and the one-token choice is done with it.
    assert engine.step() == [parent, one]
    scoring = batches[0].scores
    assert batches[0].logits_indices.tolist() == [9] and scoring.first_row == 0
    assert scoring.target_rows.tolist() == [0, 0, 0] and scoring.targets.tolist() == [5, 6, 6]
    assert scoring.owners == [(one, 0), (two, 0), (three, 0)]
    assert scoring.parents == [parent] and scoring.ended == [parent, one]
    assert list(engine.scheduler.running) == [two, three]
    assert two.block_table == three.block_table and len(two.block_table) == 3
    assert two.num_computed_tokens == three.num_computed_tokens == 10
    assert engine.pool.refcount(two.block_table[2]) == 2  # the partial block, shared
    assert two.choice_logprobs[1:] == [None] and three.choice_logprobs[1:] == [None, None]

    # Step 2: each choice computes its own tokens, copying the shared partial block first.
    shared = three.block_table[2]
    assert engine.step() == [two, three]
    assert batches[1].logits_indices.tolist() == [0, 1, 2]
    assert batches[1].scores.targets.tolist() == [7, 8, 9]
    assert batches[1].scores.owners == [(two, 1), (three, 1), (three, 2)]
    assert batches[1].num_sampled == 0 and not engine.has_unfinished()
    assert engine.block_manager.usage.in_use == 0 and engine.pool.refcount(shared) == 1
    engine.check_integrity()
    check_scores(tiny_model_dirs, family)
    assert engine.stats().generated_tokens == 0 and engine.stats().steps == 2


def test_without_prefix_sharing_each_choice_computes_the_prompt_and_scores_from_its_end(
    tiny_model_dirs,
):
    llm = LLM(tiny_model_dirs["qwen2"], device="cpu", dtype="float32", num_blocks=16, block_size=4,
              prefix_sharing=False)  # fmt: skip
    engine, batches = llm.engine, recorded(llm)
    family = engine.add_choices(PROMPT, CHOICES, PARAMS)
    assert [s.choice_ids for s in family] == [(5,), (6, 7), (6, 8, 9)]
    assert not any(s.forks or s.scores_only for s in family) and engine.num_waiting() == 3
    assert engine.step() == family  # 10 + 11 + 12 tokens in one step
    # Rows 9 (choice 1), 10 + 9, 10 (choice 2), 21 + 9, 10, 11 (choice 3): from the prompt's end.
    assert batches[0].logits_indices.tolist() == [9, 19, 20, 30, 31, 32]
    assert batches[0].scores.targets.tolist() == [5, 6, 7, 6, 8, 9]
    assert batches[0].scores.ended == family and batches[0].scores.parents == []
    check_scores(tiny_model_dirs, family)


def test_add_samples_builds_one_sequence_per_seed_forked_from_the_first(tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs["qwen2"], device="cpu", dtype="float32", num_blocks=16, max_model_len=14
    )
    params = SamplingParams(max_tokens=8, n=3)
    seqs = llm.engine.add_samples(PROMPT, params, [7, None, 9], request_id=4)
    assert seqs[0].forks == seqs[1:] and llm.engine.num_waiting() == 1
    assert [s.seed for s in seqs][::2] == [7, 9] and isinstance(seqs[1].seed, int)
    assert {s.max_len for s in seqs} == {14}  # the context, before prompt + max_tokens (18)
    assert all(list(s.token_ids) == list(PROMPT) for s in seqs)
    assert seqs[0].token_ids is not seqs[1].token_ids  # each appends its own tokens


def test_only_a_generating_sequence_that_completes_samples():
    gen = Sequence(0, [1] * 6, 6, SamplingParams(), 10)
    assert ScheduledSeq(gen, 6).samples and ScheduledSeq(gen, 6).completes
    assert not ScheduledSeq(gen, 5).samples  # a prompt chunk: nothing to sample yet
    parent, choice = choice_family(iter(range(9)), array("i", [1] * 6), [[4]], PARAMS, None,
                                   share_prompt=True)  # fmt: skip
    for seq in (parent, choice):
        assert seq.is_scoring and ScheduledSeq(seq, seq.num_tokens).completes
        assert not ScheduledSeq(seq, seq.num_tokens).samples  # scored, never sampled
    chunk = Sequence(1, [1] * 6, 6, SamplingParams(), 10)
    out = SchedulerOutput()
    for seq, n in ((parent, 6), (gen, 6), (chunk, 2)):
        out.add(seq, n, seq.num_uncomputed_tokens)
    assert out.samples == [False, True, False] and out.sampling == [gen]


def test_a_step_of_generation_and_choices_samples_its_first_rows_and_scores_the_rest(
    tiny_model_dirs,
):
    llm = LLM(tiny_model_dirs["qwen2"], device="cpu", dtype="float32", num_blocks=16, block_size=4)
    engine, batches = llm.engine, recorded(llm)
    family = engine.add_choices(PROMPT, CHOICES, PARAMS)
    (gen,) = engine.add_samples(array("i", [3, 4, 5]), SamplingParams(max_tokens=2), [1])
    assert engine.step() == family[:2]
    # The generating sequence samples from row 0 (its last token, index 12); the parent's
    # last token (index 9) scores the choices' first tokens.
    assert batches[0].logits_indices.tolist() == [12, 9] and batches[0].num_sampled == 1
    assert gen.num_output_tokens == 1 and not batches[0].decode_only
    while engine.has_unfinished():
        engine.step()
    assert gen.num_output_tokens == 2 and math.isfinite(sum(family[3].choice_logprobs))
    engine.check_integrity()
