"""What `pagedbatch bench` measures, as plain data for the CLI (or a notebook) to show."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The contenders, as `--skip` spells them (see bench.py).
CONTENDERS = ("run", "pagedbatch", "pagedbatch-no-sharing", "generate", "generate_batch")


@dataclass(frozen=True)
class BenchResult:
    """One contender's run: generation wall time (loading excluded, see `details`).

    `contender` is one of CONTENDERS; `name` says it for people, with its settings.

    `details` holds what only some contenders have: `load_s` (pagedbatch), and for
    pagedbatch also `prefix_hit_rate`, `peak_blocks`, `sharing_saving`, `preemptions`,
    `decode_steps`, `decode_ms` (mean decode-only step), `decode_batch` (mean sequences
    per decode step) and, on CUDA, `floor_fraction` (bandwidth floor / step time).
    """

    contender: str
    name: str
    seconds: float
    records: int
    output_tokens: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


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

    def get(self, contender: str) -> BenchResult | None:
        """The result of `contender` (one of CONTENDERS), if it ran."""
        return next((r for r in self.results if r.contender == contender), None)
