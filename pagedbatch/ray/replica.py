"""One replica: an ordinary `LLM` in a Ray actor, running the shards the driver hands it.

`run(shard, records, params)` blocks while the shard generates (an actor with two
threads); meanwhile `take(shard)` hands the driver the outputs finished since the last
take, waiting up to a moment for one, with the replica's latest statistics. A replica
whose tensor-parallel rank died cannot run again: `run` raises `ReplicaBroken`, and the
driver replaces it as one that died. The class imports no Ray: `cluster.py` makes it an
actor.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.stats import EngineStats
from pagedbatch.outputs import RequestOutput
from pagedbatch.requests.records import Record
from pagedbatch.sampling_params import SamplingParams


@dataclass
class Report:
    """What `take` hands back: outputs, statistics, and whether the shard is finished."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats | None = None
    finished: bool = False


class ReplicaBroken(RuntimeError):
    """The replica's `LLM` cannot run any more (one of its tensor-parallel ranks died)."""


class Replica:
    """Loads the model at construction; a load failure is kept for `ready()` to say."""

    def __init__(self, config: EngineConfig) -> None:
        started = time.monotonic()
        self.problem: str | None = None
        self.llm: Any = None
        try:
            from pagedbatch.llm import LLM

            self.llm = LLM(config=config)
        except Exception as e:  # said by the driver in one line
            lines = str(e).strip().splitlines()
            self.problem = lines[0] if lines else type(e).__name__
        self.load_seconds = time.monotonic() - started
        self._changed = threading.Condition()
        self._outbox: list[RequestOutput] = []
        self._finished: set[int] = set()
        self._stats: EngineStats | None = None
        self._stop = threading.Event()

    def ready(self) -> dict[str, Any]:
        """Whether the model loaded (`problem`), how long it took, its dtype (auto: this
        machine's), and where it runs."""
        dtype = self.llm.dtype if self.llm is not None else None
        return {"problem": self.problem, "load_seconds": self.load_seconds, "dtype": dtype,
                "pid": os.getpid()}  # fmt: skip

    def run(self, shard: int, records: list[Record], params: SamplingParams) -> None:
        """Generate `records`; their outputs wait in the outbox for `take`."""
        if self.llm is None:
            raise RuntimeError(f"the replica could not load its model: {self.problem}")
        from pagedbatch.engine.tensor_parallel import TensorParallelError

        self._stop.clear()
        try:
            self.llm.generate(
                records, params, on_output=self._put, on_step=self._step,
                should_stop=self._stop.is_set, keep_outputs=False,
            )  # fmt: skip
        except TensorParallelError as e:
            raise ReplicaBroken(str(e)) from None
        finally:
            with self._changed:
                self._stats = self.llm.stats()
                self._finished.add(shard)
                self._changed.notify_all()

    def take(self, shard: int, wait_s: float) -> Report:
        """The outputs finished since the last take (waiting up to `wait_s` for one, or for
        the shard's end), the latest statistics, and whether `shard` is finished."""
        with self._changed:
            self._changed.wait_for(lambda: self._outbox or shard in self._finished, wait_s)
            outputs, self._outbox = self._outbox, []
            return Report(outputs, self._stats, shard in self._finished)

    def stop(self) -> None:
        """Stop the running shard after its current step (its unfinished records are dropped)."""
        self._stop.set()

    def memory_report(self) -> dict[str, Any]:
        return self.llm.memory_report()

    def _put(self, output: RequestOutput) -> None:
        with self._changed:
            self._outbox.append(output)
            self._changed.notify_all()

    def _step(self, stats: EngineStats) -> None:
        self._stats = stats
