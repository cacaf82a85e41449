"""Every OpenAI batch body field is honoured, accepted and ignored, or names the record's
error: a batch file with every documented field, run through the CLI, against the same
records as plain JSONL lines (whose fields have their own exactness tests)."""

from __future__ import annotations

import re

import pytest
from job_helpers import by_id, invoke, read_lines, tiny_args, write_jsonl

from pagedbatch.inputs.batch_fields import IGNORED_FIELDS, SAMPLING_FIELDS, honoured_fields

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Label the review: the food was cold."}]
HOSTED = {"model": "gpt-x", "user": "u-1", "store": False, "metadata": {"team": "a"},
          "service_tier": "flex", "safety_identifier": "s", "prompt_cache_key": "k"}  # fmt: skip
NO_OPS = {"stream": False, "modalities": ["text"], "tool_choice": "none",
          "parallel_tool_calls": True, "stream_options": None}  # fmt: skip
# Chat requests, one per honoured field (or group), each run as its plain twin too.
CHAT_FIELDS = {
    "baseline": {},
    "max_completion_tokens": {"max_completion_tokens": 3},
    "sampling": {"temperature": 0.9, "seed": 3, "top_p": 0.8, "top_k": 20, "min_p": 0.05},
    "stop": {"stop": ["e"]},
    "n": {"n": 2},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "penalties": {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.4},
    "logit_bias": {"logit_bias": {"449": -100}},  # no </think>: it thinks to the end
    "min_tokens": {"min_tokens": 6, "stop_token_ids": [2, 449]},
    "response_format": {"response_format": {"type": "json_object"}, "max_tokens": 12},
    "regex": {"regex": "(yes|no)"},
    "grammar": {"grammar": 'root ::= "yes" | "no"'},
    "choices": {"choices": ["yes", "no"]},
    "chat_template_kwargs": {"chat_template_kwargs": {"thinking": False}},
    "reasoning_budget": {"reasoning_budget": 2},
    "hosted": {**HOSTED, **NO_OPS},
}
COMPLETION_FIELDS = {
    "text": {
        "prompt": "Once upon a time",
        "logprobs": 2,
        "echo": False,
        "best_of": 1,
        "suffix": "",
        "stream": False,
    },  # fmt: skip
    "text-ids": {"prompt": [10, 20, 30], "max_tokens": 3},
}
UNSUPPORTED = {
    "tools": (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"]),
    "several": (
        CHAT,
        {"audio": {"voice": "x"}, "reasoning_effort": "low", "stream": True},
        ["audio", "reasoning_effort", "stream"],
    ),  # fmt: skip
    "echo": (COMPLETIONS, {"prompt": "Hi", "echo": True, "best_of": 3}, ["echo", "best_of"]),
    "wrong-endpoint": (COMPLETIONS, {"prompt": "Hi", "messages": USER}, ["messages"]),
}


def request(cid: str, url: str, body: dict) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def chat_body(fields: dict) -> dict:
    return {"model": "m", "messages": USER, "max_tokens": 6, **fields}


def plain_twin(cid: str, body: dict) -> dict:
    """The plain JSONL record that asks what `body` asks."""
    drop = {*HOSTED, *NO_OPS, "top_logprobs", "max_completion_tokens"}
    record = {"id": cid, **{k: v for k, v in body.items() if k not in drop and v is not None}}
    if "max_completion_tokens" in body:
        record["max_tokens"] = body["max_completion_tokens"]
    if body.get("logprobs") is True:
        record["logprobs"] = body.get("top_logprobs") or 0
    return record


def batch_file(path) -> list[dict]:
    rows = [request(cid, CHAT, chat_body(f)) for cid, f in CHAT_FIELDS.items()]
    rows += [request(cid, COMPLETIONS, {"model": "m", **f}) for cid, f in COMPLETION_FIELDS.items()]
    rows += [
        request(cid, url, chat_body(f) if url == CHAT else {"model": "m", **f})
        for cid, (url, f, _) in UNSUPPORTED.items()
    ]
    rows.append(request("top-alone", CHAT, chat_body({"top_logprobs": 2})))
    write_jsonl(path, rows)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, thinking_dirs):
    """The batch file run strictly and with --lenient, and its plain twins."""
    root = tmp_path_factory.mktemp("batch_fields")
    rows = batch_file(root / "batch.jsonl")
    args = tiny_args(thinking_dirs["r1"], "--num-blocks", "128")
    result = {}
    for name, extra in (("strict", []), ("lenient", ["--lenient"])):
        out = root / f"{name}.jsonl"
        done = invoke(root / "batch.jsonl", "-o", out, *args, *extra)
        assert done.exit_code == 0, done.output
        result[name] = (by_id(read_lines(out)), done.stderr)
    twins = [plain_twin(r["custom_id"], r["body"]) for r in rows[: len(CHAT_FIELDS)]]
    twins += [
        {"id": cid, **{k: v for k, v in f.items() if k in ("prompt", "logprobs")}}
        for cid, f in COMPLETION_FIELDS.items() if isinstance(f["prompt"], str)
    ]  # fmt: skip
    out = root / "plain.jsonl"
    done = invoke(write_jsonl(root / "twins.jsonl", twins), "-o", out, *args)
    assert done.exit_code == 0, done.output
    result["plain"] = (by_id(read_lines(out)), done.stderr)
    return result


