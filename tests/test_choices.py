"""--choices: each label's log-probability as a continuation of the prompt, scored on the
paged engine (no decoding loop), checked against a plain transformers forward."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch
from job_helpers import ROOT, by_id, invoke, one_line_error, read_lines, tiny_args, write_jsonl
from tiny_models import ARCHS, ENGINE_PATHS
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.cascade import ANY_GROUP
from pagedbatch.requests.records import Record

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
        softmax = torch.tensor([c.logprob for c in output.choices], dtype=torch.float64).softmax(0)
        assert [c.prob for c in output.choices] == pytest.approx(softmax.tolist(), abs=1e-12)
        assert math.fsum(c.prob for c in output.choices) == pytest.approx(1.0)
        assert output.label == max(output.choices, key=lambda c: c.logprob).text


PROMPTS = [
    "the cat sat on the mat and then the dog came in to see the cat",
    "a dog ran",
    "the cat sat on the mat and then the dog came in",  # shares a long prefix
    "the cat sat on the mat and then the dog came in to see the cat",  # again: cached
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("engine", ENGINE_PATHS.values(), ids=ENGINE_PATHS.keys())
def test_choice_logprobs_equal_a_transformers_forward(arch, engine, tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs[arch], device="cpu", dtype="float32", num_blocks=64, block_size=4, **engine
    )
    llm.engine.runner.cascade_rule = ANY_GROUP  # any group: the short prompts' extends too
    tokens = [llm.tokenizer.encode(c, add_special_tokens=False) for c in CHOICES]
    assert tokens[2][:2] == tokens[3][:2]  # "the cat sat" and "the dog" share two tokens
    outputs = llm.generate(PROMPTS, SamplingParams(choices=CHOICES))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    check_scores(llm, model, PROMPTS, outputs)
    llm.engine.check_integrity()
    stats = llm.stats()
    assert stats.generated_tokens == 0  # nothing was sampled
    # No decoding loop: fewer steps than the longest choice has tokens, all records together.
    assert stats.steps < max(map(len, tokens))
    # The paths named in the id ran: the cache served prompts, cascade read shared pages once.
    assert (stats.prefix_hit_tokens > 0) == engine["prefix_sharing"]
    assert (stats.cascade_saved_token_reads > 0) == engine.get("cascade", False)


@pytest.mark.parametrize("sharing", [True, False], ids=["sharing", "no-sharing"])
def test_the_lm_head_runs_only_on_the_rows_that_score(sharing, tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen2"], device="cpu", dtype="float32", num_blocks=64, block_size=4,
              prefix_sharing=sharing)  # fmt: skip
    rows: list[int] = []
    llm.model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    prompts = ["a dog ran", "the cat sat on the mat"]
    outputs = llm.generate(prompts, SamplingParams(choices=CHOICES))
    lengths = [c.tokens for c in outputs[0].choices]
    # Sharing: each prompt's last position once (every choice's first token), then each
    # choice's positions after its first token. Without: every choice from the prompt's last.
    per_record = 1 + sum(n - 1 for n in lengths) if sharing else sum(lengths)
    assert sum(rows) == len(prompts) * per_record


def test_unicode_choices_and_one_of_many_tokens(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], device="cpu", dtype="float32", num_blocks=64, block_size=4)
    choices = ("été", "日本語", "🙂 ok", "a")  # 5, 9, 6 and 1 byte-level tokens
    prompts = ["the cat sat", "le chat était"]
    outputs = llm.generate(prompts, SamplingParams(choices=choices))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert [c.text for c in output.choices] == list(choices)
        assert [c.tokens for c in output.choices] == [5, 9, 6, 1]
        ids = llm.tokenizer.encode(prompt)
        for choice in output.choices:
            tokens = llm.tokenizer.encode(choice.text, add_special_tokens=False)
            assert choice.logprob == pytest.approx(reference_score(model, ids, tokens), abs=1e-4)
        assert json.loads(json.dumps(output.to_json(), ensure_ascii=False))["label"] == output.label


def test_choices_survive_chunked_prefill_and_preemption(tiny_model_dirs):
    # 3-token steps cut prompts and choices into chunks; 9 blocks of 4 tokens cannot hold
    # every record's choices at once, so sequences are preempted and recomputed.
    llm = LLM(tiny_model_dirs["mistral"], device="cpu", dtype="float32", num_blocks=9, block_size=4,
              max_batch_tokens=3)  # fmt: skip
    prompts = PROMPTS * 2
    outputs = llm.generate(prompts, SamplingParams(choices=CHOICES))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mistral"], dtype=torch.float32)
    check_scores(llm, model, prompts, outputs)
    assert llm.stats().preemptions > 0
    llm.engine.check_integrity()


def test_mean_score_ranks_by_the_per_token_mean(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
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
        ({"choices": []}, "choices must be a non-empty list of strings, got []"),
        ({"choices": ["yes", ""]}, "every choice must be a non-empty string, got ''"),
        ({"choices": ["yes", 3]}, "every choice must be a non-empty string, got 3"),
        ({"choices": ["yes", "no", "yes"]}, "choices must differ from each other: 'yes' is"),
        # Checked in linear time (this took 15 s when each choice was counted), and bounded.
        ({"choices": [f"c{i}" for i in range(40_000)] + ["c0"]},
         "choices: at most 1024 a record, got 40001"),
        ({"choices": [f"c{i}" for i in range(1_000)] + ["c0"]},
         "choices must differ from each other: 'c0' is repeated"),
        ({"choices": ["yes", "no"], "n": 2}, "n must be 1 with choices"),
        ({"choices": ["yes", "no"], "logprobs": 2}, "logprobs applies to generated tokens"),
        ({"choices": "yes"}, "choices must be a non-empty list of strings, got 'yes'"),
        ({"choices": ["yes", "word " * 80]}, "(241 tokens) after the prompt (4 tokens) does "
         "not fit the model's context (64 tokens)"),
    ],
)  # fmt: skip
def test_bad_choices_are_a_record_error(record, message, tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64, max_model_len=64
    )
    bad, good = llm.generate([{"prompt": "hi there", **record}, {"prompt": "hi", "choices": ["a"]}])
    assert bad.error is not None and bad.error.code == "invalid_params", bad
    assert message in bad.error.message
    assert len(bad.error.message) < 160  # a long choice is cut in the message
    assert good.error is None and good.label == "a"


def test_a_choice_fits_when_prompt_and_choice_fit_the_context_and_the_cache(tiny_model_dirs):
    # max_model_len counts the prompt and the whole choice, as it counts prompt and output;
    # the KV cache holds all but the choice's last token (scored, never computed).
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=3, block_size=4,
              max_model_len=13)  # fmt: skip
    prompt = llm.tokenizer.encode("the cat sat on the mat")
    choice = llm.tokenizer.encode("the dog", add_special_tokens=False)
    assert len(prompt) + len(choice) == 15
    params = SamplingParams(choices=("the dog",))
    fits = Record(0, prompt_token_ids=tuple(prompt[:9]))  # 13 tokens, 12 in the cache
    too_long = Record(1, prompt_token_ids=tuple(prompt[:10]))  # 14 tokens
    out, long = llm.generate([fits, too_long], params)
    assert out.error is None and out.label == "the dog"
    assert long.error is not None
    assert "does not fit the model's context (13 tokens)" in long.error.message
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=3, block_size=4)
    (over,) = llm.generate([too_long], params)  # 13 tokens to compute
    assert "does not fit the KV cache (3 blocks of 4 tokens)" in over.error.message


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
        {"custom_id": "t", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "the cat sat", "choices": ["yes", "no"]}},
        {"custom_id": "flag", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "the cat sat"}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "the cat sat", "choices": ["yes", ""]}},
    ])  # fmt: skip
    out = tmp_path / "batch_out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--choices", "up,down", "-o", out)
    assert invoke(batch, *args).exit_code == 0
    lines = by_id(read_lines(out))
    for cid, texts in (("q", ["yes", "no"]), ("t", ["yes", "no"]), ("flag", ["up", "down"])):
        body = lines[cid]["response"]["body"]
        scores = body["choice_scores"]
        assert [c["text"] for c in scores] == texts
        assert set(scores[0]) == {"text", "logprob", "prob", "tokens"}
        label = max(scores, key=lambda c: c["prob"])["text"]
        answer = body["choices"][0]
        assert (answer["message"]["content"] if cid == "q" else answer["text"]) == label
        assert answer["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 0
    # The same prompt and choice as record "a" of the plain file: the same score.
    yes = lines["t"]["response"]["body"]["choice_scores"][0]
    assert yes["logprob"] == pytest.approx(a["choices"][0]["logprob"], abs=1e-5)
    assert lines["bad"]["error"]["code"] == "invalid_params"


def test_choices_resume_in_input_order_with_an_errors_file(tmp_path, tiny_model_dirs):
    rows = [{"id": f"r{i}", "prompt": f"story number {i} " * (1 + i % 3)} for i in range(6)]
    rows.insert(3, {"id": "bad", "prompt": "x", "choices": []})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--choices", '["yes", " no"]', "--order",
                     "input", "--errors", errors, "--max-num-seqs", "4")  # fmt: skip
    assert invoke(src, "-o", out, *args).exit_code == 0
    assert [line["id"] for line in read_lines(out)] == [r["id"] for r in rows]
    (tmp_path / "full.jsonl").write_bytes(out.read_bytes())
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:20])  # killed while writing line 3
    result = invoke(src, "-o", out, *args, "--resume")
    assert result.exit_code == 0, result.output
    assert "skipped 2 already done" in result.stderr
    resumed = read_lines(out)
    assert resumed[:2] == read_lines(tmp_path / "full.jsonl")[:2]
    # Input order again; the scores of the records run again equal up to float noise (their
    # batches differ).
    for before, after in zip(read_lines(tmp_path / "full.jsonl"), resumed, strict=True):
        assert after["id"] == before["id"] and after.get("label") == before.get("label")
        for x, y in zip(before.get("choices", []), after.get("choices", []), strict=True):
            assert y["logprob"] == pytest.approx(x["logprob"], abs=1e-4)
    assert [(e["id"], e["pagedbatch_error"]["code"]) for e in read_lines(errors)] == [
        ("bad", "invalid_params")
    ]
    other = tiny_args(tiny_model_dirs["llama"], "--choices", "yes,maybe", "-o", out)
    error = one_line_error(invoke(src, *other, "--resume"))
    assert 'choices (["yes", " no"] -> ["yes", "maybe"])' in error


def test_a_bad_choices_flag_is_one_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    message = one_line_error(invoke(src, "--choices", "[1, 2]"))
    assert "choices must be a JSON list of strings" in message
    labels = ",".join(f"label{i}" for i in range(1025))
    assert "choices: at most 1024 a record, got 1025" in one_line_error(
        invoke(src, "--choices", labels)
    )


@pytest.mark.slow
def test_choice_logprobs_on_smollm2_labelling_records(smollm2_dir):
    from pagedbatch.requests.records import parse_record

    rows = [
        json.loads(line) for line in (ROOT / "examples" / "label_job.jsonl").open()
    ][:3]  # fmt: skip
    choices = ("positive", "negative", "mixed", " positive")  # " positive": other tokens
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    reference = functools.cache(lambda ids, tokens: reference_score(model, list(ids), list(tokens)))
    for sharing in (True, False):
        llm = LLM(
            str(smollm2_dir), device="cpu", dtype="float32", num_blocks=256, prefix_sharing=sharing
        )
        outputs = llm.generate(rows, SamplingParams(choices=choices))
        # With sharing, the instruction is computed once: the later records take it cached.
        assert sum(o.cached_tokens > 0 for o in outputs) == (len(rows) - 1 if sharing else 0)
        for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
            assert output.error is None, output.error
            ids = llm.prompts.token_ids(parse_record(row, default_id=i))
            for choice in output.choices:
                tokens = llm.tokenizer.encode(choice.text, add_special_tokens=False)
                want = reference(tuple(ids), tuple(tokens))
                assert choice.logprob == pytest.approx(want, abs=1e-4), (row["id"], choice.text)


@pytest.mark.slow
def test_bfloat16_labels_agree_with_float32_on_the_label_job(smollm2_dir):
    rows = [json.loads(line) for line in (ROOT / "examples" / "label_job.jsonl").open()]
    params = SamplingParams(choices=("positive", "negative", "mixed"))
    scored = {
        dtype: LLM(str(smollm2_dir), device="cpu", dtype=dtype).generate(rows, params)
        for dtype in ("float32", "bfloat16")
    }
    pairs = list(zip(scored["float32"], scored["bfloat16"], strict=True))
    assert sum(a.label == b.label for a, b in pairs) >= 0.97 * len(rows)
    # measured: at most 0.047 apart
    for a, b in pairs:
        assert [c.prob for c in b.choices] == pytest.approx([c.prob for c in a.choices], abs=0.1)


def test_choices_and_generation_in_the_same_steps(tiny_model_dirs):
    # Records that score choices and records that generate (with logprobs) run together:
    # the LM head's rows hold the sampling rows, then the scoring rows, in one step.
    from test_logprobs import check_logprobs, reference_logprobs

    llm = LLM(tiny_model_dirs["qwen3"], device="cpu", dtype="float32", num_blocks=64, block_size=4)
    records = [
        {"prompt": p, "choices": list(CHOICES)} if i % 2 else {"prompt": p, "logprobs": 2}
        for i, p in enumerate(PROMPTS)
    ]
    both = []  # per step: whether its LM head ran on sampling rows and scoring rows
    prepare = llm.engine.runner.prepare  # the real one, its batches recorded

    def recording(out):
        batch = prepare(out)
        both.append(batch.scores is not None and batch.num_sampled > 0)
        return batch

    llm.engine.runner.prepare = recording
    outputs = llm.generate(records, SamplingParams(max_tokens=5, ignore_eos=True))
    assert any(both)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32)
    check_scores(llm, model, PROMPTS[1::2], outputs[1::2])
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[0::2]]
    check_logprobs(llm, lambda p, g: reference_logprobs(model, list(p), list(g)), ids,
                   outputs[0::2], 2)  # fmt: skip
    assert all(len(o.completions[0].token_ids) == 5 for o in outputs[0::2])
    llm.engine.check_integrity()
