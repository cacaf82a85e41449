"""RayLLM: `LLM.generate` across the replicas of a Ray cluster, for `Job.run` and libraries.

The driver tokenizes the records (tokenizer only, no weights), orders them depth-first and
cuts them into shards at weak prefix boundaries (`shards.py`); idle replicas take the next
shard; finished outputs stream back through `take` and reach `on_output` here, once per
record: a shard whose replica dies (or loses a tensor-parallel rank) runs again elsewhere
without the records already returned, with the same seeds (they derive from the job seed
and the record id).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import Any

from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.stats import EngineStats
from pagedbatch.generator import OnOutput, OnPrepared, OnStep, ShouldStop
from pagedbatch.inputs.id_keys import id_key, key_array, repeated
from pagedbatch.outputs import RequestOutput
from pagedbatch.ray.cluster import ClusterError, ReplicaPool, connect, import_ray, lost, reachable
from pagedbatch.ray.replica import ReplicaBroken
from pagedbatch.ray.shards import Shard, make_shards
from pagedbatch.ray.stats import merge_memory_reports, merge_stats
from pagedbatch.requests.prompt_store import PromptStore
from pagedbatch.requests.prompts import PromptBuilder
from pagedbatch.requests.records import Input, Record, record_batches, to_record
from pagedbatch.sampling_params import SamplingParams

SHARDS_PER_REPLICA = 4  # room to balance uneven shards, and a bound on the work a death redoes
TAKE_WAIT_S = 0.25  # a take returns at once with outputs, else after this (then stats/stop)
_TOKENIZE_BATCH = 512  # records the driver tokenizes at a time
MAX_SHARD_RECORDS = 20_000  # a big job is cut finer: a shard's records are read at once
MAX_ATTEMPTS = 3  # a shard whose replica died this often stops the job
LIVENESS_S = 2.0  # how often the driver checks that the cluster's head is still there


class RayLLM:
    """The LLM interface `Job.run` needs (`generate`, `config`, `stats`, `memory_report`,
    `dtype`), run by `replicas` actors each holding an ordinary `LLM` of `config` (with
    `config.tensor_parallel` N: N GPUs, or N CPUs, of one node each).

    `config.max_num_seqs` here is the cluster's: each replica's times the replicas.
    """

    def __init__(
        self, config: EngineConfig, *, address: str = "auto", replicas: int | None = None
    ) -> None:
        from pagedbatch.models.loader import load_tokenizer_and_config

        tokenizer, model_config = load_tokenizer_and_config(config.model, config.cache_dir)
        if config.tensor_parallel > 1:
            from pagedbatch.engine.tensor_parallel import check_splits

            check_splits(config, model_config)
        self._prompts = PromptBuilder(tokenizer, config.chat, config.chat_template_kwargs)
        self.cluster = connect(address, replicas=replicas, ranks=config.tensor_parallel)
        self._pool: ReplicaPool | None = None
        self.replaced = 0  # replicas that died and were replaced
        self.lost = False  # the cluster went away under the job
        self._stats: dict[Any, EngineStats] = {}  # actor -> its latest statistics
        try:
            self._pool = ReplicaPool(config, self.cluster, replicas)
            self._pool.wait_ready()
        except BaseException:
            self.close()
            raise
        self.replicas = self._pool.size
        self.config = config.replace(max_num_seqs=config.max_num_seqs * self.replicas)
        self.load_seconds = self._pool.load_seconds

    def generate(
        self, inputs: Iterable[Input], params: SamplingParams | None = None, *,
        on_output: OnOutput | None = None, on_step: OnStep | None = None,
        should_stop: ShouldStop | None = None, on_prepared: OnPrepared | None = None,
        keep_outputs: bool = True, fit_pool: bool = False,
    ) -> list[RequestOutput]:  # fmt: skip
        """As `LLM.generate`; `on_step` gets the statistics summed over the replicas as they
        report. Record ids must be distinct (they tell the outputs apart). `fit_pool` is
        not used: each replica keeps the pool it loaded with."""
        params = params or SamplingParams()
        items = inputs if isinstance(inputs, Seq) and not isinstance(inputs, str) else list(inputs)
        stop = should_stop or (lambda: False)
        shards = self._shards(items, params, stop, on_prepared)
        if shards is None:
            return []
        results: dict[Any, RequestOutput] = {}

        def emit(output: RequestOutput) -> None:
            if keep_outputs:
                results[output.id] = output
            if on_output is not None:
                on_output(output)

        _Dispatch(self, items, params, emit, on_step, stop).run(shards)
        ids = (to_record(x, i).id for i, x in enumerate(items)) if results else ()
        return [results[rid] for rid in ids if rid in results]

    def _shards(
        self, items: Seq[Input], defaults: SamplingParams, stop: ShouldStop,
        on_prepared: OnPrepared | None,
    ) -> list[Shard] | None:  # fmt: skip
        """Tokenize the records a batch at a time (token ids kept in a PromptStore, as
        `LLM` does) and cut their depth-first order into shards; None when stopped.
        `on_prepared(done, total, mean most output tokens)` as `LLM.generate` calls it
        (a record's params are checked on its replica; one that fails counts nothing)."""
        store = PromptStore(len(self._prompts.tokenizer))
        keys = bytearray()  # the records' id keys: ids must be distinct
        budget = 0
        for start, records in record_batches(items, _TOKENIZE_BATCH):
            if stop():
                return None
            for record, ids in zip(records, self._keys(records), strict=True):
                store.append(ids)
                keys += id_key(record.id)
                budget += _most_output_tokens(record, defaults)
            if on_prepared is not None:
                on_prepared(start + len(records), len(items), budget / len(store))
        if repeated(key_array(bytes(keys))):
            raise ValueError("RayLLM.generate needs distinct record ids")
        count = max(self.replicas * SHARDS_PER_REPLICA, -(-len(store) // MAX_SHARD_RECORDS))
        return make_shards(store, count)

    @property
    def dtype(self) -> str:
        """The dtype the replicas run in (auto resolves on each replica's machine)."""
        return ", ".join(self._pool.dtypes) if self._pool is not None else "none"

    def stats(self) -> EngineStats:
        """Every replica's statistics summed (a replica that died counts what it reported)."""
        return merge_stats(list(self._stats.values()))

    def memory_report(self) -> dict:
        """The KV memory figures of the live replicas, merged (see `merge_memory_reports`)."""
        ray = import_ray()
        reports = ray.get([actor.memory_report.remote() for actor in self._actors()])
        return merge_memory_reports(reports, self.stats())

    def close(self) -> None:
        """Stop the replicas, and the local cluster when this process started it (from a
        cluster that is gone, only disconnect)."""
        if self._pool is not None and not self.lost:
            self._pool.close()
        self._pool = None
        if self.cluster.started_here or self.lost:
            import_ray().shutdown()
        self.cluster.stop_watchdog()

    def __enter__(self) -> RayLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _actors(self) -> list[Any]:
        if self._pool is None:
            raise ClusterError("the replicas were closed")
        return self._pool.actors

    def _keys(self, records: list[Record]) -> list[list[int]]:
        """The records' prompt token ids, their place in depth-first order; a record that
        cannot be tokenized sorts first (its replica emits its error, as `LLM` does)."""
        ok = [r for r in records if r.error is None]
        ids = iter(self._prompts.token_ids_batch(ok))
        keys = []
        for record in records:
            key = [] if record.error is not None else next(ids)
            keys.append([] if isinstance(key, Exception) else key)
        return keys


def _most_output_tokens(record: Record, defaults: SamplingParams) -> int:
    """max_tokens x n of a record that generates; 0 for choices, an error or bad params."""
    if record.error is not None:
        return 0
    try:
        return defaults.with_overrides(record.overrides).most_output_tokens
    except (TypeError, ValueError):
        return 0


class _Dispatch:
    """One `generate` call: shards to idle replicas, outputs and statistics back."""

    def __init__(
        self, llm: RayLLM, items: Seq[Input], params: SamplingParams, emit: OnOutput,
        on_step: OnStep | None, stop: ShouldStop,
    ) -> None:  # fmt: skip
        self.llm, self.items, self.params = llm, items, params
        self.emit, self.on_step, self.stop = emit, on_step, stop
        self.ray = import_ray()
        self.pending: deque[Shard] = deque()
        self.busy: dict[Any, tuple[Any, Shard, Any]] = {}  # take ref -> (actor, shard, run ref)
        self.emitted: set[Any] = set()
        self.stopping = False

    def run(self, shards: list[Shard]) -> None:
        self.pending.extend(shards)
        checked = time.monotonic()
        while self.pending or self.busy:
            if time.monotonic() - checked > LIVENESS_S:
                self._check_cluster()
                checked = time.monotonic()
            if not self.stopping and self.stop():
                self._stop_all()
            self._hand_out()
            ready, _ = self.ray.wait(list(self.busy), num_returns=1, timeout=TAKE_WAIT_S)
            for ref in ready:
                self._receive(ref)
            if self.on_step is not None:
                self.on_step(self.llm.stats())

    def _hand_out(self) -> None:
        busy = {actor for actor, _, _ in self.busy.values()}
        for actor in self.llm._actors():
            if actor in busy or not self.pending or self.stopping:
                continue
            shard = self.pending.popleft()
            shard.attempts += 1
            run = actor.run.remote(shard.index, self._remaining(shard), self.params)
            self.busy[actor.take.remote(shard.index, TAKE_WAIT_S)] = (actor, shard, run)

    def _receive(self, ref: Any) -> None:
        actor, shard, run = self.busy.pop(ref)
        try:
            report = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            self._lost(actor, shard)
            return
        for output in report.outputs:
            if output.id not in self.emitted:  # a shard run again never writes a line twice
                self.emitted.add(output.id)
                shard.done.add(output.id)
                self.emit(output)
        if report.stats is not None:
            self.llm._stats[actor] = report.stats
        if not report.finished:
            self.busy[actor.take.remote(shard.index, TAKE_WAIT_S)] = (actor, shard, run)
            return
        try:
            self.ray.get(run)  # raises what the replica's generate raised
        except (self.ray.exceptions.RayActorError, ReplicaBroken):
            self._lost(actor, shard)

    def _check_cluster(self) -> None:
        """ClusterError when the cluster's head is gone (stopped by its owner: `ray stop`,
        the job that started it), before Ray ends this process for it."""
        if not reachable(self.llm.cluster.address):
            self.llm.lost = True
            raise lost(self.llm.cluster)

    def _lost(self, actor: Any, shard: Shard) -> None:
        """A replica died (or lost a tensor-parallel rank): its shard's unreturned records
        go first to the next idle one (ClusterError when the whole cluster is gone)."""
        self._check_cluster()
        pool = self.llm._pool
        assert pool is not None
        self.llm.replaced += 1
        pool.replace(actor)
        if self.stopping or len(shard.done) == len(shard.numbers):
            return
        if shard.attempts >= MAX_ATTEMPTS:
            raise ClusterError(
                f"shard {shard.index} lost its replica {shard.attempts} times; stopping "
                "(the lines written are kept: resume to run the rest)"
            )
        self.pending.appendleft(shard)

    def _remaining(self, shard: Shard) -> list[Record]:
        """The shard's records whose output has not come back, read again from the input,
        without their input rows (the driver keeps those for the errors file)."""
        records = (to_record(self.items[int(i)], int(i)) for i in shard.numbers)
        return [_without_source(r) for r in records if r.id not in shard.done]

    def _stop_all(self) -> None:
        self.stopping = True
        self.pending.clear()
        for actor, _, _ in self.busy.values():
            actor.stop.remote()


def _without_source(record: Record) -> Record:
    return record if record.source is None else dataclasses.replace(record, source=None)
