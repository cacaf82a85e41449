"""The `pagedbatch` command end to end: real files, real models, exit codes, messages."""

from __future__ import annotations

import json
import re

import pytest
from job_helpers import ROOT, invoke, one_line_error, read_lines
from transformers import AutoTokenizer
from typer.testing import CliRunner

from pagedbatch.cli.app import app

EXAMPLE = ROOT / "examples" / "reviews.jsonl"


@pytest.mark.slow
def test_example_job_on_the_embedded_model(tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke(EXAMPLE, "--output", out, "--no-progress")
    assert result.exit_code == 0, result.output
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]
    lines = read_lines(out)
    assert sorted(o["id"] for o in lines) == sorted(r["id"] for r in inputs)
    by_id = {o["id"]: o for o in lines}
    errors = {i: o["error"]["code"] for i, o in by_id.items() if "error" in o}
    assert errors == {
        "bad-missing-prompt": "invalid_record",
        "bad-prompt-not-string": "invalid_record",
        "bad-negative-max-tokens": "invalid_params",
        "bad-negative-temperature": "invalid_params",
    }
    for record in inputs:
        line = by_id[record["id"]]
        if "error" in line:
            continue
        usage = line["usage"]
        assert usage["completion_tokens"] <= record.get("max_tokens", 256)
        assert line["choices"][0]["text"].strip(), f"{record['id']}: empty text"
        assert usage["prompt_tokens"] > 0 and line["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
    labels = [by_id[f"r{i:03d}"]["choices"][0]["text"].strip().lower() for i in range(1, 52)]
    # A real instruct model labels reviews: most answers name one of the labels.
    assert sum(any(w in t for w in ("positive", "negative", "mixed")) for t in labels) >= 30, labels
    assert re.search(r"Wrote 61 records .*57 ok, 4 failed", result.stderr)


def test_tiny_preset_runs_with_chunking_and_preemption(tmp_path, tiny_model_dirs):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": f"story number {i} " * 6}) + "\n" for i in range(12))
    )
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-m", tiny_model_dirs["llama"], "--config", "tiny", "--max-tokens", "40",
                    "--output", out, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [line["id"] for line in sorted(read_lines(out), key=lambda o: o["id"])] == list(
        range(1, 13)
    )
    preemptions = int(re.search(r"(\d+) preemptions?\b", result.stderr).group(1))
    assert preemptions > 0
    assert "peak KV blocks 24/24" in result.stderr


