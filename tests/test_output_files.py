"""Crash-safe output files: whole lines, fsync, torn last lines, error lines to retry."""

from __future__ import annotations

import errno
import json
import os

import pytest

from pagedbatch.inputs.id_keys import IdSet
from pagedbatch.job.output_scan import (
    OutputFileError,
    cut_torn_line,
    drop_error_lines,
    scan_output,
)
from pagedbatch.job.output_writer import OutputWriter, encode_line

OK = b'{"id": "a", "choices": []}\n'
ERR = b'{"id": 2, "error": {"code": "invalid_params", "message": "bad"}}\n'
BATCH_OK = b'{"id": "batch_req_1", "custom_id": "c1", "response": {}, "error": null}\n'
BATCH_ERR = b'{"id": "batch_req_2", "custom_id": "c2", "response": null, "error": {"code": "x"}}\n'


def test_writer_counts_fsyncs_on_its_interval_and_at_close(tmp_path, monkeypatch):
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd)))
    path = tmp_path / "out.jsonl"
    with OutputWriter(path, sync_interval=3600) as writer:
        writer.write_line({"id": 1})
        writer.write_line({"id": 2})
        writer.sync_if_due()
        assert syncs == []  # not due yet
        writer.sync_interval = 0
        writer.sync_if_due()
        assert len(syncs) == 1
    assert len(syncs) == 2  # and at close
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'


def test_a_failed_write_is_cut_back_off_the_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    real_write = os.write
    with OutputWriter(path) as writer:
        writer.write_line({"id": 1})

        def half_then_full_disk(fd, data):
            if len(data) > 4:
                return real_write(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_full_disk)
        with pytest.raises(OSError, match="No space"):
            writer.write_line({"id": 2, "text": "x" * 100})
        monkeypatch.setattr(os, "write", real_write)
        writer.write_line({"id": 3})
    assert path.read_bytes() == b'{"id": 1}\n{"id": 3}\n'


def test_abandon_cuts_a_line_being_written(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.write_line({"id": 1})
    with path.open("ab") as f:  # as if a signal arrived in the middle of a line
        f.write(b'{"id": 2, "te')
    writer.abandon()
    assert path.read_bytes() == b'{"id": 1}\n'
    writer.abandon()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        writer.write_line({"id": 3})


def test_lines_keep_unicode_and_escape_what_utf8_cannot_hold():
    assert encode_line({"t": "caf\u00e9"}) == '{"t": "café"}\n'.encode()
    line = encode_line({"t": "\ud800"})  # a lone surrogate from a JSON escape in the input
    assert line == b'{"t": "\\ud800"}\n' and json.loads(line) == {"t": "\ud800"}


def test_scan_reads_plain_and_batch_lines_and_spots_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    assert scan_output(path).empty  # no file yet
    path.write_bytes(OK + ERR + BATCH_OK + BATCH_ERR + b'{"id": "to')
    scan = scan_output(path)
    assert scan.ok == IdSet.of({"a", "c1"}) and set(scan.errors) == {2, "c2"}
    assert scan.errors[2] == {"code": "invalid_params", "message": "bad"}
    assert scan.torn and scan.size == len(OK + ERR + BATCH_OK + BATCH_ERR)
    cut_torn_line(path, scan)
    assert path.read_bytes() == OK + ERR + BATCH_OK + BATCH_ERR and not scan.torn
    # A whole JSON object without its newline is still a torn write: it is dropped too.
    path.write_bytes(OK + OK.rstrip(b"\n"))
    assert scan_output(path).torn
    for start in (b"{", b'{"id"', b'{"id": 1'):  # every start of a line pagedbatch writes
        path.write_bytes(OK + start)
        assert scan_output(path).torn
    path.write_bytes(OK + b"a file of another program, without a newline")
    with pytest.raises(OutputFileError, match="line 2 .the last, without a newline. is not the"):
        scan_output(path)


def test_a_later_ok_line_wins_over_an_earlier_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(
        ERR
        + ERR.replace(b'"error": {"code": "invalid_params", "message": "bad"}', b'"choices": []')
    )
    scan = scan_output(path)
    assert scan.ok == IdSet.of({2}) and scan.errors == {} and scan.done == IdSet.of({2})


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"no_id": 1}\n', b'{"id": 1.5}\n'])
def test_a_line_pagedbatch_did_not_write_is_refused(tmp_path, line):
    path = tmp_path / "out.jsonl"
    path.write_bytes(OK + line + OK)
    with pytest.raises(OutputFileError, match=r"line 2 is not a pagedbatch output line"):
        scan_output(path)


def test_drop_error_lines_keeps_the_rest_in_order(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(ERR + OK + BATCH_ERR + BATCH_OK)
    scan = scan_output(path)
    drop_error_lines(path, scan)
    assert path.read_bytes() == OK + BATCH_OK
    assert scan.errors == {} and scan.size == len(OK + BATCH_OK)
    assert not (tmp_path / "out.jsonl.tmp").exists()
