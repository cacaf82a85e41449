"""Jobs that survive: resume, fingerprints, retrying errors, quarantine, input order."""

from __future__ import annotations

import json
import re

import pytest
from job_helpers import (
    by_id,
    invoke,
    one_line_error,
    prompts,
    read_lines,
    tiny_args,
    write_jsonl,
)

from pagedbatch import LLM, SamplingParams
from pagedbatch.job.output_writer import encode_line
from pagedbatch.requests.prompts import PromptBuilder

BAD = [
    {"id": "bad-params", "prompt": "x", "max_tokens": -1},
    {"id": "bad-record", "prompt": 5},
]


@pytest.fixture
def job(tmp_path, tiny_model_dirs):
    """An input of 12 good and 2 bad records, and the flags of a tiny-model job on it."""
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6) + BAD + prompts(12)[6:])
    return src, tmp_path / "out.jsonl", tiny_args(tiny_model_dirs["llama"])


def test_an_existing_output_is_refused_unless_resumed_or_overwritten(job):
    src, out, flags = job
    assert invoke(src, "-o", out, *flags).exit_code == 0
    before = out.read_bytes()
    error = one_line_error(invoke(src, "-o", out, *flags))
    assert f"{out} already exists (14 records done)" in error
    assert "--resume" in error and "--overwrite" in error
    assert out.read_bytes() == before
    result = invoke(src, "-o", out, *flags, "--overwrite")
    assert result.exit_code == 0 and "Wrote 14 records" in result.stderr
    assert by_id(read_lines(out)) == by_id([json.loads(x) for x in before.splitlines()])
    error = one_line_error(invoke(src, "-o", out, *flags, "--overwrite", "--resume"))
    assert "--overwrite starts over; it does not go with --resume" in error
    result = invoke(src, "-o", out, *flags, "--resume")
    assert result.exit_code == 0, result.output
    assert "Nothing to do: all 14 records are already in" in result.stderr


def test_resume_runs_only_what_is_missing_and_samples_the_same_text(job):
    src, out, flags = job
    flags = [*flags, "--temperature", "1.0", "--top-k", "20"]
    assert invoke(src, "-o", out, *flags).exit_code == 0
    full = read_lines(out)
    # Keep 5 whole lines and half of the 6th, as a process killed mid-write leaves them.
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    result = invoke(src, "-o", out, *flags, "--resume")
    assert result.exit_code == 0, result.output
    assert re.search(r"Wrote 9 records .*; skipped 5 already done", result.stderr)
    assert read_lines(out)[:5] == full[:5]
    assert by_id(read_lines(out)) == by_id(full)  # job seed + id: the same samples


def test_resume_refuses_another_job_unless_forced(job, tmp_path):
    src, out, flags = job
    assert invoke(src, "-o", out, *flags).exit_code == 0
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume", "--max-tokens", "6"))
    assert f"{out} was written by a different job: max_tokens (8 -> 6)" in error
    assert "--force" in error and "--overwrite" in error
    write_jsonl(src, prompts(13))  # the same name: two records gone, one new
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume"))
    assert f"{out} was written from another version of {src}: 2 records it holds are gone" in error
    assert "('bad-params', 'bad-record')" in error and "--force" in error
    result = invoke(src, "-o", out, *flags, "--resume", "--force")
    assert result.exit_code == 0 and "skipped 12 already done" in result.stderr
    # The fingerprint now describes the forced job: resuming it needs no --force.
    assert invoke(src, "-o", out, *flags, "--resume").exit_code == 0
    (tmp_path / "out.jsonl.job.json").unlink()
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume"))
    assert "has no job fingerprint beside it" in error and "--force" in error


def test_a_changed_input_names_the_records_that_changed_and_runs_new_ones(job):
    src, out, flags = job
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    write_jsonl(src, rows[:10])
    assert invoke(src, "-o", out, *flags).exit_code == 0
    before = out.read_bytes()
    changed = [{**rows[0], "prompt": "another"}, *rows[1:3], {**rows[3], "top_k": 2}, *rows[4:]]
    write_jsonl(src, changed)
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume"))
    assert "2 records it holds changed ('r000', 'r003')" in error and "--force" in error
    assert out.read_bytes() == before
    write_jsonl(src, rows)  # 4 records appended (a job that grows): they run, nothing else
    result = invoke(src, "-o", out, *flags, "--resume")
    assert result.exit_code == 0, result.output
    assert "none of the 10 records it holds did: 4 to run" in result.stderr
    assert out.read_bytes().startswith(before) and len(by_id(read_lines(out))) == 14
    ordered = out.with_name("ordered.jsonl")
    assert invoke(src, "-o", ordered, *flags, "--order", "input").exit_code == 0
    write_jsonl(src, rows[:5] + [{"id": "new", "prompt": "a new one"}] + rows[5:])
    error = one_line_error(invoke(src, "-o", ordered, *flags, "--resume", "--order", "input"))
    assert "has new records before records" in error  # the file would leave input order
    result = invoke(src, "-o", out, *flags, "--resume")  # in completion order: fine
    assert result.exit_code == 0 and "Wrote 1 record to" in result.stderr, result.output


