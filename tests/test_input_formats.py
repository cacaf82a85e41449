"""Input shapes beyond plain rows: bad lines kept as records, templates, OpenAI batch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_io import USER_HI, write_bytes, write_jsonl

from pagedbatch.inputs.reader import InputError, read_records
from pagedbatch.outputs import INVALID_RECORD, RecordError
from pagedbatch.requests.prompt_template import PromptTemplate, TemplateError
from pagedbatch.requests.records import FieldMap, Record


def input_error(source: object, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        read_records(source, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_skip_invalid_turns_bad_lines_into_invalid_records(tmp_path: Path) -> None:
    data = b'{"prompt": "a"}\n[1]\n{"prompt": "\xff"}\n\n{"id": "ok", "prompt": "b"}\n{"prompt": "c'
    path = write_bytes(tmp_path, data)
    assert "line 2: expected a JSON object" in input_error(path)  # strict by default
    records = read_records(path, skip_invalid=True)
    assert [(r.id, r.error and r.error.code) for r in records] == [
        (1, None), (2, INVALID_RECORD), (3, INVALID_RECORD), ("ok", None), (6, INVALID_RECORD)
    ]  # fmt: skip
    assert [r.error.message for r in records if r.error] == [
        "line 2: expected a JSON object, got array",
        "line 3: not valid UTF-8",
        "line 6: cut off (incomplete JSON at end of file)",
    ]
    assert records[1].source == {"raw_line": "[1]"}
    assert records[2].source == {"raw_line": '{"prompt": "\ufffd"}'}
    # Duplicate ids still stop the job: an output keyed by id cannot hold both.
    path = write_bytes(tmp_path, b'{"id": 2, "prompt": "a"}\nnot json\n')
    assert "line 2: duplicate id 2" in input_error(path, skip_invalid=True)


def test_records_keep_their_input_row_out_of_comparisons(tmp_path: Path) -> None:
    row = {"id": "a", "prompt": "Hello", "extra": [1, 2]}
    (record,) = read_records(write_jsonl(tmp_path, [row]))
    assert record.source == row and record == Record(id="a", prompt="Hello")


def test_template_and_system_shape_the_prompt(tmp_path: Path) -> None:
    rows = [
        {"id": 1, "text": "great", "stars": 5},
        {"id": 2, "text": "meh"},
        {"id": 3, "text": None, "stars": 1},
        {"id": 4, "messages": [USER_HI], "text": "x", "stars": 2},
    ]
    path = write_jsonl(tmp_path, rows)
    template = PromptTemplate("Review: {text} ({stars} stars)")
    first, second, third, fourth = read_records(path, fields=FieldMap(template=template))
    assert first == Record(id=1, prompt="Review: great (5 stars)")
    assert second.error == RecordError(
        INVALID_RECORD, "missing field 'stars' that the template uses"
    )
    assert third.error is not None and "missing field 'text'" in third.error.message
    assert fourth.prompt == "Review: x (2 stars)"  # with a template, messages are data
    system = {"role": "system", "content": "Be brief."}
    fields = FieldMap(template=template, system="Be brief.")
    assert read_records(path, fields=fields)[0].messages == (
        system,
        {"role": "user", "content": "Review: great (5 stars)"},
    )
    own = {"role": "system", "content": "Mine."}
    path = write_jsonl(tmp_path, [{"messages": [USER_HI]}, {"messages": [own, USER_HI]}])
    chats = [r.messages for r in read_records(path, fields=FieldMap(system="Be brief."))]
    assert chats == [(system, USER_HI), (own, USER_HI)]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("no fields", "has no {field} to fill"),
        ("{} and {0}", "every {} needs a field name"),
        ("{text", "expected '}' before end of string"),
    ],
)
def test_bad_templates_are_refused_up_front(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PromptTemplate(template)


def test_openai_batch_files_are_detected(tmp_path: Path) -> None:
    chat = {"messages": [USER_HI], "max_completion_tokens": 5, "temperature": 0.5, "n": 2}
    rows = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "c2", "url": "/v1/completions", "body": {"prompt": ["Hi"], "stop": "x"}},
        {"custom_id": "c3", "url": "/v1/completions", "body": {"prompt": [5, 6], "seed": 7}},
        {"custom_id": "c4", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    c1, c2, c3, c4 = read_records(write_jsonl(tmp_path, rows))
    assert c1 == Record(
        id="c1", messages=(USER_HI,), overrides={"temperature": 0.5, "n": 2, "max_tokens": 5},
        endpoint="/v1/chat/completions",
    )  # fmt: skip
    assert c2 == Record(id="c2", prompt="Hi", overrides={"stop": "x"}, endpoint="/v1/completions")
    assert c3.prompt_token_ids == (5, 6) and c3.overrides == {"seed": 7}
    assert c4.error == RecordError(
        INVALID_RECORD,
        "url '/v1/embeddings' is not supported (use /v1/chat/completions or /v1/completions)",
    )
    assert c4.endpoint == "/v1/embeddings"
    with pytest.raises(InputError, match="OpenAI batch file: --template and --system"):
        read_records(tmp_path / "in.jsonl", fields=FieldMap(system="x"))


def test_a_record_missing_a_json_looking_field_says_to_double_the_braces() -> None:
    template = PromptTemplate('Reply as JSON {"label": ...}: {text}')
    with pytest.raises(TemplateError, match=r"""missing field '"label"'.*write \{\{ and \}\}"""):
        template.fill({"text": "fine", '"label"': None})
    with pytest.raises(TemplateError) as missing_text:
        template.fill({'"label"': 1})
    assert "{{" not in str(missing_text.value)
