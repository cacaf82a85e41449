"""The bad-input corpus (tests/bad_inputs/): each file gets its documented behaviour.

A file-level problem stops the job before any work with exit 2 and one line naming the
file and line; a record-level problem becomes that record's error line and the job goes
on (exit 0). Never a traceback. The README's "Errors" table documents the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from job_helpers import by_id, invoke, one_line_error, read_lines, tiny_args

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
OK = "ok"

# file -> the one-line error (exit 2, nothing written)
FILE_ERRORS = {
    "binary_garbage.jsonl": "line 1: not valid UTF-8",
    "invalid_utf8.jsonl": "line 2: not valid UTF-8",
    "json_array_line.jsonl": "line 2: expected a JSON object, got array",
    "cut_off_last_line.jsonl": "line 3: cut off (incomplete JSON at end of file)",
    "duplicate_ids.jsonl": "line 3: duplicate id 'a' (first on line 1)",
}

# file -> {record id: (code, message)} of a job that runs (exit 0)
RECORD_ERRORS = {
    "wrong_types.jsonl": {
        "ok": (OK, None),
        "prompt-int": ("invalid_record", "'prompt' must be a string, got int"),
        "messages-string": (
            "invalid_record",
            "'messages' must be a non-empty list of {role, content} objects",
        ),
        "content-int": ("invalid_record", "'messages'[0].content must be a string"),
        5: ("invalid_record", "'id' must be a string or an integer"),
        "max-tokens-string": ("invalid_params", "max_tokens must be an integer, got 'many'"),
        "stop-int": ("invalid_params", "stop must be a non-empty string or a list of them, got 5"),
    },
    "missing_fields.jsonl": {
        "ok": (OK, None),
        "nothing": ("invalid_record", "missing 'prompt' (or 'messages')"),
        "only-params": ("invalid_record", "missing 'prompt' (or 'messages')"),
        "both": ("invalid_record", "has both 'prompt' and 'messages'"),
        "no-role": ("invalid_record", "'messages'[0] must be an object with a string 'role'"),
    },
    "bad_params.jsonl": {
        "ok": (OK, None),
        "max-tokens-0": ("invalid_params", "max_tokens must be >= 1, got 0"),
        "temperature-negative": ("invalid_params", "temperature must be >= 0, got -0.5"),
        "top-p-2": ("invalid_params", "top_p must be in (0, 1], got 2"),
        "top-k-negative": ("invalid_params", "top_k must be >= 0, got -1"),
        "seed-negative": ("invalid_params", "seed must be >= 0, got -3"),
        "n-0": ("invalid_params", "n must be >= 1, got 0"),
        "stop-empty": ("invalid_params", "stop must be a non-empty string or a list of them"),
    },
    # Valid JSON, but "\ud800" alone is no character: no tokenizer takes it.
    "lone_surrogates.jsonl": {
        "ok": (OK, None),
        "prompt": (
            "invalid_record",
            "prompt 'Hi \\ud800' holds a lone surrogate, which is not text",
        ),
        "messages": ("invalid_record", "message 'Hi \\udfff there' holds a lone surrogate"),
        "stop": ("invalid_record", "stop string '\\ud800' holds a lone surrogate"),
        "choices": ("invalid_record", "choice '\\ud800' holds a lone surrogate"),
        "fine-choices": (OK, None),
    },
    "unknown_openai_url.jsonl": {
        "chat": (OK, None),
        "embed": (
            "invalid_record",
            "url '/v1/embeddings' is not supported (use /v1/chat/completions or /v1/completions)",
        ),
        "text": (OK, None),
    },
}


def big_inputs(directory: Path) -> dict[str, Path]:
    """The two large members of the corpus, made on the fly rather than stored."""
    huge = directory / "huge_prompt.jsonl"
    rows = [{"id": "ok", "prompt": "A fine record"}, {"id": "huge", "prompt": "story " * 3000}]
    huge.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_mb = directory / "one_mb_line.jsonl"
    one_mb.write_text(json.dumps({"id": "mb", "prompt": "x" * 2**20}) + "\n")
    return {"huge_prompt.jsonl": huge, "one_mb_line.jsonl": one_mb}


@pytest.mark.parametrize("name", sorted(FILE_ERRORS))
def test_file_level_problems_stop_before_any_work(tmp_path, name):
    out = tmp_path / "out.jsonl"
    error = one_line_error(invoke(CORPUS / name, "-o", out, "-m", "no-model-needed"))
    assert error == f"error: {CORPUS / name}: {FILE_ERRORS[name]}"
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(RECORD_ERRORS))
def test_record_level_problems_become_error_lines(tmp_path, tiny_model_dirs, name):
    lines = run_job(CORPUS / name, tmp_path, tiny_model_dirs)
    assert set(lines) == set(RECORD_ERRORS[name])
    for rid, (code, message) in RECORD_ERRORS[name].items():
        assert_outcome(lines[rid], code, message)


def test_a_lone_surrogate_in_a_template_field_is_that_records_error(tmp_path, tiny_model_dirs):
    rows = '{"id": "t", "text": "Hi \\ud800"}\n{"id": "ok", "text": "Hi"}\n'
    (tmp_path / "t.jsonl").write_text(rows)
    lines = run_job(tmp_path / "t.jsonl", tmp_path, tiny_model_dirs, "--template", "Say {text}")
    assert_outcome(lines["ok"], OK, None)
    assert_outcome(lines["t"], "invalid_record", "prompt 'Say Hi \\ud800' holds a lone surrogate")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--choices", '["\\ud800", "ok"]'], "choices: '\\ud800' holds a lone surrogate"),
        (["--choices", "\udcff,ok"], "choices: '\\udcff' holds a lone surrogate"),  # not UTF-8
        (["--stop", "\udcff"], "stop: '\\udcff' holds a lone surrogate"),
        (["--system", "Be \udcff"], "--system: 'Be \\udcff' holds a lone surrogate"),
        (["--template", "{prompt} \udcff"], "--template: '{prompt} \\udcff' holds a lone"),
        (["--prompt-field", "\udcff"], "--prompt-field: '\\udcff' holds a lone surrogate"),
    ],
)
def test_a_lone_surrogate_in_a_flag_is_one_line(tmp_path, flags, message):
    """A flag's text that is not text (a JSON escape, or argv bytes that are not UTF-8,
    which Python passes on as lone surrogates) is refused before any work."""
    out = tmp_path / "out.jsonl"
    error = one_line_error(invoke(CORPUS / "lone_surrogates.jsonl", "-o", out, *flags))
    assert message in error, error
    assert not out.exists()


def test_a_huge_id_is_cut_in_a_message(tmp_path):
    huge = "x" * 2**20
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps({"id": huge, "prompt": p}) + "\n" for p in ("a", "b")))
    error = one_line_error(invoke(src, "-o", tmp_path / "out.jsonl", "-m", "no-model-needed"))
    assert f"line 2: duplicate id '{'x' * 36}... (first on line 1)" in error
    assert len(error) < 300


def test_an_input_whose_name_is_not_utf8_runs_and_resumes(tmp_path, tiny_model_dirs):
    src = tmp_path / os.fsdecode(b"caf\xe9.jsonl")  # the name as Python holds it: '\udce9'
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    assert set(run_job(src, tmp_path, tiny_model_dirs)) == {"a"}
    out = tmp_path / f"{src.stem}.out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(tiny_model_dirs["llama"], "--resume"))
    assert result.exit_code == 0 and "Nothing to do" in result.stderr, result.output


def test_huge_prompts_are_prompt_too_long(tmp_path, tiny_model_dirs):
    for path in big_inputs(tmp_path).values():
        lines = run_job(path, tmp_path, tiny_model_dirs)
        for rid, line in lines.items():
            if rid == "ok":
                assert_outcome(line, OK, None)
            else:
                assert_outcome(line, "prompt_too_long", "tokens; the model's context is 1024")


def test_skip_invalid_runs_the_rest_of_a_broken_file(tmp_path, tiny_model_dirs):
    lines = run_job(CORPUS / "cut_off_last_line.jsonl", tmp_path, tiny_model_dirs, "--skip-invalid")
    assert set(lines) == {"a", "b", 3}
    assert_outcome(lines[3], "invalid_record", "line 3: cut off (incomplete JSON at end of file)")
    lines = run_job(CORPUS / "binary_garbage.jsonl", tmp_path, tiny_model_dirs, "--skip-invalid")
    assert lines and all(line["error"]["code"] == "invalid_record" for line in lines.values())


def test_an_empty_file_is_an_empty_job(tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke(CORPUS / "empty.jsonl", "-o", out, "-m", "no-model-needed")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"The input has no records; {out} is empty."
    assert out.read_bytes() == b""


def run_job(src: Path, tmp_path: Path, models: dict, *flags: str) -> dict:
    out = tmp_path / f"{src.stem}.out.jsonl"
    result = invoke(src, "-o", out, *tiny_args(models["llama"], "--overwrite", *flags))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.stderr.startswith("Wrote ")
    return by_id(read_lines(out))


def assert_outcome(line: dict, code: str, message: str | None) -> None:
    if code == OK:
        assert "error" not in line or line["error"] is None, line
        return
    error = line["error"]
    assert error["code"] == code and message in error["message"], error
    assert "\n" not in error["message"]
