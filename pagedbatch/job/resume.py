"""May a job write to its output, as its policy says? And what does the output hold?

`ResumeCheck(...).scan()` reads the output (as keys: output_scan.py) and refuses, with a
one-line JobError that says what to do, an output that holds lines when not resuming, an
output that holds a record twice, an errors file that is not one (a resume rebuilds it),
or an output written by another job (the stored fingerprint differs), except for an input
that only gained records the output does not hold yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pagedbatch.inputs.record_index import RecordIndex
from pagedbatch.job.fingerprint import Fingerprint, changes, load_fingerprint, record_changes
from pagedbatch.job.output_scan import (
    OutputFileError,
    OutputScan,
    check_errors_file,
    output_ids,
    scan_output,
)
from pagedbatch.sampling_params import short_repr

_NAMED_IDS = 5  # ids named in a message, before "and N more"


class JobError(Exception):
    """A job that cannot start as asked; `str()` is one line saying what to do."""


@dataclass(frozen=True)
class ResumePolicy:
    """What to do with an output file that already holds lines."""

    resume: bool = False  # skip the records it holds, run the rest
    overwrite: bool = False  # start over
    force: bool = False  # resume although the stored fingerprint differs (or is missing)
    retry_errors: bool = False  # resume, and run again the records whose line is an error

    def __post_init__(self) -> None:
        if self.overwrite and (self.resume or self.retry_errors):
            raise ValueError("--overwrite starts over; it does not go with --resume")
        if self.force and not (self.resume or self.retry_errors):
            raise ValueError("--force only applies to --resume")

    @property
    def resuming(self) -> bool:
        return self.resume or self.retry_errors


@dataclass
class ResumeCheck:
    """The job's side of the check: its files, policy, fingerprint and records."""

    output: Path
    errors_path: Path | None
    fingerprint_path: Path
    policy: ResumePolicy
    fingerprint: Fingerprint
    index: RecordIndex
    source: str
    order: str  # "completion" or "input"
    input_note: str | None = None  # what a resume accepted of a changed input

    def scan(self) -> OutputScan:
        """The output's lines when resuming (empty when not); raises JobError when the
        policy forbids the run. Sets `input_note` when a changed input is accepted."""
        try:
            scan = scan_output(self.output)
        except OutputFileError as e:
            raise JobError(str(e)) from None
        except OSError as e:
            raise JobError(f"{self.output}: cannot read the output ({e.strerror or e})") from None
        if not self.policy.resuming:
            self._refuse_to_overwrite(scan)
            return OutputScan()
        try:
            if self.errors_path is not None:
                check_errors_file(self.errors_path)
        except OutputFileError as e:
            raise JobError(str(e)) from None
        except OSError as e:
            raise JobError(f"{self.errors_path}: cannot read it ({e.strerror or e})") from None
        if scan.duplicates:
            raise JobError(self._duplicates_problem(scan))
        if scan.empty or self.policy.force:
            return scan
        stored = load_fingerprint(self.fingerprint_path)
        if stored is None:
            raise JobError(
                f"{self.output} has no job fingerprint beside it ({self.fingerprint_path}),"
                " so this cannot be checked to be the same job; pass --force to resume anyway"
            )
        if not stored:
            raise JobError(
                f"{self.fingerprint_path} is unreadable (not a pagedbatch job fingerprint), so "
                f"{self.output} cannot be checked to be this job's; pass --force to resume "
                "anyway (a new fingerprint is written), or --overwrite to start over"
            )
        diff = changes(stored, self.fingerprint)
        if diff == [d for d in diff if d.startswith("input ")] and diff:
            self._check_changed_input(stored, scan)
        elif diff:
            raise JobError(
                f"{self.output} was written by a different job: {'; '.join(diff)}. Resume with "
                "the same settings and input, pass --force to resume anyway, or --overwrite "
                "to start over"
            )
        return scan

    def _check_changed_input(self, stored: Mapping[str, Any], scan: OutputScan) -> None:
        """Accept an input that changed only by records the output does not hold yet (new
        ones, or ones not run yet); else raise JobError naming the records that changed."""
        done = scan.ok if self.policy.retry_errors else scan.done
        held = (rid for rid in output_ids(self.output) if rid in done)
        found = record_changes(stored, self._digest_of, held)
        if found is None:
            raise JobError(
                f"{self.output} was written by a different job: input changed, and its "
                f"fingerprint ({self.fingerprint_path}) predates per-record digests, so the "
                "records that changed cannot be told; pass --force to resume anyway, or "
                "--overwrite to start over"
            )
        changed, removed = found
        if changed or removed:
            what = []
            if changed:
                what.append(f"{_count(changed)} it holds changed ({_ids(changed)})")
            if removed:
                are = "is" if len(removed) == 1 else "are"
                what.append(f"{_count(removed)} it holds {are} gone from it ({_ids(removed)})")
            raise JobError(
                f"{self.output} was written from another version of {self.source}: "
                f"{' and '.join(what)}; restore them, pass --force to keep the old lines "
                "anyway, or --overwrite to start over"
            )
        flags = done.contains(self.index.keys())
        if self.order == "input" and not _done_first(flags):
            raise JobError(
                f"{self.source} has new records before records {self.output} holds; with "
                "--order input new records must come after them (or pass --force, or "
                "--overwrite to start over)"
            )
        self.input_note = (
            f"{self.source} changed since {self.output} was started, but none of the "
            f"{len(done)} records it holds did: {int((~flags).sum())} to run"
        )

    def _digest_of(self, rid: Any) -> bytes | None:
        k = self.index.find(rid)
        return None if k is None else self.index.digest(k)

    def _duplicates_problem(self, scan: OutputScan) -> str:
        shown = ", ".join(
            f"{short_repr(rid)} on lines {a} and {b}" for rid, a, b in scan.duplicates[:3]
        )
        more = scan.duplicate_count - len(scan.duplicates[:3])
        return (
            f"{self.output} holds a record more than once ({shown}"
            f"{f', and {more} more' if more > 0 else ''}), so it cannot be resumed as it is: "
            "keep one line of each id (or start over with --overwrite)"
        )

    def _refuse_to_overwrite(self, scan: OutputScan) -> None:
        if self.policy.overwrite:
            return
        files = [self.output] if not scan.empty else []
        if self.errors_path is not None and _non_empty(self.errors_path):
            files.append(self.errors_path)
        if files:
            names = " and ".join(str(f) for f in files)
            raise JobError(
                f"{names} already exist{'s' if len(files) == 1 else ''} "
                f"({len(scan.done)} records done); pass --resume to continue that job "
                "(--retry-errors also re-runs its errors), or --overwrite to start over"
            )


def _done_first(flags: np.ndarray) -> bool:
    """Whether the records flagged come before every other record of the input."""
    return not (np.diff(flags.astype(np.int8)) > 0).any()


def _count(ids: list[Any]) -> str:
    return "1 record" if len(ids) == 1 else f"{len(ids)} records"


def _ids(ids: list[Any]) -> str:
    """The first few ids, as a user reads them."""
    shown = ", ".join(short_repr(i) for i in ids[:_NAMED_IDS])
    return shown + (f", and {len(ids) - _NAMED_IDS} more" if len(ids) > _NAMED_IDS else "")


def _non_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False
