"""One `pagedbatch run` job: what is left to do in its output, and doing it without loss.

`Job(source, settings, policy)` reads the input and checks the output against the
policy (resume, overwrite, force) and the stored fingerprint, touching no file.
`Job.run(llm)` then makes the files ready (drops a torn last line, error lines to retry,
or the old output; stores the fingerprint; rebuilds the errors file) and appends one
line per record as records finish, in completion or input order, until all are done or
`should_stop` says so. Nothing here prints: the CLI does.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagedbatch.engine.stats import EngineStats
from pagedbatch.files import atomic_write
from pagedbatch.generator import Generator, OnOutput, OnPrepared, OnStep, ShouldStop
from pagedbatch.inputs.jsonl import loads
from pagedbatch.inputs.openai_batch import batch_output_line
from pagedbatch.inputs.reader import read_index
from pagedbatch.inputs.record_index import RecordView
from pagedbatch.job.fingerprint import (
    fingerprint_path,
    job_digest,
    job_fingerprint,
    load_fingerprint,
    save_fingerprint,
)
from pagedbatch.job.guard import GuardError, OutputLock, check_paths, check_writable
from pagedbatch.job.output_scan import (
    QUARANTINE_KEY,
    canonical,
    cut_torn_line,
    drop_error_lines,
    edited_line,
)
from pagedbatch.job.output_writer import OutputWriter, encode_line
from pagedbatch.job.resume import JobError, ResumeCheck, ResumePolicy
from pagedbatch.plan.rates import store_run_rates
from pagedbatch.requests.records import Record

__all__ = ["Job", "JobError", "JobResult", "ResumePolicy", "default_output", "report_paths"]
from pagedbatch.job.settings import RunSettings
from pagedbatch.outputs import RecordError, RequestOutput

# --order input runs the records in windows of this many per running sequence (at least
# MIN_WINDOW): a window's lines wait for its earlier records, so at most one window of
# finished outputs is held in memory.
WINDOW_PER_SEQ = 4
MIN_WINDOW = 64


@dataclass
class JobResult:
    """What one run did: lines written by code ("ok" or an error code), and what it left."""

    codes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # already in the output when the run started
    not_run: int = 0  # left for a resume (the run was stopped)
    incomplete: int = 0  # ok records with a constrained completion cut before its end
    skipped_errors: Counter[str] = field(default_factory=Counter)  # the skipped error lines

    @property
    def written(self) -> int:
        return sum(self.codes.values())

    @property
    def failed(self) -> int:
        """Error lines this run wrote."""
        return self.written - self.codes["ok"]

    @property
    def output_codes(self) -> Counter[str]:
        """The output's lines of this input's records by code: this run's and the skipped."""
        skipped_ok = self.skipped - sum(self.skipped_errors.values())
        return self.codes + self.skipped_errors + Counter(ok=skipped_ok)


def default_output(source: str) -> Path:
    return Path(f"{Path(source.rstrip('/')).stem}.output.jsonl")


def report_paths(output: Path) -> tuple[Path, Path]:
    """The memory report's files beside `output`: labels.v2.jsonl -> labels.v2.memory.json
    and labels.v2.memory.png."""
    base = output.name.removesuffix(".jsonl")
    return output.with_name(base + ".memory.json"), output.with_name(base + ".memory.png")


