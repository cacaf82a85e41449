"""Thinking models: chat template variables, the reasoning split and the reasoning budget,
on a tiny Qwen3 whose tokenizer has <think> and </think> and a thinking chat template."""

from __future__ import annotations

from array import array

import pytest
import torch
from job_helpers import by_id, invoke, one_line_error, read_lines, tiny_args, write_jsonl
from tiny_models import THINK_TOKENS
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.reasoning import ThinkTokens, must_end_thinking, think_tokens
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.requests.records import parse_record

START, END = 448, 449  # THINK_TOKENS' ids
EOS = 2
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Label the review: the food was cold."}]


def transformers_prompt(model_dir, messages, **kwargs) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_reference(model_dir, prompt: list[int], max_new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


# --- chat template variables ---


def test_tokens_are_found_from_the_vocabulary_and_template(thinking_dirs, tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(thinking_dirs["qwen3"])
    assert tokenizer.convert_tokens_to_ids(list(THINK_TOKENS)) == [START, END]
    assert think_tokens(tokenizer, "auto") == ThinkTokens(START, END)
    assert think_tokens(tokenizer, "none") is None
    plain = AutoTokenizer.from_pretrained(tiny_model_dirs["qwen3"])
    assert think_tokens(plain, "auto") is None
    with pytest.raises(ValueError, match="no <think> and </think> tokens"):
        think_tokens(plain, "think")
    tokenizer.chat_template = "{{ messages[0]['content'] }}"  # the tokens, no thinking template
    assert think_tokens(tokenizer, "auto") is None
    assert think_tokens(tokenizer, "think") == ThinkTokens(START, END)


def test_enable_thinking_false_renders_the_template_as_transformers_does(thinking_dirs):
    model_dir = thinking_dirs["qwen3"]
    off = transformers_prompt(model_dir, MESSAGES, enable_thinking=False)
    on = transformers_prompt(model_dir, MESSAGES)
    assert off[-6:] == [START, 201, 201, END, 201, 201] and on != off  # an empty thinking
    llm = LLM(
        model_dir, device="cpu", num_blocks=64, chat_template_kwargs={"enable_thinking": False}
    )
    row = {"messages": MESSAGES}
    assert llm.prompts.token_ids(parse_record(row, 0)) == off
    own = parse_record({**row, "chat_template_kwargs": {"enable_thinking": True}}, 1)
    assert llm.prompts.token_ids(own) == on  # the record's own win
    assert LLM(model_dir, device="cpu", num_blocks=64).prompts.token_ids(parse_record(row, 0)) == on


def test_chat_template_kwargs_through_run_and_in_the_fingerprint(tmp_path, thinking_dirs):
    model_dir = thinking_dirs["qwen3"]
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "off", "messages": MESSAGES},
        {"id": "on", "messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": True}},
        {"id": "bad", "messages": MESSAGES, "chat_template_kwargs": ["enable_thinking"]},
        {"id": "own-arg", "messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    flag = ["--chat-template-kwargs", '{"enable_thinking": false}']
    result = invoke(source, "-o", out, *tiny_args(model_dir, "--max-tokens", "3", *flag))
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(out))
    off = transformers_prompt(model_dir, MESSAGES, enable_thinking=False)
    assert lines["off"]["usage"]["prompt_tokens"] == len(off)
    assert lines["on"]["usage"]["prompt_tokens"] == len(transformers_prompt(model_dir, MESSAGES))
    assert lines["bad"]["error"] == {
        "code": "invalid_record",
        "message": "chat_template_kwargs must be an object of template variables, got "
        "['enable_thinking']",
    }
    assert lines["own-arg"]["error"]["code"] == "invalid_record"
    assert (
        "'tokenize' is an argument of apply_chat_template" in lines["own-arg"]["error"]["message"]
    )
    other = ["--chat-template-kwargs", '{"enable_thinking": true}']
    refused = invoke(
        source, "-o", out, "--resume", *tiny_args(model_dir, "--max-tokens", "3", *other)
    )
    assert refused.exit_code != 0 and "chat_template_kwargs" in refused.output
    text = one_line_error(invoke(source, "-o", tmp_path / "x.jsonl", *tiny_args(
        model_dir, "--chat-template-kwargs", "{enable_thinking: false}")))  # fmt: skip
    assert "chat_template_kwargs: not JSON" in text


# --- the split, following a sequence's tokens ---