def test_retry_errors_reruns_only_the_error_lines(job, monkeypatch):
    src, out, flags = job
    tokenize = PromptBuilder.token_ids_batch

    def flaky(self, records):  # the tokenizer failing on one record's text
        ids = tokenize(self, records)
        return [
            RuntimeError("tokenizer crashed") if r.id == "r003" else i for r, i in zip(records, ids)
        ]

    monkeypatch.setattr(PromptBuilder, "token_ids_batch", flaky)
    result = invoke(src, "-o", out, *flags)
    assert re.search(
        r"11 ok, 3 failed: 1 engine_error, 1 invalid_params, 1 invalid_record", result.stderr
    )
    assert by_id(read_lines(out))["r003"]["error"] == {
        "code": "engine_error",
        "message": "tokenizing failed: RuntimeError: tokenizer crashed",
    }
    monkeypatch.setattr(PromptBuilder, "token_ids_batch", tokenize)
    result = invoke(src, "-o", out, *flags, "--retry-errors")
    assert result.exit_code == 0, result.output
    assert "Wrote 3 records" in result.stderr and "skipped 11 already done" in result.stderr
    lines = by_id(read_lines(out))
    assert len(lines) == 14 and "choices" in lines["r003"]
    assert lines["bad-params"]["error"]["code"] == "invalid_params"  # failed again, once


def test_errors_file_holds_failed_inputs_that_feed_back(job, tmp_path):
    src, out, flags = job
    errors = tmp_path / "failed.jsonl"
    assert invoke(src, "-o", out, *flags, "--errors", errors).exit_code == 0
    quarantined = read_lines(errors)
    params_error = {"code": "invalid_params", "message": "max_tokens must be >= 1, got -1"}
    record_error = {"code": "invalid_record", "message": "'prompt' must be a string, got int"}
    assert quarantined == [
        {**BAD[0], "pagedbatch_error": params_error},
        {**BAD[1], "pagedbatch_error": record_error},
    ]
    # A resume rebuilds it from the output: each failed record once.
    assert invoke(src, "-o", out, *flags, "--errors", errors, "--resume").exit_code == 0
    assert read_lines(errors) == quarantined
    # Fed back as input (fixed or not), the ids are the original ones.
    result = invoke(errors, "-o", tmp_path / "again.jsonl", *flags)
    assert result.exit_code == 0, result.output
    assert set(by_id(read_lines(tmp_path / "again.jsonl"))) == {"bad-params", "bad-record"}


def test_an_errors_file_edited_by_hand_is_not_rebuilt_over_the_edit(job, tmp_path):
    """--retry-errors (and --resume) rebuild the errors file from the input and the output:
    a line fixed by hand that keeps its pagedbatch_error used to be dropped silently."""
    src, out, flags = job
    errors = tmp_path / "failed.jsonl"
    assert invoke(src, "-o", out, *flags, "--errors", errors).exit_code == 0
    lines = read_lines(errors)
    lines[0]["max_tokens"] = 4  # fixed, its error kept
    write_jsonl(errors, lines)
    edited = errors.read_bytes()
    for again in ("--retry-errors", "--resume"):
        error = one_line_error(invoke(src, "-o", out, *flags, "--errors", errors, again))
        assert f"{errors}: line 1 is not the line written for its record (edited by hand?)" in error
        assert errors.read_bytes() == edited
    result = invoke(src, "-o", out, *flags, "--errors", errors, "--overwrite")  # start over
    assert result.exit_code == 0, result.output


def test_errors_file_of_lines_without_ids_names_the_line_number(tmp_path, tiny_model_dirs):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "fine"}\n[1, 2]\n{"prompt": "also fine"}\n')
    errors = tmp_path / "failed.jsonl"
    flags = tiny_args(tiny_model_dirs["llama"], "--skip-invalid", "--errors", errors)
    result = invoke(src, "-o", tmp_path / "out.jsonl", *flags)
    assert result.exit_code == 0, result.output
    assert read_lines(errors) == [
        {
            "raw_line": "[1, 2]",
            "id": 2,
            "pagedbatch_error": {
                "code": "invalid_record",
                "message": "line 2: expected a JSON object, got array",
            },
        }
    ]


def test_order_input_writes_the_lines_of_a_sequential_run(job, tiny_model_dirs, monkeypatch):
    src, out, flags = job
    monkeypatch.setattr("pagedbatch.job.job.MIN_WINDOW", 5)  # several windows of 5 records
    flags = [*flags, "--temperature", "0.8", "--max-num-seqs", "4"]
    result = invoke(src, "-o", out, *flags, "--order", "input")
    assert result.exit_code == 0, result.output
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=0)
    records = [json.loads(line) for line in src.read_text().splitlines()]
    sequential = [llm.generate([r], params)[0].to_json() for r in records]
    assert out.read_bytes() == b"".join(encode_line(line) for line in sequential)


def test_an_output_is_resumed_in_the_order_it_was_started_in(job):
    """--order is in the fingerprint: a completion-order file resumed with --order input
    (or back) would be in neither order."""
    src, out, flags = job
    assert invoke(src, "-o", out, *flags).exit_code == 0
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume", "--order", "input"))
    assert 'was written by a different job: order ("completion" -> "input")' in error
    result = invoke(src, "-o", out, *flags, "--resume", "--order", "completion")
    assert result.exit_code == 0 and "Nothing to do" in result.stderr, result.output
    assert invoke(src, "-o", out, *flags, "--overwrite", "--order", "input").exit_code == 0
    error = one_line_error(invoke(src, "-o", out, *flags, "--resume"))
    assert 'order ("input" -> "completion")' in error
    stored = json.loads(out.with_name(out.name + ".job.json").read_text())
    assert stored["order"] == "input"
