"""Structured output in jobs: the flags, records' own constraints, OpenAI batch bodies, the
summary, resume, plan; 100-record jobs whose every completed line validates."""

from __future__ import annotations

import json
import re

import pytest
from job_helpers import by_id, invoke, one_line_error, read_lines, tiny_args, write_jsonl
from typer.testing import CliRunner

from pagedbatch.cli.app import app

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

# Nested: an enum, a number with bounds, an array of enums, an integer with bounds, required.
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "mixed"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "aspects": {"type": "array", "items": {"enum": ["price", "delivery"]}, "maxItems": 2},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "confidence", "aspects", "stars"],
}
REGEX = r"(positive|negative|mixed), [1-5] stars?( \(sure\))?"


def reviews(n: int) -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"Review {i}: the parcel came late. Label:"}
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("bad", [
    ["--json-schema", '{"type": "foo"}'],
    ["--json-schema", "missing.json"],
    ["--regex", "[0-9"],
    ["--grammar", "missing.ebnf"],
    ["--json", "--regex", "a"],
], ids=["schema", "schema-file", "regex", "grammar-file", "two"])  # fmt: skip
def test_a_bad_constraint_flag_is_one_line_before_the_model_loads(bad, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", reviews(2))
    # A model that does not exist: the flag is refused first.
    result = invoke(src, "-o", tmp_path / "out.jsonl", "-m", tmp_path / "no-model", *bad)
    text = one_line_error(result)
    assert text.startswith(f"error: {bad[0]}"), text
    assert not (tmp_path / "out.jsonl").exists()


def test_a_100_record_schema_job_writes_only_valid_values(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", reviews(100))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA, indent=2))
    out = tmp_path / "out.jsonl"
    flags = ["--json-schema", schema, "--max-tokens", "64", "--memory-report"]
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["mistral"], *flags))
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    assert len(lines) == 100
    done = [c for line in lines for c in line["choices"] if "json" in c]
    cut = [c for line in lines for c in line["choices"] if "json" not in c]
    for c in done:
        jsonschema.validate(c["json"], SCHEMA)
        assert c["json"] == json.loads(c["text"]) and c["finish_reason"] == "stop"
    for c in cut:  # never presented as valid
        assert c["finish_reason"] == "length" and c["text"].startswith('{"label": ')
    assert len(done) >= 50 and cut, (len(done), len(cut))
    (summary,) = [line for line in result.stderr.splitlines() if line.startswith("Wrote ")]
    assert f"; {len(cut)} records cut before the end of their constraint (no parsed value)" in (
        summary
    )
    report = json.loads((tmp_path / "out.memory.json").read_text())
    assert report["compiled_grammar_bytes"] > 0


def test_a_100_record_regex_job_matches_whole(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", reviews(100))
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["qwen2"], "--regex", REGEX,
                                               "--max-tokens", "40"))  # fmt: skip
    assert result.exit_code == 0, result.output
    choices = [c for line in read_lines(out) for c in line["choices"]]
    assert len(choices) == 100
    for c in choices:
        assert re.fullmatch(REGEX, c["text"]), c["text"]
        assert "json" not in c


def test_records_own_constraints_and_openai_batch_bodies(tmp_path, tiny_model_dirs):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
    rows = [
        {"id": "own", "prompt": "a", "response_format": fmt},
        {"id": "free", "prompt": "b", "response_format": {"type": "text"}},
        {"id": "bad", "prompt": "c", "regex": "[0-9"},
        {"id": "flag", "prompt": "d"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["llama"], "--regex", "[0-9]{4}",
                                               "--max-tokens", "90"))  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(out))
    jsonschema.validate(lines["own"]["choices"][0]["json"], SCHEMA)
    assert not re.fullmatch("[0-9]{4}", lines["free"]["choices"][0]["text"])
    assert lines["bad"]["error"] == {
        "code": "invalid_params",
        "message": "regex: the regex cannot be used: Regex parsing error at position 5: "
        "Unclosed '['",
    }
    assert re.fullmatch("[0-9]{4}", lines["flag"]["choices"][0]["text"])

    batch = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Label it"}], "max_tokens": 90,
                  "response_format": fmt}},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Label it", "max_tokens": 90, "response_format": fmt}},
    ]  # fmt: skip
    src = write_jsonl(tmp_path / "batch.jsonl", batch)
    result = invoke(src, "-o", tmp_path / "batch.out.jsonl", *tiny_args(tiny_model_dirs["llama"]))
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(tmp_path / "batch.out.jsonl"))
    chat = lines["chat"]["response"]["body"]["choices"][0]
    text = lines["text"]["response"]["body"]["choices"][0]
    assert chat["json"] == json.loads(chat["message"]["content"])
    assert text["json"] == json.loads(text["text"])
    jsonschema.validate(chat["json"], SCHEMA)


def test_resume_refuses_another_constraint(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", reviews(3))
    out = tmp_path / "out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"])
    assert invoke(src, "-o", out, *args, "--regex", "[a-z]{3}").exit_code == 0
    again = invoke(src, "-o", out, *args, "--regex", "[a-z]{3}", "--resume")
    assert again.exit_code == 0 and "Nothing to do" in again.stderr
    other = one_line_error(invoke(src, "-o", out, *args, "--regex", "[a-z]{4}", "--resume"))
    assert "constraint" in other and "[a-z]{4}" in other
    fingerprint = json.loads((tmp_path / "out.jsonl.job.json").read_text())
    assert fingerprint["constraint"] == {"kind": "regex", "text": "[a-z]{3}"}


def test_plan_counts_constrained_records_and_names_bad_ones(tmp_path, tiny_model_dirs):
    rows = reviews(4)
    rows[1]["response_format"] = {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}
    rows[2]["response_format"] = {"type": "text"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = CliRunner().invoke(app, [
        "plan", str(src), "-m", str(tiny_model_dirs["llama"]), "--device", "cpu",
        "--num-blocks", "64", "--no-estimate", "--json", "--regex", "[a-z]+",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["constrained_records"] == 2  # r000, r003 (the flag); r002 unconstrained
    (problem,) = plan["constraint_problems"]
    assert problem["id"] == "r001"
    assert problem["problem"].startswith("response_format: the JSON schema cannot be used: ")
