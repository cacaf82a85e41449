"""How one record is sampled: the job defaults, overridden per record."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedbatch.constraint import RECORD_FIELDS, Constraint, record_constraint

# Fields a record may override, as they are spelled in the input file (RECORD_FIELDS set
# the record's `constraint`).
OVERRIDABLE = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "choices",
    "reasoning_budget",
    *RECORD_FIELDS,
)  # fmt: skip
MAX_LOGPROBS = 20  # most alternatives a token may report (OpenAI's limit)
CHOICE_SCORES = ("sum", "mean")
# The engine packs seeds, top-k and positions into int64 tensors: seeds are unsigned 64-bit
# integers (stored as their two's-complement bits), the other integers signed 64-bit.
MAX_SEED = 2**64 - 1
MAX_INT = 2**63 - 1
# Most samples per record: each is a sequence of its own, with its own copy of the prompt's
# token ids, all built when the record is admitted (n = 10**9 would fill the memory).
MAX_N = 4096


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    `temperature == 0` is greedy decoding. `top_k == 0` and `top_p == 1` switch those
    filters off. `seed` fixes the random stream of this request alone, so the same seed
    gives the same text whatever else runs in the batch. `n` samples are drawn per
    record (1 to MAX_N); sample k > 0 uses `sample_seed(seed, k)`. `logprobs` (0 to MAX_LOGPROBS):
    each generated token reports its log-probability under the model and the `logprobs`
    most likely tokens with theirs (None: none reported).

    `choices`: instead of generating, score each choice as a continuation of the prompt:
    the sum of its tokens' log-probabilities (`choice_score="mean"`: their mean).

    `reasoning_budget`: a thinking model thinks at most this many tokens (then its
    end-of-thinking token is forced) and its answer has `max_tokens` of its own; without
    one, `max_tokens` counts the thinking and the answer together (engine/reasoning.py).
    `constraint`: the output must match it (a JSON schema, any JSON object, a regex or a
    grammar: constraint.py); the tokens it does not allow are masked before sampling.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    choices: tuple[str, ...] | None = None
    choice_score: str = "sum"
    reasoning_budget: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("n", self.n, minimum=1, maximum=MAX_N)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.reasoning_budget is not None:
            _check_int("reasoning_budget", self.reasoning_budget, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(
                f"stop must be a non-empty string or a list of them, got {self.stop!r}"
            )
        if self.choice_score not in CHOICE_SCORES:
            raise ValueError(
                f"choice_score must be one of {', '.join(CHOICE_SCORES)}, got {self.choice_score!r}"
            )
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a Constraint, got {short_repr(self.constraint)}")
        if self.choices is not None:
            self._check_choices()

    def _check_choices(self) -> None:
        given = self.choices
        choices = tuple(given) if isinstance(given, list) else given
        if not isinstance(choices, tuple) or not choices:
            raise ValueError(
                f"choices must be a non-empty list of strings, got {short_repr(given)}"
            )
        object.__setattr__(self, "choices", choices)
        for choice in choices:
            if not isinstance(choice, str) or not choice:
                raise ValueError(
                    f"every choice must be a non-empty string, got {short_repr(choice)}"
                )
        if len(set(choices)) < len(choices):
            repeated = next(c for c in choices if choices.count(c) > 1)
            raise ValueError(
                f"choices must differ from each other: {short_repr(repeated)} is repeated"
            )
        if self.n > 1:
            raise ValueError("choices are scored once: n must be 1 with choices")
        if self.logprobs is not None:
            raise ValueError("logprobs applies to generated tokens, not to choices")
        if self.constraint is not None:
            raise ValueError(
                f"a {self.constraint.kind} constraint applies to generated text, not to choices"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def max_output_tokens(self) -> int:
        """The most tokens one sample generates: max_tokens, and with a reasoning budget the
        thinking's too (the budget and its two marks)."""
        if self.reasoning_budget is None:
            return self.max_tokens
        return self.max_tokens + self.reasoning_budget + 2

    @property
    def most_output_tokens(self) -> int:
        """The most tokens these params generate: max_output_tokens x n (choices: none, they
        are scored)."""
        return 0 if self.choices is not None else self.max_output_tokens * self.n

    def with_overrides(self, overrides: Mapping[str, Any]) -> SamplingParams:
        """These params with some fields replaced; raises ValueError naming a bad field."""
        unknown = set(overrides) - set(OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        if not overrides:
            return self
        fields = {k: v for k, v in overrides.items() if k not in RECORD_FIELDS}
        if len(fields) < len(overrides):  # the record's own constraint wins over the job's
            fields["constraint"] = record_constraint(overrides)
        return dataclasses.replace(self, **fields)


def _check_int(name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {short_repr(value)}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {short_repr(value)}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def short_repr(value: Any) -> str:
    """`repr(value)`, cut to 40 characters (a record may hold a 10,000-digit number)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def derive_seed(base: int, salt: str | int) -> int:
    """A seed of its own for `salt` (a record id, a sample index), stable across runs.

    `1` and `"1"` give different seeds, as they are different ids.
    """
    digest = hashlib.blake2b(f"{base}:{salt!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a record whose seed is `seed` (sample 0: `seed` itself)."""
    if seed is None or index == 0:
        return seed
    return derive_seed(seed, index)
