"""The benchmark workloads (docs/MEASUREMENTS.md): seeded token-id prompts, fixed output lengths.

- label: a ~250-token shared instruction + 10-80 unique tokens, 16 output tokens
  (the nightly labelling job);
- share: a 512-token shared prefix + 32-160 unique tokens, 128 output tokens;
- mixed: input and output lengths uniform in [100, 1024], nothing shared (comparable
  with published offline results of vLLM-style engines).

Each has 256 prompts unless scaled down. Token ids are uniform over the model's
vocabulary minus its special tokens; the same workload, seed and vocabulary always give
the same prompts. Every contender generates exactly each prompt's output length (EOS is
ignored), so their token counts compare like with like.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pagedbatch.requests.prompts import PromptBuilder
from pagedbatch.requests.records import Record


@dataclass(frozen=True)
class Workload:
    """How a workload's prompts are drawn: a shared prefix, then unique tokens.

    `unique_tokens` and `output_tokens` are inclusive ranges, drawn uniformly per prompt.
    """

    name: str
    num_prompts: int
    shared_tokens: int
    unique_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.shared_tokens < 0:
            raise ValueError(f"shared_tokens must be >= 0, got {self.shared_tokens}")
        for field in ("unique_tokens", "output_tokens"):
            low, high = getattr(self, field)
            if not 1 <= low <= high:
                raise ValueError(f"{field} must be a range 1 <= low <= high, got {(low, high)}")

    def scaled(self, num_prompts: int | None = None, max_tokens: int | None = None) -> Workload:
        """This workload with `num_prompts` prompts and/or exactly `max_tokens` output tokens."""
        changes: dict[str, object] = {}
        if num_prompts is not None:
            changes["num_prompts"] = num_prompts
        if max_tokens is not None:
            changes["output_tokens"] = (max_tokens, max_tokens)
        return dataclasses.replace(self, **changes)


WORKLOADS: Mapping[str, Workload] = MappingProxyType(
    {
        "label": Workload("label", 256, 250, (10, 80), (16, 16)),
        "share": Workload("share", 256, 512, (32, 160), (128, 128)),
        "mixed": Workload("mixed", 256, 0, (100, 1024), (100, 1024)),
    }
)


@dataclass(frozen=True)
class BenchPrompts:
    """What every contender runs: each prompt's token ids and its exact output length."""

    token_ids: tuple[tuple[int, ...], ...]
    max_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.max_tokens):
            raise ValueError("token_ids and max_tokens must have one entry per prompt")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.token_ids))

    @property
    def output_tokens(self) -> int:
        """Tokens all prompts generate together: what every contender must produce."""
        return sum(self.max_tokens)

    def records(self) -> list[Record]:
        """The prompts as token-id records, each with its own max_tokens."""
        return [
            Record(id=i, prompt_token_ids=ids, overrides={"max_tokens": n})
            for i, (ids, n) in enumerate(zip(self.token_ids, self.max_tokens))
        ]


def workload_prompts(
    workload: Workload, vocab_size: int, special_ids: Collection[int] = (), seed: int = 0
) -> BenchPrompts:
    """The seeded prompts of `workload` over a vocabulary of `vocab_size` ids."""
    allowed = sorted(set(range(vocab_size)) - set(special_ids))
    if not allowed:
        raise ValueError("the vocabulary has no ordinary token to draw prompts from")
    rng = random.Random(seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(rng.choices(allowed, k=n))

    shared = draw(workload.shared_tokens)
    token_ids, max_tokens = [], []
    for _ in range(workload.num_prompts):
        token_ids.append(shared + draw(rng.randint(*workload.unique_tokens)))
        max_tokens.append(rng.randint(*workload.output_tokens))
    return BenchPrompts(tuple(token_ids), tuple(max_tokens))


def file_records(source: str, num_records: int | None = None) -> list[Record]:
    """The valid records of the input `source` (the first `num_records` if given), without
    their per-record overrides (which would make contenders generate different lengths).
    Read without torch: a bad input is an InputError or ValueError before any model loads."""
    from pagedbatch.inputs.reader import read_records

    if num_records is not None and num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    records = [
        dataclasses.replace(r, overrides={}) for r in read_records(source) if r.error is None
    ][:num_records]
    if not records:
        raise ValueError(f"{source} has no valid record to benchmark")
    return records


def record_prompts(records: Sequence[Record], tokenizer, max_tokens: int) -> BenchPrompts:
    """Records of an input file, tokenized as `pagedbatch run` would (chat template for
    messages), each generating `max_tokens` tokens."""
    builder = PromptBuilder(tokenizer)
    token_ids = tuple(tuple(builder.token_ids(r)) for r in records)
    return BenchPrompts(token_ids, (max_tokens,) * len(records))
