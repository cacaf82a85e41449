"""How one record is sampled: the job defaults, overridden per record."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedbatch.constraint import RECORD_FIELDS, Constraint, record_constraint

# The controls that change the logits before sampling (engine/logits_processor.py) or stop
# a sequence, as OpenAI, vLLM and transformers name them.
CONTROLS = (
    "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p", "logit_bias",
    "min_tokens", "stop_token_ids",
)  # fmt: skip
# Fields a record may override, as they are spelled in the input file (RECORD_FIELDS set
# the record's `constraint`).
OVERRIDABLE = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "choices",
    "reasoning_budget", *CONTROLS, *RECORD_FIELDS,
)  # fmt: skip
MAX_LOGPROBS = 20  # most alternatives a token may report (OpenAI's limit)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range)
CHOICE_SCORES = ("sum", "mean")
# The engine packs seeds, top-k and positions into int64 tensors: seeds are unsigned 64-bit
# integers (stored as their two's-complement bits), the other integers signed 64-bit.
MAX_SEED = 2**64 - 1
MAX_INT = 2**63 - 1
# Most samples per record: each is a sequence of its own, with its own copy of the prompt's
# token ids, all built when the record is admitted (n = 10**9 would fill the memory).
MAX_N = 4096
# Most choices per record: each is scored by a sequence of its own (a fork of the prompt),
# all built when the record is admitted, and each costs a row of logits.
MAX_CHOICES = 1024


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

    The logits controls, as transformers and OpenAI define them: `repetition_penalty`
    (> 0, 1 off) divides the positive logits of every token in the prompt or output so far
    and multiplies the negative ones; `presence_penalty` and `frequency_penalty` (-2 to 2)
    subtract from each output token's logit the penalty once, and its count times the
    penalty; `logit_bias` ({token id: -100 to 100}) is added to the logits first; `min_p`
    (0 to 1) drops the tokens whose probability is below min_p times the top token's, after
    temperature; the first `min_tokens` output tokens are never EOS or a `stop_token_ids`
    token, and stop strings do not end them; `stop_token_ids` end a sequence as EOS does.
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
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), by token; or a mapping
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()

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
        check_text("stop", self.stop)
        if self.choice_score not in CHOICE_SCORES:
            raise ValueError(
                f"choice_score must be one of {', '.join(CHOICE_SCORES)}, got {self.choice_score!r}"
            )
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a Constraint, got {short_repr(self.constraint)}")
        self._check_controls()
        if self.choices is not None:
            self._check_choices()

    def _check_controls(self) -> None:
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {short_repr(ids)}")
        for token in ids:
            _check_int("a stop token id", token, minimum=0)
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if self.constraint is not None and (self.min_tokens or self.reasoning_budget is not None):
            name = "min_tokens" if self.min_tokens else "reasoning_budget"
            raise ValueError(
                f"{name} does not combine with a {self.constraint.kind} constraint: the "
                "constraint decides where the output ends"
            )

    def _check_choices(self) -> None:
        given = self.choices
        choices = tuple(given) if isinstance(given, list) else given
        if not isinstance(choices, tuple) or not choices:
            raise ValueError(
                f"choices must be a non-empty list of strings, got {short_repr(given)}"
            )
        object.__setattr__(self, "choices", choices)
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"choices: at most {MAX_CHOICES} a record, got {len(choices)}")
        seen: set[str] = set()
        for choice in choices:
            if not isinstance(choice, str) or not choice:
                raise ValueError(
                    f"every choice must be a non-empty string, got {short_repr(choice)}"
                )
            if choice in seen:
                raise ValueError(
                    f"choices must differ from each other: {short_repr(choice)} is repeated"
                )
            seen.add(choice)
        check_text("choices", choices)
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

    @functools.cached_property
    def processes_logits(self) -> bool:
        """These params change the logits before sampling (engine/logits_processor.py)."""
        return bool(
            self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
            or self.logit_bias or self.min_tokens
        )  # fmt: skip

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


def not_text(value: Any) -> str | None:
    """The first string in `value` (a string, or lists, tuples and mappings of them) that
    holds a lone surrogate ("\\ud800" is valid JSON, and a Python string, but no character:
    no tokenizer or UTF-8 file takes it); None when there is none."""
    if isinstance(value, str):
        return None if value.isascii() or _encodes(value) else value
    if isinstance(value, Mapping):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return None
    return next((found for v in value if (found := not_text(v)) is not None), None)


def check_text(name: str, value: Any) -> None:
    """Raise ValueError, naming `name`, when `value` holds a string that is not text."""
    if (found := not_text(value)) is not None:
        raise ValueError(f"{name}: {short_repr(found)} holds a lone surrogate, which is not text")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _logit_bias(given: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs sorted by token, from a mapping (JSON gives
    its keys as strings of digits) or pairs; raises ValueError naming a bad entry."""
    if isinstance(given, Mapping):
        given = list(given.items())
    if not isinstance(given, (list, tuple)):
        raise ValueError(
            f"logit_bias must be an object {{token id: bias}}, got {short_repr(given)}"
        )
    pairs = {}
    for entry in given:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"logit_bias: {short_repr(entry)} is not a token id and a bias")
        key, bias = entry
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        _check_int("a logit_bias token id", token, minimum=0)
        _check_number(f"logit_bias[{token}]", bias)
        if abs(bias) > MAX_BIAS:
            raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


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
