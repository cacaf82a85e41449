"""Generator: what `LLM` (one process) and `RayLLM` (replicas on a Ray cluster) share, and
what `Job.run` takes. tests/test_generator.py checks that both keep its signatures."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.stats import EngineStats
from pagedbatch.outputs import RequestOutput
from pagedbatch.requests.records import Input
from pagedbatch.sampling_params import SamplingParams

OnOutput = Callable[[RequestOutput], None]
OnStep = Callable[[EngineStats], None]
ShouldStop = Callable[[], bool]
# (records tokenized, records in all, the most output tokens a record that passed may
# generate, on average so far)
OnPrepared = Callable[[int, int, float], None]


class Generator(Protocol):
    """Generates for many records; see `LLM.generate` for what each callback is told."""

    config: EngineConfig  # max_num_seqs: the sequences running at once, in all

    def generate(
        self, inputs: Iterable[Input], params: SamplingParams | None = None, *,
        on_output: OnOutput | None = None, on_step: OnStep | None = None,
        should_stop: ShouldStop | None = None, on_prepared: OnPrepared | None = None,
        keep_outputs: bool = True, fit_pool: bool = False,
    ) -> list[RequestOutput]: ...  # fmt: skip

    def stats(self) -> EngineStats:
        """The engine statistics of everything generated so far."""
        ...

    def memory_report(self) -> dict:
        """The KV memory figures so far (plain, JSON-ready data)."""
        ...

    @property
    def dtype(self) -> str:
        """The dtype the model runs in ("float32", "bfloat16", ...)."""
        ...
