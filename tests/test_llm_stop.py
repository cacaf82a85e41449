"""`LLM.generate(should_stop=...)` and the seeds of records without one."""

from __future__ import annotations

import pytest

from pagedbatch import LLM, SamplingParams
from pagedbatch.sampling_params import derive_seed

PROMPTS = [{"id": f"p{i}", "prompt": f"The story number {i} begins"} for i in range(8)]


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64, max_num_seqs=3
    )


def test_should_stop_drops_what_runs_and_keeps_the_llm_usable(llm):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    full = llm.generate(PROMPTS, params)
    steps = 0

    def after_12_steps() -> bool:
        return steps >= 12

    def count(stats) -> None:
        nonlocal steps
        steps += 1

    emitted = []
    partial = llm.generate(
        PROMPTS, params, on_output=emitted.append, on_step=count, should_stop=after_12_steps
    )
    assert steps == 12 and 0 < len(partial) < len(PROMPTS)
    assert sorted(o.id for o in partial) == sorted(o.id for o in emitted)
    ids = [o.id for o in partial]
    assert ids == [p["id"] for p in PROMPTS if p["id"] in ids]  # input order
    finished = {o.id: o for o in full}
    assert all(o == finished[o.id] for o in partial)  # whole records, as in a full run
    engine = llm.engine
    assert not engine.has_unfinished() and engine.stats().blocks_in_use == 0
    assert llm.generate(PROMPTS, params) == full  # nothing left behind


def test_should_stop_before_anything_runs(llm):
    assert llm.generate(PROMPTS, SamplingParams(max_tokens=4), should_stop=lambda: True) == []


def test_records_without_a_seed_derive_it_from_the_job_seed_and_their_id(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    derived = llm.generate(PROMPTS[:3], params)
    explicit = [{**p, "seed": derive_seed(7, p["id"])} for p in PROMPTS[:3]]
    assert [o.completions for o in llm.generate(explicit, params)] == [
        o.completions for o in derived
    ]
    # Alone, reordered or with another job seed: each record keeps (or changes) its own text.
    alone = llm.generate([PROMPTS[2]], params)[0]
    assert alone.completions == derived[2].completions
    other = llm.generate(
        PROMPTS[:3], SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)
    )
    assert [o.completions for o in other] != [o.completions for o in derived]


def test_a_length_cut_inside_a_character_leaves_its_bytes_out_of_the_text():
    from tiny_models import build_tiny_tokenizer

    from pagedbatch.engine.sequence import Sequence
    from pagedbatch.engine.stopping import StopChecker
    from pagedbatch.sampling_params import SamplingParams

    tokenizer = build_tiny_tokenizer()
    hi = tokenizer.encode("Hi", add_special_tokens=False)
    first_byte = tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3: the first half of "é"
    second_byte = tokenizer.convert_tokens_to_ids("©")  # byte 0xA9: its second half
    assert tokenizer.decode([*hi, first_byte]) == "Hi\ufffd"
    checker = StopChecker(tokenizer, frozenset({2}))

    def finished(output: list[int], reason: str) -> Sequence:
        seq = Sequence(0, [5, *output], 1, SamplingParams(max_tokens=len(output)), 1 + len(output))
        seq.finish_reason = reason
        return seq

    cut = finished([*hi, first_byte], "length")
    assert checker.text(cut) == "Hi" and cut.output_ids == [*hi, first_byte]
    assert checker.text(finished([*hi, first_byte, second_byte], "length")) == "Hié"
    assert checker.text(finished([*hi, first_byte], "stop")) == "Hi\ufffd"  # EOS: as decoded
