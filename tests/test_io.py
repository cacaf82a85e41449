"""Reading records (strict JSONL and `datasets` inputs) and writing output lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from pagedbatch.inputs.reader import InputError, read_records
from pagedbatch.job.output_writer import OutputWriter
from pagedbatch.outputs import (
    INVALID_RECORD,
    Completion,
    RecordError,
    RequestOutput,
)
from pagedbatch.requests.records import FieldMap, Record

USER_HI = {"role": "user", "content": "hi"}


def write_bytes(tmp_path: Path, data: bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def write_jsonl(tmp_path: Path, rows: list[object], name: str = "in.jsonl") -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return write_bytes(tmp_path, text.encode(), name)


def input_error(source: object, **kwargs: object) -> str:
    """The message of the InputError that reading `source` raises; it must be one line."""
    with pytest.raises(InputError) as info:
        read_records(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jsonl_prompt_messages_overrides_and_ids(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Label it."}
    path = write_jsonl(
        tmp_path,
        [
            {"id": "a", "prompt": "Hello", "max_tokens": 5, "temperature": 0.7, "seed": 3},
            {"id": 7, "messages": [system, USER_HI], "top_p": 0.9, "top_k": 4, "stop": ["\n"]},
            {"id": "c", "prompt": "Caf\u00e9", "other": 1, "seed": None, "top_k": -1},
            {"id": "7", "prompt": "the string '7' is not the id 7"},
        ],
    )
    assert read_records(path) == [
        Record(id="a", prompt="Hello", overrides={"max_tokens": 5, "temperature": 0.7, "seed": 3}),
        Record(
            id=7,
            messages=(system, USER_HI),
            overrides={"top_p": 0.9, "top_k": 4, "stop": ["\n"]},
        ),
        Record(id="c", prompt="Caf\u00e9", overrides={"top_k": -1}),  # checked later
        Record(id="7", prompt="the string '7' is not the id 7"),
    ]


def test_jsonl_default_id_is_the_line_number_counting_blank_lines(tmp_path: Path) -> None:
    # A UTF-8 BOM, CRLF and a whole last line without a newline are all fine.
    data = b'\xef\xbb\xbf{"prompt": "a"}\n\n \t\n{"prompt": "d"}\r\n{"id": null, "prompt": "e"}'
    path = write_bytes(tmp_path, data)
    records = read_records(str(path))
    assert [(r.id, r.prompt) for r in records] == [(1, "a"), (4, "d"), (5, "e")]
    # A file has one split, as `datasets` names a local file's split.
    assert read_records(path, split="train") == records
    assert input_error(path, split="test") == f"{path}: no split 'test' (available: train)"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{}\n\n{"a": }\n{}\n', "line 3: invalid JSON: Expecting value: column 7"),
        (b'{}\n["x"]\n', "line 2: expected a JSON object, got array"),
        (b"{}\n\n\n42\n", "line 4: expected a JSON object, got number"),
        (b'"just text"\n', "line 1: expected a JSON object, got string"),
        (b"{}\nnull\n", "line 2: expected a JSON object, got null"),
        (b'{}\n{"a": "\xff\xfe"}\n', "line 2: not valid UTF-8"),
        (b'{}\n{}\n{"a": "unfini', "line 3: cut off (incomplete JSON at end of file)"),
        # The same text with its newline is whole, so it is plainly invalid.
        (
            b'{}\n{}\n{"a": "unfini\n',
            "line 3: invalid JSON: Unterminated string starting at: column 7",
        ),
        (b'{"id": "x"}\n{}\n{"id": "x"}\n', "line 3: duplicate id 'x' (first on line 1)"),
        # Line 2 has no id, so it is 2, the id that line 4 gives explicitly.
        (
            b'{}\n{}\n\n{"id": 2}\n',
            "line 4: duplicate id 2 (first on line 2, which has no 'id' and so is numbered by "
            "its line)",
        ),
    ],
)
def test_jsonl_file_errors_name_the_file_and_line(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    path = write_bytes(tmp_path, data)
    assert input_error(path) == f"{path}: {expected}"


def test_missing_or_unsupported_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert input_error("prompts.jsonl") == "prompts.jsonl: no such file"
    assert input_error(tmp_path / "data.csv") == f"{tmp_path / 'data.csv'}: no such file"
    assert input_error("./prompts") == "./prompts: no such file"
    path = write_bytes(tmp_path, b"hello\n", "prompts.txt")
    assert input_error(path) == (
        f"{path}: unsupported file type '.txt' "
        "(use .jsonl, .json, .csv, .parquet, .arrow or a dataset directory)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"prompt": "x"}])
    path.chmod(0)
    assert input_error(path) == f"{path}: permission denied"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "r", "max_tokens": 4}, "missing 'prompt' (or 'messages')"),
        ({"id": "r", "prompt": 42}, "'prompt' must be a string, got int"),
        ({"id": "r", "prompt": "p", "messages": [USER_HI]}, "has both 'prompt' and 'messages'"),
        ({"id": "r", "messages": []}, "'messages' must be a non-empty list"),
        ({"id": "r", "messages": [{"role": "user"}]}, "'messages'[0].content must be a string"),
        ({"id": "r", "messages": ["hi"]}, "'messages'[0] must be an object with a string 'role'"),
    ],
)
def test_record_problems_land_on_the_record(tmp_path: Path, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path, [{"prompt": "fine"}, row, {"prompt": "also fine"}])
    first, bad, last = read_records(path)
    assert (first.id, first.error, last.id, last.error) == (1, None, 3, None)
    assert bad.id == "r" and bad.prompt is None and bad.messages is None
    assert bad.error is not None and bad.error.code == INVALID_RECORD
    assert message in bad.error.message


def test_custom_field_map(tmp_path: Path) -> None:
    fields = FieldMap(prompt="text", messages="chat", id="key")
    path = write_jsonl(
        tmp_path,
        [{"key": "k1", "text": "hi"}, {"chat": [USER_HI]}, {"id": "ignored", "prompt": "p"}],
    )
    first, second, third = read_records(path, fields=fields)
    assert first == Record(id="k1", prompt="hi")
    assert second == Record(id=2, messages=(USER_HI,))
    assert third.id == 3
    assert third.error == RecordError(INVALID_RECORD, "missing 'text' (or 'chat')")


def test_json_file_is_json_lines_or_one_document(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b'{"prompt": "a"}\n{"id": "b", "prompt": "b"}\n', "in.json")
    assert read_records(path) == [Record(id=1, prompt="a"), Record(id="b", prompt="b")]
    broken = write_bytes(tmp_path, b'{"prompt": "a"}\n{"prompt": \n', "broken.json")
    assert input_error(broken) == f"{broken}: line 2: invalid JSON: Expecting value: column 12"
    # One JSON document (here an indented array) is not JSON Lines: `datasets` reads it.
    rows = [{"prompt": "a", "id": None}, {"prompt": "b", "id": "x"}]
    path.write_text(json.dumps(rows, indent=2))
    assert read_records(path) == [Record(id=0, prompt="a"), Record(id="x", prompt="b")]


def test_saved_dataset_rows_are_plain_python(tmp_path: Path) -> None:
    rows = [
        {"id": None, "prompt": "p0", "messages": None, "max_tokens": 3},
        {"id": "m", "prompt": None, "messages": [USER_HI], "max_tokens": None},
        {"id": None, "prompt": None, "messages": None, "max_tokens": None},
    ]
    datasets.Dataset.from_list(rows).with_format("numpy").save_to_disk(tmp_path / "saved")
    first, second, third = read_records(tmp_path / "saved")
    assert first == Record(id=0, prompt="p0", overrides={"max_tokens": 3})
    assert type(first.overrides["max_tokens"]) is int
    assert second == Record(id="m", messages=(USER_HI,))
    assert type(second.messages[0]) is dict
    assert third.id == 2 and third.error is not None and third.error.code == INVALID_RECORD


def test_messages_lose_the_keys_arrow_added(tmp_path: Path) -> None:
    named = {"role": "user", "content": "hi", "name": "ann"}
    rows = [{"messages": [named]}, {"messages": [USER_HI]}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    assert [r.messages for r in read_records(tmp_path / "saved")] == [(named,), (USER_HI,)]


def test_legacy_sequence_of_structs_becomes_a_list_of_dicts(tmp_path: Path) -> None:
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"messages": datasets.Sequence(message)})
    columns = {"role": ["system", "user"], "content": ["Be brief.", "hi"]}
    data = datasets.Dataset.from_dict({"messages": [columns]}, features=features)
    data.save_to_disk(tmp_path / "saved")
    records = read_records(tmp_path / "saved")
    assert records == [Record(id=0, messages=({"role": "system", "content": "Be brief."}, USER_HI))]


def make_dataset_dict(tmp_path: Path, splits: list[str]) -> Path:
    data = datasets.DatasetDict(
        {s: datasets.Dataset.from_list([{"prompt": f"{s}-{i}"} for i in range(2)]) for s in splits}
    )
    data.save_to_disk(tmp_path / "dd")
    return tmp_path / "dd"


def test_dataset_dict_split_selection(tmp_path: Path) -> None:
    path = make_dataset_dict(tmp_path, ["test", "train"])
    assert [r.prompt for r in read_records(path)] == ["train-0", "train-1"]
    assert read_records(path, split="test") == [
        Record(id=0, prompt="test-0"),
        Record(id=1, prompt="test-1"),
    ]
    assert input_error(path, split="validation") == (
        f"{path}: no split 'validation' (available: test, train)"
    )


def test_dataset_dict_without_train_and_single_dataset(tmp_path: Path) -> None:
    path = make_dataset_dict(tmp_path, ["a", "b"])
    assert input_error(path) == f"{path}: has splits a, b; choose one with --split"
    only = make_dataset_dict(tmp_path / "only", ["validation"])
    assert [r.prompt for r in read_records(only)] == ["validation-0", "validation-1"]
    datasets.Dataset.from_list([{"prompt": "p"}]).save_to_disk(tmp_path / "saved")
    message = input_error(tmp_path / "saved", split="train")
    assert message == f"{tmp_path / 'saved'}: has no splits, so there is no split 'train'"


def test_dataset_duplicate_ids_name_both_rows(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    message = input_error(tmp_path / "saved")
    assert message == f"{tmp_path / 'saved'}: row 2: duplicate id 'a' (first on row 0)"


def test_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,prompt,max_tokens\nq1,"Hello, world",4\nq2,Bye,8\n')
    assert read_records(path) == [
        Record(id="q1", prompt="Hello, world", overrides={"max_tokens": 4}),
        Record(id="q2", prompt="Bye", overrides={"max_tokens": 8}),
    ]
    assert input_error(path, split="test") == f"{path}: no split 'test' (available: train)"


def test_parquet_file_with_messages(tmp_path: Path) -> None:
    rows = [{"messages": [USER_HI], "seed": 5}, {"messages": [USER_HI], "seed": None}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "in.parquet")
    assert read_records(tmp_path / "in.parquet") == [
        Record(id=0, messages=(USER_HI,), overrides={"seed": 5}),
        Record(id=1, messages=(USER_HI,)),
    ]


def test_directory_of_data_files_or_of_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data", [{"prompt": "a"}, {"id": "z", "prompt": "b"}], "part.jsonl")
    records = read_records(tmp_path / "data")
    assert records == [Record(id=0, prompt="a"), Record(id="z", prompt="b")]
    (tmp_path / "empty").mkdir()
    message = input_error(tmp_path / "empty")
    assert message.startswith(f"{tmp_path / 'empty'}: not a dataset directory (")


def test_unreachable_hub_name(tmp_path: Path) -> None:
    # Offline mode makes the hub lookup fail at once instead of retrying on the network.
    code = (
        "from pagedbatch.inputs.reader import read_records\n"
        "read_records('no-such-owner/no-such-dataset')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line == (
        "pagedbatch.inputs.rows.InputError: no-such-owner/no-such-dataset: no such file or "
        "directory, and not a Hugging Face dataset cached here (HF_HUB_OFFLINE is set); pass a "
        "JSONL, JSON, CSV or Parquet file, or a directory saved with save_to_disk"
    )


def test_output_writer_appends_one_json_line_per_output(tmp_path: Path) -> None:
    completion = Completion(0, "caf\u00e9 \u2713", (5, 6, 7), "stop")
    done = RequestOutput(id="r1", completions=(completion,), prompt_tokens=4, cached_tokens=2)
    failed = RequestOutput(id=9, error=RecordError(INVALID_RECORD, "missing 'prompt'"))
    path = tmp_path / "out" / "deep" / "results.jsonl"
    with OutputWriter(path) as writer:
        writer.write(done)
        writer.write(failed)
        assert writer.count == 2
    text = path.read_text(encoding="utf-8")
    assert "caf\u00e9 \u2713" in text  # not \u escapes
    assert [json.loads(line) for line in text.splitlines()] == [done.to_json(), failed.to_json()]
    assert text.endswith("\n") and text.count("\n") == 2
    with OutputWriter(path) as again:
        again.write(failed)
    assert again.count == 1
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[2]) == failed.to_json()
    again.close()  # a second close is harmless
    with pytest.raises(ValueError, match="closed"):
        again.write(failed)
    assert path.read_text(encoding="utf-8").count("\n") == 3