def test_every_documented_field_is_in_the_batch_file():
    documented = {*SAMPLING_FIELDS, *IGNORED_FIELDS, *honoured_fields(CHAT),
                  *honoured_fields(COMPLETIONS)}  # fmt: skip
    used = {k for f in (*CHAT_FIELDS.values(), *COMPLETION_FIELDS.values()) for k in f}
    assert documented <= used | {"messages", "max_tokens"}, documented - used


def test_honoured_fields_answer_as_the_plain_records_do(runs):
    lines, _ = runs["strict"]
    plain, _ = runs["plain"]
    for cid in CHAT_FIELDS:
        assert lines[cid]["error"] is None, (cid, lines[cid]["error"])
        body, twin = lines[cid]["response"]["body"], plain[cid]
        usage = body["usage"]
        assert usage["prompt_tokens"] == twin["usage"]["prompt_tokens"], cid
        if "choices" in CHAT_FIELDS[cid]:
            assert body["choices"][0]["message"]["content"] == twin["label"]
            assert body["choice_scores"] == twin["choices"]
            continue
        assert usage["completion_tokens"] == twin["usage"]["completion_tokens"], cid
        assert len(body["choices"]) == len(twin["choices"]), cid
        for choice, plain_choice in zip(body["choices"], twin["choices"], strict=True):
            message = choice["message"]
            assert message["content"] == plain_choice["text"], cid
            assert message.get("reasoning_content") == plain_choice.get("reasoning"), cid
            assert choice["finish_reason"] == plain_choice["finish_reason"], cid
            if "logprobs" in plain_choice:
                ours = [t["logprob"] for t in choice["logprobs"]["content"]]
                assert ours == [t["logprob"] for t in plain_choice["logprobs"]], cid
    text = lines["text"]["response"]["body"]["choices"][0]
    assert text["text"] == plain["text"]["choices"][0]["text"]
    assert len(text["logprobs"]["top_logprobs"][0]) == 2


def test_honoured_fields_change_the_output_as_they_should(runs):
    lines, _ = runs["strict"]

    def body(cid):
        return lines[cid]["response"]["body"]

    def tokens(cid):
        return {k: v for k, v in body(cid)["usage"].items() if k != "prompt_tokens_details"}

    base = body("baseline")
    assert body("hosted")["choices"] == base["choices"] and tokens("hosted") == tokens("baseline")
    assert body("max_completion_tokens")["usage"]["completion_tokens"] == 3
    assert len(body("n")["choices"]) == 2
    assert len(body("logprobs")["choices"][0]["logprobs"]["content"]) == 6
    assert body("min_tokens")["usage"]["completion_tokens"] >= 6
    for cid in ("regex", "grammar"):
        assert body(cid)["choices"][0]["message"]["content"] in ("yes", "no")
    assert body("choices")["choices"][0]["message"]["content"] in ("yes", "no")
    no_thinking = body("chat_template_kwargs")
    assert "reasoning_content" not in no_thinking["choices"][0]["message"]
    assert "reasoning_content" in base["choices"][0]["message"]
    budget = body("reasoning_budget")["usage"]
    assert budget["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert budget["completion_tokens"] == 3 + 6
    assert body("text-ids")["usage"]["prompt_tokens"] == 3


def test_unsupported_fields_name_the_records_error_or_are_ignored_when_lenient(runs):
    lines, stderr = runs["strict"]
    for cid, (url, _, fields) in UNSUPPORTED.items():
        assert lines[cid]["response"] is None
        error = lines[cid]["error"]
        assert error["code"] == "invalid_params"
        names = ", ".join(repr(f) for f in fields)
        assert error["message"].startswith(
            f"body field{'s' if len(fields) > 1 else ''} {names} "
        ), error
        assert url in error["message"] and "--lenient" in error["message"]
    assert lines["top-alone"]["error"]["message"] == "top_logprobs needs logprobs: true"
    assert re.search(r"5 failed: 5 invalid_params", stderr), stderr
    lenient, stderr = runs["lenient"]
    for cid in UNSUPPORTED:
        assert lenient[cid]["error"] is None, cid
    # The tools request asks the baseline's messages: without its tools it answers as it.
    assert (
        lenient["tools"]["response"]["body"]["choices"]
        == lines["baseline"]["response"]["body"]["choices"]
    )
    assert (
        "ran without unsupported body fields (--lenient): 'tools' in 1 record, 'audio' in 1 record"
        in stderr
    )
    assert lenient["top-alone"]["error"] is not None  # a bad value is no unsupported field
