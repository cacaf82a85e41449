"""What pagedbatch does with each field of an OpenAI batch request's body: none is dropped
without a word.

A field is honoured (the prompt, the token limits, logprobs, the sampling fields, which
become the record's overrides), accepted and ignored (`model`: the job's model answers;
and the fields that only matter to a hosted API: who asked, what to store, which tier),
accepted for a value that asks for what pagedbatch does anyway (`stream: false`,
`echo: false`, ...), or unsupported: the record is then an `invalid_params` error naming
it, or with `--lenient` runs without it. A field whose value is null counts as absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Body fields that become the record's sampling overrides under the same name (checked
# per record as invalid_params). OpenAI's; vLLM's extensions (top_k, min_p,
# repetition_penalty, min_tokens, stop_token_ids); pagedbatch's own (reasoning_budget,
# choices, regex, grammar: README).
SAMPLING_FIELDS = (
    "temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty",
    "logit_bias", "response_format", "top_k", "min_p", "repetition_penalty", "min_tokens",
    "stop_token_ids", "reasoning_budget", "choices", "regex", "grammar",
)  # fmt: skip
# The other honoured fields, by endpoint: the prompt, the token limit (max_tokens, or
# max_completion_tokens which wins), logprobs; a chat's template variables.
_READ = {
    CHAT: ("messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
           "chat_template_kwargs"),
    COMPLETIONS: ("prompt", "max_tokens", "max_completion_tokens", "logprobs"),
}  # fmt: skip
# Accepted and ignored: the model the line names (the job's answers), and what only a
# hosted API uses.
IGNORED_FIELDS = (
    "model", "user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
)  # fmt: skip
# Accepted with these values, which ask for what pagedbatch does anyway.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "echo": (False,),
    "suffix": ("",),
    "modalities": (["text"],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # without tools, nothing to call
}


def honoured_fields(endpoint: str) -> tuple[str, ...]:
    """The body fields an `endpoint` request honours."""
    return (*_READ[endpoint], *SAMPLING_FIELDS)


def unsupported_fields(body: Mapping[str, Any], endpoint: str) -> list[str]:
    """The fields of `body` that pagedbatch does not honour, in the body's order."""
    known = set(honoured_fields(endpoint)) | set(IGNORED_FIELDS)
    return [
        name
        for name, value in body.items()
        if value is not None and name not in known and not _no_op(name, value, body)
    ]


def unsupported_message(fields: list[str], endpoint: str) -> str:
    """The error of a record whose body has unsupported fields."""
    names = ", ".join(repr(name) for name in fields)
    verb = "is" if len(fields) == 1 else "are"
    return (
        f"body field{'s' if len(fields) > 1 else ''} {names} {verb} not supported on "
        f"{endpoint} (README: OpenAI batch files; --lenient runs the record without them)"
    )


def _no_op(name: str, value: Any, body: Mapping[str, Any]) -> bool:
    """`name: value` asks for what pagedbatch does anyway (`best_of` equal to `n`)."""
    if name == "best_of":
        return value == (body.get("n") or 1)
    return name in _NO_OP_VALUES and any(
        value == v and type(value) is type(v) for v in _NO_OP_VALUES[name]
    )
