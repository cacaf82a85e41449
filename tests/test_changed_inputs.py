"""An input changed under a running job: no line's text ever comes from another record.

A job reads its input once (keeping a digest of every record), then reads each record
again to tokenize and to admit it. Each test changes the input while a real job runs,
then checks that the job stopped with one line (or never saw the change), that every
line it wrote is the line of its own id's record as first read, and that the printed
resume command completes the output.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from job_helpers import by_id, read_lines, write_jsonl

from pagedbatch.inputs.reader import read_index

JOB = [
    "--device", "cpu", "--dtype", "float32", "--num-blocks", "64", "--max-tokens", "6",
    "--max-num-seqs", "1",
    "--threads", "1", "--no-progress",
]  # fmt: skip
ANIMALS = ["cat", "dog", "owl", "fox", "cow", "pig", "rat", "bee"]


def poems(n: int) -> list[dict]:
    return [
        {
            "id": f"r{i:03d}",
            "prompt": f"Here is a short poem about a {ANIMALS[i % 8]}, number {i:03d}:",
        }
        for i in range(n)
    ]


def untimed(lines: list[dict]) -> dict:
    """id -> line (every id once), without the prompt tokens found cached (they depend on
    which records ran before)."""
    for line in lines:
        line.get("usage", {}).pop("cached_tokens", None)
    return by_id(lines)


def one_line(code: int, stderr: str, expected: int) -> str:
    assert code == expected, stderr
    text = stderr.strip()
    assert "Traceback" not in text and "\n" not in text and text.startswith("error: "), text
    return text


def resumed(stderr: str) -> list[str]:
    """The printed resume command's arguments, from `run` on."""
    command = stderr.split("Resume with:", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["pagedbatch", "run"] and words[-1] == "--resume", command
    return words[1:]


def swap_pairs(data: bytes) -> bytes:
    """Lines 2i and 2i+1 swapped: the same records, each at the other's offset."""
    lines = data.split(b"\n")[:-1]
    return b"".join(lines[i + 1] + b"\n" + lines[i] + b"\n" for i in range(0, len(lines), 2))


def with_max_tokens(records: list[dict]) -> list[dict]:
    return [{**r, "max_tokens": 30} if i >= 90 else r for i, r in enumerate(records)]


# (records, the in-place edit (same size), flags): the three reproductions.
EDITS = {
    "lines swapped": (poems(100), swap_pairs, []),
    # Admitted in input order, so the edited records are read again after the edit.
    "max_tokens 30 to -3": (
        with_max_tokens(poems(100)),
        lambda data: data.replace(b'"max_tokens": 30', b'"max_tokens": -3'),
        ["--no-prefix-sharing"],
    ),
    "ids renamed, --order input": (
        poems(100),
        lambda data: data.replace(b'"id": "r08', b'"id": "q08'),
        ["--order", "input"],
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_jsonl_input_rewritten_in_place_stops_the_job_with_one_line_and_resumes(
    forked, tiny_model_dirs, tmp_path, edit
):
    records, change, flags = EDITS[edit]
    data = write_jsonl(tmp_path / "in.jsonl", records).read_bytes()
    edited = change(data)
    assert edited != data and len(edited) == len(data)
    (tmp_path / "edited.jsonl").write_bytes(edited)
    job = ["-m", tiny_model_dirs["llama"], *JOB, *flags]
    for name, out in (("in.jsonl", "ref.jsonl"), ("edited.jsonl", "ref2.jsonl")):
        code, stderr = forked.run(["run", name, "-o", out, *job], tmp_path)
        assert code == 0, stderr
    ref, ref2 = (untimed(read_lines(tmp_path / f)) for f in ("ref.jsonl", "ref2.jsonl"))
    out = tmp_path / "out.jsonl"
    child = forked.start(["run", "in.jsonl", "-o", out.name, *job], tmp_path)
    assert child.poll_lines(out, 3)
    with (tmp_path / "in.jsonl").open("r+b") as f:
        f.write(edited)
    code, stderr = child.wait()
    error = one_line(code, stderr, expected=1)
    assert "in.jsonl: changed while the job ran" in error and "the lines before are safe" in error
    written = untimed(read_lines(out))
    assert 3 <= len(written) < len(records)
    for rid, line in written.items():  # each line is its own record's, as first read
        assert line == ref[rid], rid
    if "--order" in flags:  # a prefix of the sequential run's lines
        assert list(written) == list(ref)[: len(written)]
    code, stderr = forked.run(resumed(error), tmp_path)
    assert code == 0, stderr
    final = untimed(read_lines(out))
    assert final == ref2
    if "--order" in flags:
        assert list(final) == list(ref2)


def _arrow_file(directory: Path) -> Path:
    (arrow,) = directory.glob("*.arrow")
    return arrow


SAVED_CHANGES = {
    "truncated": lambda arrow: os.truncate(arrow, 1000),
    "edited in place": lambda arrow: arrow.write_bytes(
        arrow.read_bytes().replace(b"r09", b"q09").replace(b"cat", b"dog")
    ),
}


@pytest.mark.parametrize("change", list(SAVED_CHANGES))
def test_a_saved_dataset_changed_under_the_job_is_never_read_again(
    forked, tiny_model_dirs, tmp_path, change
):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(poems(100)).save_to_disk(tmp_path / "ds")
    job = ["-m", tiny_model_dirs["llama"], *JOB]
    code, stderr = forked.run(["run", "ds", "-o", "ref.jsonl", *job], tmp_path)
    assert code == 0, stderr
    out = tmp_path / "out.jsonl"
    child = forked.start(["run", "ds", "-o", out.name, *job], tmp_path)
    assert child.poll_lines(out, 3)
    arrow = _arrow_file(tmp_path / "ds")
    size = arrow.stat().st_size
    SAVED_CHANGES[change](arrow)
    assert arrow.stat().st_size == (1000 if change == "truncated" else size)
    code, stderr = child.wait()
    assert code == 0, stderr  # the job reads a private copy, made when it started
    assert untimed(read_lines(out)) == untimed(read_lines(tmp_path / "ref.jsonl"))


def test_a_saved_dataset_is_read_from_a_copy_that_is_gone_once_mapped(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(poems(5)).save_to_disk(tmp_path / "ds")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    index = read_index(tmp_path / "ds")
    try:
        assert list((tmp_path / "cache").iterdir()) == []  # the copy is unlinked, still mapped
        _arrow_file(tmp_path / "ds").write_bytes(b"\0" * 10)
        assert [r.id for r in index.records()] == [r["id"] for r in poems(5)]
        assert index.record(4).prompt == poems(5)[4]["prompt"]
    finally:
        index.rows.close()


def _write_table(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        path.write_text("id,prompt\n" + "".join(f"{r['id']},{r['prompt']}\n" for r in rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        pa = pytest.importorskip("pyarrow")
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_replaced_with_its_time_kept_is_read_as_it_is_now(
    forked, tiny_model_dirs, tmp_path, suffix
):
    """`datasets` knows a converted file by its path and modification time; a file
    replaced with its time kept (cp -p, rsync -t, touch -r) must not be read as it was."""
    pytest.importorskip("datasets")
    old = [{"id": "c1", "prompt": "The sky is"}, {"id": "c2", "prompt": "Grass is"}]
    new = [{"id": "c1", "prompt": "The ocean is deep"}, *old[1:], {"id": "c3", "prompt": "Hi"}]
    table = tmp_path / f"d{suffix}"
    _write_table(table, old)
    _write_table(tmp_path / f"now{suffix}", new)
    job = ["-m", tiny_model_dirs["llama"], *JOB]
    for name, out in ((table.name, "a.jsonl"), (f"now{suffix}", "ref.jsonl")):
        code, stderr = forked.run(["run", name, "-o", out, *job], tmp_path)
        assert code == 0, stderr
    kept = table.stat()
    _write_table(table, new)
    os.utime(table, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    code, stderr = forked.run(["run", table.name, "-o", "b.jsonl", *job], tmp_path)
    assert code == 0, stderr
    assert untimed(read_lines(tmp_path / "b.jsonl")) == untimed(read_lines(tmp_path / "ref.jsonl"))
