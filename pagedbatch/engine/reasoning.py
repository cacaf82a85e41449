"""Thinking models: where a sequence's reasoning lies among its tokens, and its budget.

A model whose chat template marks its thinking with `<think>` ... `</think>` (Qwen3,
DeepSeek-R1 and their distillations) thinks when its prompt leaves a `<think>` open (the
R1-style templates open it themselves) or when its first output token is `<think>` (Qwen3).
The thinking then runs to the `</think>` token; the answer is what follows. A sequence
whose prompt closes the thinking (Qwen3 with `enable_thinking: false`) or whose first
token is anything else does not think: its whole output is the answer.

A constrained output (structured output's grammar) is not split: the grammar covers all of
it. With a `reasoning_budget` of N, the token after N thinking tokens is forced to be
`</think>`, and the answer may then take `max_tokens` tokens of its own.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedbatch.engine.sequence import Sequence

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("auto", "think", "none")


@dataclass(frozen=True)
class ThinkTokens:
    """The token ids that open and close a model's thinking."""

    start: int
    end: int

    def thinking_start(self, prompt: Seq[int]) -> int | None:
        """Where the thinking of a sequence with this prompt starts when the prompt leaves a
        `<think>` open (its last think token is `start`): the first output position."""
        for token in reversed(prompt):
            if token == self.start:
                return len(prompt)
            if token == self.end:
                return None
        return None


def think_tokens(tokenizer, parser: str) -> ThinkTokens | None:
    """The think tokens of a tokenizer under `parser` (REASONING_PARSERS): `auto` finds them
    when `<think>` and `</think>` are tokens of their own and the chat template uses
    `</think>`; `think` requires the tokens (ValueError when missing); `none` turns the
    split off."""
    if parser == "none":
        return None
    vocab = tokenizer.get_vocab()
    start, end = vocab.get(THINK_START), vocab.get(THINK_END)
    if start is None or end is None:
        if parser == "think":
            raise ValueError(
                f"--reasoning-parser think: the tokenizer has no {THINK_START} and "
                f"{THINK_END} tokens"
            )
        return None
    template = getattr(tokenizer, "chat_template", None)
    if parser == "auto" and not (isinstance(template, str) and THINK_END in template):
        return None
    return ThinkTokens(start, end)


def advance(seq: Sequence, think: ThinkTokens) -> None:
    """Follow the token just appended to `seq`: thinking opened by the first output token,
    or closed by `</think>` (with a budget, the answer then has max_tokens of its own)."""
    position = seq.num_tokens - 1
    token = seq.token_ids[position]
    if seq.think_start is None:
        if position != seq.num_prompt_tokens:
            return
        if token == think.start:
            seq.think_start = position + 1
        else:  # no thinking: max_tokens in all, not the budget's room too
            seq.max_len = min(seq.max_len, seq.num_prompt_tokens + seq.params.max_tokens)
        return
    if seq.think_end is None and token == think.end:
        seq.think_end = position
        if seq.params.reasoning_budget is not None:
            seq.max_len = min(seq.max_len, position + 1 + seq.params.max_tokens)


def must_end_thinking(seq: Sequence) -> bool:
    """The next token of `seq` must be `</think>`: it has thought its budget's tokens."""
    budget = seq.params.reasoning_budget
    return (
        budget is not None
        and seq.think_start is not None
        and seq.think_end is None
        and seq.num_tokens - seq.think_start >= budget
    )


def answer_start(seq: Sequence) -> int | None:
    """Where the answer starts in `seq.token_ids` (None while it still thinks)."""
    if seq.think_start is None:
        return seq.num_prompt_tokens
    return None if seq.think_end is None else seq.think_end + 1