class Job:
    """The records of an input, and which of them an output file still lacks."""

    def __init__(
        self,
        source: str,
        settings: RunSettings,
        policy: ResumePolicy,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        """Check the files, read the input, lock the output and check it against `policy`.

        Raises JobError (or InputError) before anything is written; the lock taken here is
        held until `close()` (a Job is a context manager). The input is read once here,
        keeping a few bytes a record (record_index.py; `on_read(n)` as it goes) and read
        again as records run.
        """
        self.settings = settings
        self.policy = policy
        self.source = source
        self.output = settings.output or default_output(source)
        self.errors_path = settings.errors
        self.input_note: str | None = None  # what a resume accepted of a changed input
        self._locks = {role: OutputLock.beside(path) for role, path in self._appended_files()}
        try:
            check_paths(source, self._roles())
        except GuardError as e:
            raise JobError(str(e)) from None
        self.index = read_index(
            source, split=settings.split, fields=settings.fields,
            skip_invalid=settings.skip_invalid, on_read=on_read,
        )  # fmt: skip
        try:
            self._lock_and_check()
        except GuardError as e:
            self.close()
            raise JobError(str(e)) from None
        except BaseException:
            self.close()
            raise
        done = self._scan.done if not policy.retry_errors else self._scan.ok
        self.records = RecordView(self.index, np.arange(len(self.index)))
        self.todo = RecordView(self.index, np.flatnonzero(~done.contains(self.index.keys())))
        self.skipped = len(self.records) - len(self.todo)
        self.skipped_errors: Counter[str] = Counter()  # the codes of skipped error lines
        if not policy.retry_errors:
            for rid, error in self._scan.errors.items():
                if self.index.find(rid) is not None:
                    self.skipped_errors[str(error.get("code") or "error")] += 1
        self._writers: list[OutputWriter] = []
        self._created = int(time.time())

    def _lock_and_check(self) -> None:
        """Fingerprint the job, lock its files and check the output against the policy."""
        settings = self.settings
        self.fingerprint = job_fingerprint(
            self.source, settings, self.index.rows.identity, self.index.sorted_digests()
        )
        self.digest = job_digest(self.fingerprint)
        for role, lock in self._locks.items():
            lock.acquire(role)
        check = ResumeCheck(
            self.output, self.errors_path, self._fp, self.policy, self.fingerprint, self.index,
            self.source, settings.order,
        )  # fmt: skip
        self._scan = check.scan()
        self.input_note = check.input_note
        self._check_errors_file()
        check_writable(self._written_files(), self._rewritten_files())

    def _check_errors_file(self) -> None:
        """A resume rebuilds the errors file from the input and the output: refuse one
        holding a line edited by hand (the rebuild would drop the edit)."""
        if self.errors_path is None or not self.policy.resuming:
            return
        written = {
            canonical(rid): canonical(loads(encode_line(self._quarantine_line(rid, error))))
            for rid, error in self._scan.errors.items()
            if self.index.find(rid) is not None
        }
        n = edited_line(self.errors_path, written, (self.settings.id_field, "custom_id"))
        if n is not None:
            raise GuardError(
                f"{self.errors_path}: line {n} is not the line written for its record (edited "
                "by hand?), and a resume rebuilds this file from the input and the output, "
                "dropping the edit: run the edited file as an input of its own, or move it "
                "away first"
            )

    @property
    def batch(self) -> bool:
        """The input is an OpenAI batch file."""
        return self.index.batch

    def close(self) -> None:
        """Let the output's lock go (the files stay as they are) and close the input."""
        for lock in self._locks.values():
            lock.release()
        if hasattr(self, "index"):
            self.index.rows.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _fp(self) -> Path:
        return fingerprint_path(self.output)

    def _appended_files(self) -> list[tuple[str, Path]]:
        """(role, path) of the files lines are appended to: each is locked."""
        files = [("output", self.output)]
        return files if self.errors_path is None else [*files, ("errors file", self.errors_path)]

    def _written_files(self) -> list[Path]:
        files = [path for _, path in self._appended_files()] + [self._fp]
        if self.settings.engine.memory_report:
            files += report_paths(self.output)
        return files

    def _rewritten_files(self) -> list[Path]:
        """The files `run` writes whole (atomic_write: staged beside, renamed over)."""
        files = [] if load_fingerprint(self._fp) == self.fingerprint else [self._fp]
        if self.errors_path is not None:
            files.append(self.errors_path)  # rebuilt from the output
        if self.policy.retry_errors and self._scan.errors:
            files.append(self.output)  # its error lines dropped
        return files

    def _roles(self) -> list[tuple[str, Path]]:
        """(role, path) of every file the job writes, for `check_paths`."""
        roles = [*self._appended_files(), ("fingerprint", self._fp)]
        roles += [(f"{role}'s lock file", lock.path) for role, lock in self._locks.items()]
        if self.settings.engine.memory_report:
            json_path, png_path = report_paths(self.output)
            roles += [("memory report", json_path), ("memory chart", png_path)]
        summary = self.settings.summary_json
        if summary is not None and str(summary) != "-":
            roles.append(("summary file", summary))
        return roles

    def run(
        self,
        llm: Generator | None,
        *,
        should_stop: ShouldStop = lambda: False,
        on_output: OnOutput | None = None,
        on_step: OnStep | None = None,
        on_prepared: OnPrepared | None = None,
    ) -> JobResult:
        """Make the files ready, then run every record still to do (`llm` may be None when
        there is none); returns what was written. The callbacks are `Generator.generate`'s,
        `on_prepared` counting the records to do of this run. A write error (a full disk) is raised,
        with every line before it whole on disk. The rates the run reached are stored in
        the cache dir (job/rates.py)."""
        self._prepare_files()
        result = JobResult(skipped=self.skipped, skipped_errors=self.skipped_errors.copy())
        with self._open_writers() as (out, quarantine):

            def write(output: RequestOutput) -> None:
                out.write_line(self._line(output))
                if output.error is not None and quarantine is not None:
                    error = output.error.to_json()
                    quarantine.write_line(self._quarantine_line(output.id, error))
                result.codes[output.error.code if output.error else "ok"] += 1
                result.incomplete += any(c.incomplete for c in output.completions)
                if on_output is not None:
                    on_output(output)

            def step(stats: EngineStats) -> None:
                for writer in self._writers:
                    writer.sync_if_due()
                if on_step is not None:
                    on_step(stats)

            if self.todo and not should_stop():
                if llm is None:
                    raise ValueError("Job.run: records are left to run, and llm is None")
                self._generate(llm, write, step, should_stop, on_prepared)
                store_run_rates(self.settings.engine, llm.stats())  # for `pagedbatch plan`
        result.not_run = len(self.todo) - result.written
        return result

    def abandon(self) -> None:
        """Close the files at once, each ending on a whole line (for a second Ctrl-C)."""
        for writer in self._writers:
            writer.abandon()

    def _generate(
        self, llm: Generator, write: OnOutput, step: OnStep, should_stop: ShouldStop,
        on_prepared: OnPrepared | None,
    ) -> None:  # fmt: skip
        sampling = self.settings.sampling
        total = len(self.todo)
        if self.settings.order == "completion":
            llm.generate(
                self.todo, sampling, on_output=write, on_step=step, should_stop=should_stop,
                on_prepared=on_prepared
                and (lambda done, _, most: on_prepared(done, total, most)),
                keep_outputs=False,  # each is written as it finishes
                fit_pool=True,  # one call: a CPU default pool sized from the job
            )  # fmt: skip
            return
        # On a stop, outputs held behind an unfinished record are dropped: the file stays
        # a prefix of the sequential run's, and a resume completes it exactly.
        window = max(MIN_WINDOW, WINDOW_PER_SEQ * llm.config.max_num_seqs)
        for start in range(0, len(self.todo), window):
            chunk = self.todo[start : start + window]
            in_order = _InputOrder(chunk, write)
            llm.generate(
                chunk, sampling, on_output=in_order, on_step=step, should_stop=should_stop,
                on_prepared=on_prepared
                and (lambda done, _, most, s=start: on_prepared(s + done, total, most)),
                keep_outputs=False,
            )  # fmt: skip
            if should_stop():
                return

    def _prepare_files(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if not self.policy.resuming:
            self.output.write_bytes(b"")
        else:
            cut_torn_line(self.output, self._scan)
            if self.policy.retry_errors and self._scan.errors:
                drop_error_lines(self.output, self._scan)
        path = self._fp
        if load_fingerprint(path) != self.fingerprint:
            save_fingerprint(path, self.fingerprint)
        if self.errors_path is not None:
            self._rebuild_quarantine(self.errors_path)

    def _rebuild_quarantine(self, path: Path) -> None:
        """The errors file holds exactly the failed records of the output, as input lines."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            for rid, error in self._scan.errors.items():
                if self.index.find(rid) is not None:
                    f.write(encode_line(self._quarantine_line(rid, error)))

    @contextlib.contextmanager
    def _open_writers(self) -> Iterator[tuple[OutputWriter, OutputWriter | None]]:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(OutputWriter(self.output))
            quarantine = None
            if self.errors_path is not None:
                quarantine = stack.enter_context(OutputWriter(self.errors_path))
            self._writers = [w for w in (out, quarantine) if w is not None]
            yield out, quarantine

    def _line(self, output: RequestOutput) -> dict[str, Any]:
        if not self.batch:
            return output.to_json()
        k = self.index.find(output.id)
        endpoint = (self.index.record(k).endpoint if k is not None else None) or ""
        return batch_output_line(
            output, endpoint, self.settings.engine.model, self.digest, self._created
        )

    def _quarantine_line(self, rid: Any, error: Mapping[str, Any]) -> dict[str, Any]:
        """The failed record's input line, its id made explicit, with the error added."""
        k = self.index.find(rid)
        assert k is not None, rid  # only records of the input fail
        record = self.index.record(k)
        line = dict(record.source or {})
        line.setdefault("custom_id" if record.endpoint is not None else self.settings.id_field, rid)
        line[QUARANTINE_KEY] = RecordError(error.get("code"), error.get("message")).to_json()
        return line


class _InputOrder:
    """Passes outputs on in the order of `records`, holding those that finish early."""

    def __init__(self, records: Iterable[Record], write: OnOutput) -> None:
        self._position = {r.id: i for i, r in enumerate(records)}
        self._held: dict[int, RequestOutput] = {}
        self._next = 0
        self._write = write

    def __call__(self, output: RequestOutput) -> None:
        self._held[self._position[output.id]] = output
        while self._next in self._held:
            self._write(self._held.pop(self._next))
            self._next += 1
