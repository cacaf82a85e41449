"""The streaming job pipeline: jobs bigger than one read batch, read again while they run."""

from __future__ import annotations

import hashlib
import json

import pytest
from job_helpers import (
    by_id,
    invoke,
    read_lines,
    start,
    tiny_args,
    wait_for_lines,
    write_jsonl,
)  # fmt: skip

from pagedbatch.inputs.reader import InputError, read_index, read_records
from pagedbatch.inputs.rows import BATCH_ROWS
from pagedbatch.job.output_scan import scan_output

N = BATCH_ROWS * 2 + 100  # three read batches


def rows(n: int = N) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"w{i % 7} item {i}"} for i in range(n)]


def test_errors_early_in_a_big_job_keep_every_record_in_place(tmp_path, tiny_model_dirs):
    """Error lines (and their --errors copies, read again from the input) are written while
    the input is still being read: each reader keeps its own place in the file."""
    data = rows()
    data[5] = {"id": "r5", "prompt": "x", "temperature": -1}  # invalid_params, batch one
    data[BATCH_ROWS + 3] = {"id": f"r{BATCH_ROWS + 3}"}  # no prompt: invalid_record
    src = write_jsonl(tmp_path / "in.jsonl", data)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--max-tokens", "1", "--num-blocks", "256")
    result = invoke(src, "-o", out, "--errors", errors, *args)
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(out))
    assert set(lines) == {row["id"] for row in data}
    failed = {rid for rid, line in lines.items() if "error" in line}
    assert failed == {"r5", f"r{BATCH_ROWS + 3}"}
    quarantined = read_lines(errors)
    assert [{k: v for k, v in q.items() if k != "pagedbatch_error"} for q in quarantined] == [
        data[5],
        data[BATCH_ROWS + 3],
    ]


def test_a_big_job_equals_the_same_records_run_in_one_list(tmp_path, tiny_model_dirs):
    """A job read from its file in batches, sorted and admitted a window at a time, writes
    what `LLM.generate` gives for the records as one list."""
    from pagedbatch import LLM, SamplingParams

    data = rows(1500)
    src = write_jsonl(tmp_path / "in.jsonl", data)
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["qwen2"], "--max-tokens", "3"))
    assert result.exit_code == 0, result.output
    llm = LLM(str(tiny_model_dirs["qwen2"]), device="cpu", dtype="float32", num_blocks=64)
    expected = {o.id: o.text for o in llm.generate(data, SamplingParams(max_tokens=3))}
    assert {rid: line["choices"][0]["text"] for rid, line in by_id(read_lines(out)).items()} == (
        expected
    )


def test_an_input_changed_in_place_while_the_job_runs_is_one_line(tmp_path, tiny_model_dirs):
    """Records are read again as they are admitted: an input another process appends to
    meanwhile stops the job with one line (exit 1), every line written before it whole."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(3000))
    out = tmp_path / "out.jsonl"
    job = start([src, "-o", out, *tiny_args(tiny_model_dirs["llama"])], tmp_path)
    wait_for_lines(out, 1, job)
    with src.open("a") as f:
        f.write(json.dumps({"id": "late", "prompt": "added"}) + "\n")
    _, stderr = job.communicate(timeout=600)  # a hang guard only
    assert job.returncode == 1, stderr
    message = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and message.startswith("error: ")
    assert "changed while the job ran" in message and "the lines before are safe" in message
    assert 0 < len(by_id(read_lines(out))) < 3000


def test_datasets_are_read_in_batches_and_again_by_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = rows(BATCH_ROWS + 10)
    datasets.Dataset.from_list(data).save_to_disk(str(tmp_path / "ds"))
    index = read_index(str(tmp_path / "ds"))
    assert len(index) == len(data) and index.rows.unit == "row"
    assert [r.prompt for r in index.records()] == [row["prompt"] for row in data]
    assert index.record(BATCH_ROWS + 5).id == f"r{BATCH_ROWS + 5}"
    assert index.find(f"r{BATCH_ROWS + 5}") == BATCH_ROWS + 5 and index.find("nope") is None


def test_a_duplicate_id_far_apart_is_named_with_both_lines(tmp_path):
    data = rows()
    data[-1] = {"id": "r7", "prompt": "again"}
    src = write_jsonl(tmp_path / "in.jsonl", data)
    with pytest.raises(InputError, match=rf"line {N}: duplicate id 'r7' \(first on line 8\)"):
        read_records(src)


def test_resume_scan_keeps_keys_and_names_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [{"id": f"r{i}", "choices": []} for i in range(N)] + [{"id": "r9", "choices": []}]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    scan = scan_output(out)
    assert scan.lines == N + 1 and len(scan.ok) == N and "r9" in scan.ok and "r" not in scan.ok
    assert scan.duplicates == [("r9", 10, N + 1)] and scan.duplicate_count == 1


def test_the_input_is_hashed_as_read(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows())
    index = read_index(src)
    data = src.read_bytes()  # what the reader read, hashed here on its own
    h = hashlib.blake2b(b"split:None", digest_size=8)
    h.update(f"{len(data)}\0".encode() + data)
    assert index.rows.identity == h.hexdigest()
