"""OpenAI batch files: requests in, batch output lines out, through the whole CLI."""

from __future__ import annotations

import re

from job_helpers import by_id, invoke, read_lines, tiny_args, write_jsonl

from pagedbatch.inputs.openai_batch import batch_output_line
from pagedbatch.outputs import Completion, RecordError, RequestOutput

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = {"role": "user", "content": "Tell me a story"}
PARTS = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}


def request(cid: str, url: str, **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "any", **body}}


REQUESTS = [
    request("chat-1", CHAT, messages=[USER], max_completion_tokens=5),
    request("chat-parts", CHAT, messages=[PARTS]),
    request("chat-n", CHAT, messages=[USER], n=2, temperature=0.9, seed=3, max_tokens=4),
    request("text-1", COMPLETIONS, prompt="Once upon a time", max_tokens=6, stop=["\n"]),
    request("text-ids", COMPLETIONS, prompt=[10, 20, 30], max_tokens=3),
    request("bad-url", "/v1/embeddings", input="x"),
    request("bad-params", COMPLETIONS, prompt="x", top_p=3),
    request("bad-token", COMPLETIONS, prompt=[10, 99999]),
    {"custom_id": "no-body", "url": CHAT},
]  # fmt: skip


# With EOS ignored, a request without stop strings generates exactly its most tokens
# (x n; tiny_args' 8 where it does not say) and ends on "length".
LENGTHS = {"chat-1": 5, "chat-parts": 8, "chat-n": 2 * 4, "text-ids": 3}


def test_batch_file_round_trip(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "batch.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["llama"], "--ignore-eos"))
    assert result.exit_code == 0, result.output
    assert re.search(
        r"Wrote 9 records .*5 ok, 4 failed: 1 invalid_params, 3 invalid_record", result.stderr
    )
    lines = by_id(read_lines(out))
    assert set(lines) == {r["custom_id"] for r in REQUESTS}
    for cid, line in lines.items():
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_") and line["custom_id"] == cid
        if line["error"] is None:
            check_response(line["response"], chat=cid.startswith("chat"))
            body = line["response"]["body"]
            reasons = {choice["finish_reason"] for choice in body["choices"]}
            tokens = body["usage"]["completion_tokens"]
            if cid in LENGTHS:
                assert (reasons, tokens) == ({"length"}, LENGTHS[cid]), cid
            else:  # text-1 stops at its first newline, if any comes within 6 tokens
                assert reasons == {"stop"} if tokens < 6 else reasons <= {"stop", "length"}
        else:
            assert line["response"] is None and set(line["error"]) == {"code", "message"}
    assert len(lines["chat-n"]["response"]["body"]["choices"]) == 2
    assert lines["text-ids"]["response"]["body"]["usage"]["prompt_tokens"] == 3
    assert lines["bad-url"]["error"]["message"] == (
        "url '/v1/embeddings' is not supported (use /v1/chat/completions or /v1/completions)"
    )
    assert lines["bad-params"]["error"] == {
        "code": "invalid_params",
        "message": "top_p must be in (0, 1], got 3",
    }
    assert lines["bad-token"]["error"]["message"] == "token ids must be in [0, 448)"
    assert lines["no-body"]["error"]["message"] == "'body' must be an object"


def check_response(response: dict, chat: bool) -> None:
    assert response["status_code"] == 200 and re.fullmatch(r"[0-9a-f]{24}", response["request_id"])
    body = response["body"]
    assert body["object"] == ("chat.completion" if chat else "text_completion")
    assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert isinstance(body["created"], int) and isinstance(body["model"], str)
    for index, choice in enumerate(body["choices"]):
        assert choice["index"] == index
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str)
        if chat:
            assert choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_batch_output_resumes_by_custom_id(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "batch.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    flags = tiny_args(tiny_model_dirs["llama"])
    assert invoke(src, "-o", out, *flags).exit_code == 0
    full = by_id(read_lines(out))
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:4]))
    result = invoke(src, "-o", out, *flags, "--resume")
    assert result.exit_code == 0 and "skipped 4 already done" in result.stderr
    again = by_id(read_lines(out))
    assert set(again) == set(full)
    for cid, line in full.items():  # ids derive from the job and the custom_id
        assert again[cid]["id"] == line["id"]
        if line["response"] is not None:
            assert again[cid]["response"]["body"]["choices"] == line["response"]["body"]["choices"]


def test_batch_output_line_shapes():
    done = RequestOutput(
        "c", (Completion(0, "hi", (5, 6), "stop"),), prompt_tokens=3, cached_tokens=1
    )
    line = batch_output_line(done, COMPLETIONS, "m", "job1", created=7)
    assert line == {
        "id": line["id"],
        "custom_id": "c",
        "response": {
            "status_code": 200,
            "request_id": line["response"]["request_id"],
            "body": {
                "id": "cmpl-" + line["response"]["request_id"],
                "object": "text_completion",
                "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}],
                "created": 7,
                "model": "m",
                "system_fingerprint": "job1",
                "usage": {
                    "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 1},
                },
            },
        },
        "error": None,
    }  # fmt: skip
    failed = RequestOutput("c", error=RecordError("prompt_too_long", "too long"))
    assert batch_output_line(failed, CHAT, "m", "job1", created=7) == {
        "id": line["id"],  # the same custom_id in the same job: the same id
        "custom_id": "c",
        "response": None,
        "error": {"code": "prompt_too_long", "message": "too long"},
    }
