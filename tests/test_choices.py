"""--choices: each label's log-probability as a continuation of the prompt, scored on the
paged engine (no decoding loop), checked against a plain transformers forward."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from job_helpers import ROOT, by_id, invoke, one_line_error, read_lines, tiny_args, write_jsonl
from tiny_models import ARCHS
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.cascade import ANY_GROUP

# Different token lengths; "the cat" and "the dog" share their first token.
CHOICES = ("yes", "no way", "the cat sat", "the dog", "a")


def reference_score(model, prompt: list[int], choice: list[int]) -> float:
    """The sum of the choice's token log-probabilities after the prompt (float32)."""
    ids = torch.tensor([prompt + choice])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = logits.log_softmax(dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(choice))


def check_scores(llm: LLM, model, prompts: list[str], outputs) -> None:
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.error is None, output.error
        ids = llm.tokenizer.encode(prompt)
        assert [c.text for c in output.choices] == list(CHOICES)
        for choice in output.choices:
            tokens = llm.tokenizer.encode(choice.text, add_special_tokens=False)
            assert choice.tokens == len(tokens)
            want = reference_score(model, ids, tokens)
            assert choice.logprob == pytest.approx(want, abs=1e-4), (prompt, choice.text)
        assert math.fsum(c.prob for c in output.choices) == pytest.approx(1.0)
        assert output.label == max(output.choices, key=lambda c: c.logprob).text


PROMPTS = [
    "the cat sat on the mat and then the dog came in to see the cat",
    "a dog ran",
    "the cat sat on the mat and then the dog came in",  # shares a long prefix
    "the cat sat on the mat and then the dog came in to see the cat",  # again: cached
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "engine",
    [
        {"prefix_sharing": True, "cascade": True},
        {"prefix_sharing": True, "cascade": False},
        {"prefix_sharing": False},
    ],
    ids=["sharing-cascade", "sharing", "no-sharing"],
)
def test_choice_logprobs_equal_a_transformers_forward(arch, engine, tiny_model_dirs):
    llm = LLM(tiny_model_dirs[arch], device="cpu", num_blocks=64, block_size=4, **engine)
    llm.engine.runner.cascade_rule = ANY_GROUP  # any group: the short prompts' extends too
    outputs = llm.generate(PROMPTS, SamplingParams(choices=CHOICES))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    check_scores(llm, model, PROMPTS, outputs)
    llm.engine.check_integrity()
    assert llm.stats().generated_tokens == 0  # nothing was sampled


def test_choices_survive_chunked_prefill_and_preemption(tiny_model_dirs):
    # 3-token steps cut prompts and choices into chunks; 9 blocks of 4 tokens cannot hold
    # every record's choices at once, so sequences are preempted and recomputed.
    llm = LLM(tiny_model_dirs["mistral"], device="cpu", num_blocks=9, block_size=4,
              max_batch_tokens=3)  # fmt: skip
    prompts = PROMPTS * 2
    outputs = llm.generate(prompts, SamplingParams(choices=CHOICES))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mistral"], dtype=torch.float32)
    check_scores(llm, model, prompts, outputs)
    assert llm.stats().preemptions > 0
    llm.engine.check_integrity()


def test_mean_score_ranks_by_the_per_token_mean(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    params = SamplingParams(choices=CHOICES)
    summed = llm.generate([PROMPTS[1]], params)[0]
    output = llm.generate([PROMPTS[1]], dataclasses.replace(params, choice_score="mean"))[0]
    assert [c.logprob for c in output.choices] == pytest.approx([c.logprob for c in summed.choices])
    means = [c.logprob / c.tokens for c in output.choices]
    top = max(means)
    weights = [math.exp(m - top) for m in means]
    assert [c.prob for c in output.choices] == pytest.approx([w / sum(weights) for w in weights])
    assert output.label == CHOICES[means.index(top)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"choices": []}, "choices must be a non-empty list of strings"),
        ({"choices": ["yes", ""]}, "every choice must be a non-empty string"),
        ({"choices": ["yes", "yes"]}, "choices must differ"),
        ({"choices": ["yes", "no"], "n": 2}, "n must be 1 with choices"),
        ({"choices": "yes"}, "choices must be a non-empty list of strings"),
        ({"choices": ["yes", "word " * 80]}, "does not fit the context"),
    ],
)
def test_bad_choices_are_a_record_error(record, message, tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64, max_model_len=64)
    bad, good = llm.generate([{"prompt": "hi there", **record}, {"prompt": "hi", "choices": ["a"]}])
    assert bad.error is not None and bad.error.code == "invalid_params", bad
    assert message in bad.error.message
    assert good.error is None and good.label == "a"


def test_cli_lines_plain_and_openai_batch(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "the cat sat"},
        {"id": "b", "prompt": "a dog ran", "choices": ["up", "down"]},  # the record's win
        {"id": "c", "prompt": "a dog ran", "choices": ["up"], "n": 3},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--choices", "yes, no way", "-o", out)
    result = invoke(src, *args)
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(out))
    a = lines["a"]
    assert set(a) == {"id", "label", "choices", "usage"}
    assert [c["text"] for c in a["choices"]] == ["yes", "no way"]
    assert set(a["choices"][0]) == {"text", "logprob", "prob", "tokens"}
    assert a["label"] in ("yes", "no way") and a["usage"]["completion_tokens"] == 0
    assert [c["text"] for c in lines["b"]["choices"]] == ["up", "down"]
    assert lines["c"]["error"]["code"] == "invalid_params"
    assert "records/s" in result.stderr

    batch = write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "cat?"}], "choices": ["yes", "no"]}},
    ])  # fmt: skip
    out = tmp_path / "batch_out.jsonl"
    assert invoke(batch, *tiny_args(tiny_model_dirs["llama"], "-o", out)).exit_code == 0
    [line] = read_lines(out)
    body = line["response"]["body"]
    scores = body["choice_scores"]
    label = max(scores, key=lambda c: c["prob"])["text"]
    assert body["choices"][0]["message"]["content"] == label
    assert [c["text"] for c in scores] == ["yes", "no"]


def test_a_bad_choices_flag_is_one_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    message = one_line_error(invoke(src, "--choices", "[1, 2]"))
    assert "choices must be a JSON list of strings" in message


@pytest.mark.slow
def test_choice_logprobs_on_smollm2_labelling_records(smollm2_dir):
    from pagedbatch.job.records import parse_record

    rows = [
        json.loads(line) for line in (ROOT / "examples" / "label_job.jsonl").open()
    ][:3]  # fmt: skip
    choices = ("positive", "negative", "mixed", " positive")  # " positive": other tokens
    llm = LLM(str(smollm2_dir), device="cpu", num_blocks=256)
    outputs = llm.generate(rows, SamplingParams(choices=choices))
    # The shared instruction is computed once: the records after the first take it cached.
    assert sum(o.cached_tokens > 0 for o in outputs) == len(rows) - 1
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        assert output.error is None, output.error
        ids = llm.prompts.token_ids(parse_record(row, default_id=i))
        for choice in output.choices:
            tokens = llm.tokenizer.encode(choice.text, add_special_tokens=False)
            want = reference_score(model, ids, tokens)
            assert choice.logprob == pytest.approx(want, abs=1e-4), (row["id"], choice.text)