def test_flags_win_over_the_preset(tmp_path, tiny_model_dirs):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-m", tiny_model_dirs["llama"], "--config", "tiny", "--num-blocks", "7",
                    "--output", out, "--no-progress", "--max-tokens", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "/7," in result.stderr
    assert read_lines(out)[0]["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a"}\n{"prompt": "b",}\n', "line 2: invalid JSON"),
        (b'{"prompt": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got array"),
        (b'{"prompt": "a"}\n\n{"prompt": "\xff\xfe"}\n', "line 3: not valid UTF-8"),
        (b'{"prompt": "a"}\n{"prompt": "b', "line 2: cut off"),
        (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate id"),
    ],
)
def test_malformed_files_stop_before_any_work_with_exit_2(tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    error = one_line_error(invoke(src, "--output", out, "-m", "no-such-model-needed"))
    assert "bad.jsonl" in error and message in error
    assert not out.exists()


def test_missing_input_and_unknown_model_are_one_line_errors(tmp_path, monkeypatch):
    # Offline, the hub lookup fails at once (huggingface_hub read the variable at import).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert "no such file" in one_line_error(invoke(tmp_path / "nope.jsonl"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    assert "no-such/model" in one_line_error(
        invoke(src, "-m", "no-such/model", "-o", tmp_path / "o")
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attention", "flash"], "attention must be one of auto, torch, triton"),
        (["--block-size", "12"], "power of two"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--config", "nosuch"], "unknown config 'nosuch'"),
        (["--kv-memory", "lots"], "kv_memory must look like"),
        (["--order", "sideways"], "order must be one of completion, input, got 'sideways'"),
        (["--template", "Label {}"], "every {} needs a field name, like {text}"),
        (["--force"], "--force only applies to --resume"),
        (["--resume", "--overwrite"], "--overwrite starts over; it does not go with --resume"),
        (
            ["-o", "same.jsonl", "--errors", "same.jsonl"],
            "the errors file same.jsonl is the same file as the output same.jsonl",
        ),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    assert message in one_line_error(invoke(src, *flags))


def test_help_documents_every_option():
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--output", "--config", "--split", "--prompt-field", "--messages-field", "--id-field",
        "--chat", "--model", "--device", "--dtype", "--attention", "--max-model-len",
        "--cache-dir", "--block-size", "--num-blocks", "--kv-memory", "--max-batch-tokens",
        "--max-num-seqs", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed",
        "--stop", "--progress", "--resume", "--retry-errors", "--overwrite", "--force", "--errors",
        "--order", "--template", "--system", "--skip-invalid", "--n", "--ignore-eos",
        "--prefix-sharing", "--no-prefix-sharing", "--memory-report",
    ):  # fmt: skip
        assert option in result.output, option


@pytest.mark.parametrize("command", ["run", "plan", "bench"])
def test_every_option_of_every_command_has_help(command):
    import click
    import typer.main

    params = typer.main.get_command(app).commands[command].params
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    for param in params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"{command} {param.opts} has no help"
            assert param.opts[0] in result.output, param.opts


# Names that `bench` gives options of its own (its contenders' knobs), not run's and plan's.
BENCH_OWN = {"input", "max_tokens", "choices", "seed", "as_json", "json_schema", "regex"}


def test_an_option_of_several_commands_reads_the_same_in_each():
    import typer.main

    commands = typer.main.get_command(app).commands
    found: dict[str, set] = {}
    users: dict[str, list[str]] = {}
    for command in ("run", "plan", "bench"):
        for param in commands[command].params:
            if command == "bench" and param.name in BENCH_OWN:
                continue
            panel = getattr(param, "rich_help_panel", None)
            found.setdefault(param.name, set()).add((param.help, tuple(param.opts), panel))
            users.setdefault(param.name, []).append(command)
    shared = {name for name, commands in users.items() if len(commands) > 1}
    assert {"block_size", "max_num_seqs", "threads", "model", "config"} <= shared
    assert users["threads"] == ["run", "plan", "bench"]
    for name in shared:
        assert len(found[name]) == 1, f"--{name} is declared differently: {found[name]}"


def test_template_and_system_message_build_chat_prompts(tmp_path, tiny_model_dirs):
    rows = [{"id": "a", "text": "Great phone"}, {"id": "b", "title": "no text"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-m", tiny_model_dirs["qwen2"], "--num-blocks", "32", "--max-tokens", "2",
                    "--template", "Classify the review: {text}", "--system", "One word.",
                    "-o", out, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = {line["id"]: line for line in read_lines(out)}
    assert lines["b"]["error"] == {
        "code": "invalid_record",
        "message": "missing field 'text' that the template uses",
    }
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["qwen2"])
    chat = [
        {"role": "system", "content": "One word."},
        {"role": "user", "content": "Classify the review: Great phone"},
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert lines["a"]["usage"]["prompt_tokens"] == expected


def test_memory_report_prints_and_writes_json_and_png(tmp_path, tiny_model_dirs):
    src = tmp_path / "in.jsonl"
    shared = "the shared instruction of this job " * 8
    src.write_text("".join(json.dumps({"prompt": f"{shared} item {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "labels.v2.jsonl"
    result = invoke(src, "-m", tiny_model_dirs["llama"], "--num-blocks", "64", "--max-tokens", "4",
                    "--output", out, "--no-progress", "--memory-report")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "labels.v2.memory.json").read_text())
    assert report["num_blocks"] == 64 and report["block_size"] == 16
    assert report["prefix_hit_rate"] > 0.5 and report["peak_blocks"] > 0
    assert len(report["timeline"]) == report["timeline"][-1]["step"] > 0
    assert (tmp_path / "labels.v2.memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KV cache memory" in result.stdout + result.stderr
    assert "sharing saving at peak" in result.stdout + result.stderr
