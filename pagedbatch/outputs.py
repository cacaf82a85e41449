"""What a finished record turns into: plain data, serialised by io.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

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


class ParsedJson(NamedTuple):
    """The JSON value a JSON-constrained completion's text holds (null is a value too)."""

    value: Any


@dataclass(frozen=True)
class Completion:
    """One generated text. A constrained one says whether its grammar matched to the end
    (`complete`; None when unconstrained) and, for a JSON constraint that did, holds the
    value parsed (`json`); one cut first (max_tokens, a stop string) has no value. A
    thinking model's completion that thought has its thinking's text in `reasoning` and
    the answer in `text`; `reasoning_tokens` of its `token_ids` are the thinking and its
    marks."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids
    complete: bool | None = None
    json: ParsedJson | None = None
    reasoning: str | None = None
    reasoning_tokens: int = 0

    @property
    def incomplete(self) -> bool:
        """A constrained completion cut before its grammar's end."""
        return self.complete is False


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
class ChoiceScore:
    """One choice of a record scored instead of generated: the sum of its tokens'
    log-probabilities after the prompt, its probability among the record's choices (the
    softmax of their scores: the sums, or with `choice_score="mean"` the per-token means),
    and its token count."""

    text: str
    logprob: float
    prob: float
    tokens: int

    def to_json(self) -> dict:
        return {"text": self.text, "logprob": self.logprob, "prob": self.prob,
                "tokens": self.tokens}  # fmt: skip


@dataclass(frozen=True)
class RequestOutput:
    """The result of one record: completions, scored choices, or an error."""

    id: str | int
    completions: tuple[Completion, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: RecordError | None = None
    extra: dict = field(default_factory=dict)
    choices: tuple[ChoiceScore, ...] | None = None  # scored choices, in the given order

    @property
    def label(self) -> str | None:
        """The most probable choice (the first of equals), when choices were scored."""
        if not self.choices:
            return None
        return max(self.choices, key=lambda c: c.prob).text

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def reasoning_tokens(self) -> int:
        """The completion tokens that were thinking (counted in completion_tokens too)."""
        return sum(c.reasoning_tokens for c in self.completions)

    @property
    def text(self) -> str:
        """The first completion's text, or the label of scored choices ('' for an error)."""
        if self.choices:
            return self.label or ""
        return self.completions[0].text if self.completions else ""

    def to_json(self) -> dict:
        """The output line of this record, as documented in the README."""
        line: dict = {"id": self.id}
        if self.error is not None:
            line["error"] = self.error.to_json()
        elif self.choices is not None:
            line["label"] = self.label
            line["choices"] = [c.to_json() for c in self.choices]
        else:
            line["choices"] = [_choice_json(c) for c in self.completions]
        line["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if any(c.reasoning is not None for c in self.completions):
            line["usage"]["reasoning_tokens"] = self.reasoning_tokens
        return line


def _choice_json(c: Completion) -> dict:
    choice: dict = {"index": c.index}
    if c.reasoning is not None:
        choice["reasoning"] = c.reasoning
    choice.update(text=c.text, finish_reason=c.finish_reason)
    if c.json is not None:
        choice["json"] = c.json.value
    if c.logprobs is not None:
        choice["logprobs"] = [t.to_json() for t in c.logprobs]
    return choice
