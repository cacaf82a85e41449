"""What a finished record turns into: plain data, serialised by io.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]

# Error codes of a record that did not run; the rest of the job goes on.
INVALID_RECORD = "invalid_record"
INVALID_PARAMS = "invalid_params"
PROMPT_TOO_LONG = "prompt_too_long"
ENGINE_ERROR = "engine_error"
ERROR_CODES = (INVALID_RECORD, INVALID_PARAMS, PROMPT_TOO_LONG, ENGINE_ERROR)


@dataclass(frozen=True)
class RecordError:
    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        """The error object of every output shape: `{"code", "message"}`."""
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Completion:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (its text and id) with its log-probability under the model, and
    the most likely tokens at that position as (text, id, logprob), most likely first."""

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()

    def to_json(self) -> dict:
        """The compact shape of a plain output line (README, Output)."""
        return {"token": self.token, "id": self.token_id, "logprob": self.logprob,
                "top": [list(t) for t in self.top]}  # fmt: skip


@dataclass(frozen=True)
class RequestOutput:
    """The result of one record: completions, or an error."""

    id: str | int
    completions: tuple[Completion, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: RecordError | None = None
    extra: dict = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def text(self) -> str:
        """The first completion's text ('' for an error)."""
        return self.completions[0].text if self.completions else ""

    def to_json(self) -> dict:
        """The output line of this record, as documented in the README."""
        line: dict = {"id": self.id}
        if self.error is not None:
            line["error"] = self.error.to_json()
        else:
            line["choices"] = [_choice_json(c) for c in self.completions]
        line["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        return line


def _choice_json(c: Completion) -> dict:
    choice: dict = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        choice["logprobs"] = [t.to_json() for t in c.logprobs]
    return choice