def run_tokens(checker: StopChecker, seq: Sequence, tokens: list[int]) -> str | None:
    """Append `tokens` one by one as the scheduler does; the finish reason of the last."""
    reason = None
    for token in tokens:
        seq.token_ids.append(token)
        reason = checker.check(seq)
    seq.finish_reason = reason
    return reason


@pytest.fixture(scope="module")
def checker(thinking_dirs):
    tokenizer = AutoTokenizer.from_pretrained(thinking_dirs["qwen3"])
    return StopChecker(tokenizer, frozenset({EOS}), ThinkTokens(START, END))


def new_seq(prompt: list[int], params: SamplingParams, think_start: int | None = None):
    max_len = len(prompt) + params.max_output_tokens
    return Sequence(0, array("i", prompt), len(prompt), params, max_len, think_start=think_start)


def test_a_first_output_think_token_opens_the_thinking_and_think_end_closes_it(checker):
    tok = checker.tokenizer
    thought, answer = tok.encode(" the food was cold"), tok.encode("\n\nnegative")
    seq = new_seq([5, 6, 7], SamplingParams(max_tokens=40))
    assert run_tokens(checker, seq, [START, *thought, END, *answer, EOS]) == "stop"
    assert (seq.think_start, seq.think_end) == (4, 4 + len(thought))
    assert checker.reasoning(seq) == "the food was cold"
    assert checker.text(seq) == "negative"  # the answer, its leading whitespace left out
    assert checker.reasoning_tokens(seq) == len(thought) + 2


def test_without_a_first_think_token_the_whole_output_is_the_text(checker):
    seq = new_seq([5, 6], SamplingParams(max_tokens=5, reasoning_budget=3))
    assert seq.max_len == 2 + 5 + 3 + 2  # room for a thinking, until the first token
    run_tokens(checker, seq, [40, START, 41])  # a later <think> is text
    assert seq.think_start is None and checker.reasoning(seq) is None
    assert seq.max_len == 2 + 5  # no thinking: max_tokens in all
    assert checker.text(seq) == checker.decode([40, START, 41])


def test_thinking_cut_by_the_length_limit_has_no_text(checker):
    seq = new_seq([5, 6], SamplingParams(max_tokens=4))
    assert run_tokens(checker, seq, [START, 40, 41, 42]) == "length"
    assert (
        checker.text(seq) == "" and checker.reasoning(seq) == checker.decode([40, 41, 42]).strip()
    )
    assert checker.reasoning_tokens(seq) == 4


def test_the_budget_forces_think_end_and_the_answer_gets_max_tokens(checker):
    seq = new_seq([5, 6], SamplingParams(max_tokens=3, reasoning_budget=2))
    run_tokens(checker, seq, [START, 40])
    assert not must_end_thinking(seq)
    run_tokens(checker, seq, [41])
    assert must_end_thinking(seq)  # two thinking tokens: the next must be </think>
    assert run_tokens(checker, seq, [END]) is None
    assert seq.max_len == seq.num_tokens + 3 and not must_end_thinking(seq)
    assert run_tokens(checker, seq, [50, 51, 52]) == "length"
    assert seq.num_output_tokens == 1 + 2 + 1 + 3


def test_stop_strings_end_the_answer_not_the_thinking(checker):
    tok = checker.tokenizer
    seq = new_seq([5, 6], SamplingParams(max_tokens=40, stop=["cold"]))
    tokens = [START, *tok.encode(" the food was cold"), END, *tok.encode(" so cold it hurt")]
    reasons = [run_tokens(checker, seq, [token]) for token in tokens if seq.finish_reason is None]
    assert reasons[-1] == "stop" and len(reasons) < len(tokens)  # in the answer, not the thinking
    assert checker.text(seq) == "so " and checker.reasoning(seq) == "the food was cold"


# --- whole runs: the R1 style, whose prompt opens the thinking ---


def test_budget_forces_think_end_then_the_answer_continues_greedily(thinking_dirs):
    """The thinking is the unbudgeted greedy run's first N tokens, then </think>, then the
    answer as transformers generate continues prompt + thinking + </think>."""
    model_dir = thinking_dirs["r1"]
    prompt = transformers_prompt(model_dir, MESSAGES)
    assert prompt[-2:] == [START, 201]  # the template opens the thinking
    free = greedy_reference(model_dir, prompt, 12)
    assert END not in free[:4]
    budget, max_tokens = 3, 5
    llm = LLM(model_dir, device="cpu", num_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=max_tokens, reasoning_budget=budget, n=2, ignore_eos=True)
    for output in llm.generate([{"messages": MESSAGES}] * 2, params):
        for c in output.completions:
            tokens = list(c.token_ids)
            assert tokens[:budget] == free[:budget] and tokens[budget] == END
            assert tokens[budget + 1 :] == greedy_reference(
                model_dir, prompt + tokens[: budget + 1], max_tokens
            )
            assert c.reasoning == llm.tokenizer.decode(free[:budget]).strip()
            assert c.text == llm.tokenizer.decode(tokens[budget + 1 :]).lstrip()
            assert c.reasoning_tokens == budget + 1 and c.finish_reason == "length"
        assert output.completion_tokens == 2 * (budget + 1 + max_tokens)
    assert llm.stats().prefix_hit_tokens > 0  # the second record shared the first's prompt
    llm.engine.check_integrity()


