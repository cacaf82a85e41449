"""OpenAI batch files: `{custom_id, method, url, body}` request lines in, batch output out.

A file whose first record has `custom_id` and `body` is a batch file; every line of it
is then a request. The output follows the batch output format: `id`, `custom_id`,
`response: {status_code, request_id, body}` and `error`, with `body` shaped like a
completion (`/v1/completions`) or chat completion (`/v1/chat/completions`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pagedbatch.engine.config import check_template_kwargs
from pagedbatch.inputs.batch_fields import (
    CHAT,
    COMPLETIONS,
    SAMPLING_FIELDS,
    unsupported_fields,
    unsupported_message,
)
from pagedbatch.outputs import INVALID_PARAMS, Completion, RecordError, RequestOutput, TokenLogprob
from pagedbatch.requests.records import TEMPLATE_KWARGS, Record, invalid, messages_problem

ENDPOINTS = (CHAT, COMPLETIONS)


def is_batch_request(row: Mapping[str, Any]) -> bool:
    return "custom_id" in row and "body" in row


def parse_batch_request(row: Mapping[str, Any], default_id: int, lenient: bool = False) -> Record:
    """The record of one request line; problems become its error (`invalid_record` mostly,
    `invalid_params` for body fields pagedbatch does not support, unless `lenient`: the
    record then runs without them, and names them in `ignored`)."""
    url = row.get("url")
    endpoint = url if isinstance(url, str) else ""
    cid = row.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return _failed(default_id, endpoint, row, "'custom_id' must be a non-empty string")
    if url not in ENDPOINTS:
        problem = f"url {url!r} is not supported (use {' or '.join(ENDPOINTS)})"
        return _failed(cid, endpoint, row, problem)
    if row.get("method", "POST") != "POST":
        return _failed(cid, endpoint, row, f"method must be POST, got {row.get('method')!r}")
    body = row.get("body")
    if not isinstance(body, Mapping):
        return _failed(cid, endpoint, row, "'body' must be an object")
    unsupported = unsupported_fields(body, url)
    problem = _params_problem(body, url) or (
        unsupported_message(unsupported, url) if unsupported and not lenient else None
    )
    if problem is not None:
        error = RecordError(INVALID_PARAMS, problem)
        return Record(id=cid, error=error, endpoint=endpoint, source=row)
    try:
        prompt = _chat_prompt(body) if url == CHAT else _completion_prompt(body)
        kwargs = body.get(TEMPLATE_KWARGS) if url == CHAT else None
        check_template_kwargs(kwargs, f"body.{TEMPLATE_KWARGS}")
    except ValueError as e:
        return _failed(cid, endpoint, row, str(e))
    return Record(
        id=cid, **prompt, overrides=_overrides(body), chat_template_kwargs=kwargs,
        endpoint=endpoint, source=row, ignored=tuple(unsupported),
    )  # fmt: skip


def batch_output_line(
    output: RequestOutput, endpoint: str, model: str, job: str, created: int
) -> dict[str, Any]:
    """The batch output line of one record; ids are derived from `job` and the custom_id."""
    rid = hashlib.blake2b(f"{job}:{output.id!r}".encode(), digest_size=12).hexdigest()
    line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": output.id}
    if output.error is not None:
        line["response"] = None
        line["error"] = output.error.to_json()
        return line
    body = _chat_body(output) if endpoint == CHAT else _completion_body(output)
    if output.choices is not None:  # scored choices: the label is the answer
        body["choices"] = [_label_choice(output.label or "", endpoint)]
        body["choice_scores"] = [c.to_json() for c in output.choices]
    body.update(
        created=created,
        model=model,
        system_fingerprint=job,
        usage={
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": output.cached_tokens},
            **_reasoning_usage(output),
        },
    )
    body["id"] = ("chatcmpl-" if endpoint == CHAT else "cmpl-") + rid
    line["response"] = {"status_code": 200, "request_id": rid, "body": body}
    line["error"] = None
    return line


def _failed(rid: str | int, endpoint: str, row: Mapping[str, Any], message: str) -> Record:
    return Record(id=rid, error=invalid(message), endpoint=endpoint, source=row)


def _params_problem(body: Mapping[str, Any], endpoint: str) -> str | None:
    """A chat request asking for alternatives without asking for logprobs (as OpenAI)."""
    if (
        endpoint == CHAT
        and body.get("top_logprobs") is not None
        and body.get("logprobs") is not True
    ):
        return "top_logprobs needs logprobs: true"
    return None


def _overrides(body: Mapping[str, Any]) -> dict[str, Any]:
    overrides = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    logprobs = body.get("logprobs")
    if logprobs is True:  # chat: logprobs true, top_logprobs the alternatives
        overrides["logprobs"] = body.get("top_logprobs") or 0
    elif logprobs is not None and logprobs is not False:  # completions: the alternatives
        overrides["logprobs"] = logprobs
    return overrides


def _chat_prompt(body: Mapping[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [_plain_message(m) for m in messages]
    problem = messages_problem(messages, "body.messages")
    if problem:
        raise ValueError(problem)
    return {"messages": tuple(messages)}


def _plain_message(message: Any) -> Any:
    """A message whose content is a list of text parts, with the parts joined."""
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in parts):
        raise ValueError("body.messages: only text content parts are supported")
    return {**message, "content": "".join(str(p.get("text", "")) for p in parts)}


def _completion_prompt(body: Mapping[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return {"prompt_token_ids": tuple(prompt)}
    raise ValueError("body.prompt must be a string or a list of token ids (one prompt per line)")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _label_choice(label: str, endpoint: str) -> dict[str, Any]:
    if endpoint == CHAT:
        message = {"role": "assistant", "content": label}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return {"index": 0, "text": label, "logprobs": None, "finish_reason": "stop"}


def _reasoning_usage(output: RequestOutput) -> dict[str, Any]:
    """OpenAI's count of the completion tokens that were thinking, when the model thought."""
    if all(c.reasoning is None for c in output.completions):
        return {}
    return {"completion_tokens_details": {"reasoning_tokens": output.reasoning_tokens}}


def _reasoning(c: Completion) -> dict[str, Any]:
    """A thinking completion's reasoning, as vLLM writes it: `reasoning_content`."""
    return {} if c.reasoning is None else {"reasoning_content": c.reasoning}


def _chat_body(output: RequestOutput) -> dict[str, Any]:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, **_reasoning(c)},
            "logprobs": None
            if c.logprobs is None
            else {"content": [_chat_logprob(t) for t in c.logprobs]},
            "finish_reason": c.finish_reason,
            **_parsed(c),
        }
        for c in output.completions
    ]
    return {"id": "", "object": "chat.completion", "choices": choices}


def _completion_body(output: RequestOutput) -> dict[str, Any]:
    choices = [
        {
            "index": c.index,
            "text": c.text,
            **_reasoning(c),
            "logprobs": _completion_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            **_parsed(c),
        }  # fmt: skip
        for c in output.completions
    ]
    return {"id": "", "object": "text_completion", "choices": choices}


def _parsed(c: Completion) -> dict[str, Any]:
    """A JSON-constrained choice's parsed value, as pagedbatch's lines carry it: `json`."""
    return {} if c.json is None else {"json": c.json.value}


def _chat_logprob(t: TokenLogprob) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content`, as OpenAI writes it."""
    return {
        "token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
        "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                         for s, _, v in t.top],
    }  # fmt: skip


def _completion_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """A completions choice's `logprobs`, in the legacy shape (no text_offset)."""
    if tokens is None:
        return None
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{s: v for s, _, v in t.top} for t in tokens],
    }