def test_without_a_budget_max_tokens_counts_thinking_and_answer(thinking_dirs):
    llm = LLM(thinking_dirs["r1"], device="cpu", num_blocks=64)
    (output,) = llm.generate(
        [{"messages": MESSAGES}], SamplingParams(max_tokens=6, ignore_eos=True)
    )
    (c,) = output.completions
    assert len(c.token_ids) == 6 and END not in c.token_ids
    assert c.text == "" and c.reasoning == llm.tokenizer.decode(c.token_ids).strip()
    off = LLM(thinking_dirs["r1"], device="cpu", num_blocks=64, reasoning_parser="none")
    (plain,) = off.generate([{"messages": MESSAGES}], SamplingParams(max_tokens=6, ignore_eos=True))
    assert plain.completions[0].reasoning is None and plain.completions[0].token_ids == c.token_ids


def test_a_budget_needs_a_thinking_model_and_counts_in_the_kv_check(tiny_model_dirs, thinking_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], device="cpu", num_blocks=64)
    (out,) = llm.generate(["Hello"], SamplingParams(max_tokens=4, reasoning_budget=8))
    assert out.error.code == "invalid_params" and "reasoning_budget" in out.error.message
    small = LLM(thinking_dirs["r1"], device="cpu", num_blocks=4, block_size=16)  # 64 tokens
    record = {"messages": MESSAGES}
    assert small.generate([record], SamplingParams(max_tokens=20))[0].error is None
    (out,) = small.generate([record], SamplingParams(max_tokens=20, reasoning_budget=30))
    assert out.error.code == "prompt_too_long" and "reasoning budget" in out.error.message


def test_reasoning_in_plain_and_openai_batch_lines(tmp_path, thinking_dirs):
    model_dir = thinking_dirs["r1"]
    plain = write_jsonl(tmp_path / "plain.jsonl", [
        {"id": "a", "messages": MESSAGES}, {"id": "b", "messages": MESSAGES, "reasoning_budget": 1},
    ])  # fmt: skip
    out = tmp_path / "plain.out.jsonl"
    args = tiny_args(model_dir, "--max-tokens", "4", "--reasoning-budget", "2", "--ignore-eos")
    assert invoke(plain, "-o", out, *args).exit_code == 0
    lines = by_id(read_lines(out))
    for rid, budget in (("a", 2), ("b", 1)):
        (choice,) = lines[rid]["choices"]
        assert list(choice) == ["index", "reasoning", "text", "finish_reason"]
        usage = lines[rid]["usage"]
        assert usage["completion_tokens"] == budget + 1 + 4
        assert usage["reasoning_tokens"] == budget + 1
    request = {"custom_id": "c", "method": "POST", "url": CHAT,
               "body": {"model": "m", "messages": MESSAGES, "max_tokens": 4}}  # fmt: skip
    batch = write_jsonl(tmp_path / "batch.jsonl", [request])
    out = tmp_path / "batch.out.jsonl"
    assert invoke(batch, "-o", out, *args).exit_code == 0
    (line,) = read_lines(out)
    body = line["response"]["body"]
    message = body["choices"][0]["message"]
    assert set(message) == {"role", "content", "reasoning_content"}
    assert message["reasoning_content"] == lines["a"]["choices"][0]["reasoning"]
    assert message["content"] == lines["a"]["choices"][0]["text"]
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert body["usage"]["completion_tokens"] == 7


def test_reasoning_parser_think_needs_the_tokens(tmp_path, tiny_model_dirs):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    args = tiny_args(tiny_model_dirs["qwen3"], "--reasoning-parser", "think")
    assert "no <think> and </think> tokens" in one_line_error(invoke(source, *args))
    bad = one_line_error(
        invoke(source, *tiny_args(tiny_model_dirs["qwen3"], "--reasoning-parser", "r1"))
    )
    assert "reasoning_parser must be one of auto, think, none" in bad
