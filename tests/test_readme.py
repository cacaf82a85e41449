"""The README's "Using it" commands run as written, with the files they name made here."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from job_helpers import ROOT, read_lines, run_shell, write_jsonl

# `bench` runs every contender on 120 records (about 18 minutes on 2 cores): tests/test_bench.py
# covers it on a small job.
SKIPPED = ("pagedbatch bench ",)


def _using_it_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Using it\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in README's Using it"
    lines = [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith("pagedbatch ")]


def _user_files(root, tiny_model_dir) -> None:
    """The files the commands name, small enough to run in seconds on the embedded model."""
    shutil.copytree(ROOT / "examples", root / "examples")
    shutil.copytree(tiny_model_dir, root / "my-model-dir")
    write_jsonl(root / "prompts.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8},
        {"id": "b", "prompt": "The capital of France is", "max_tokens": 8},
    ])  # fmt: skip
    (root / "reviews.csv").write_text('text,stars\n"Great phone, fast.",5\n"Broke in a day.",1\n')
    write_jsonl(root / "batch.jsonl", [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "max_tokens": 6,
                  "messages": [{"role": "user", "content": f"Count to {i}."}]}}
        for i in (2, 3)
    ])  # fmt: skip
    import datasets

    rows = {"prompt": ["Hello", "Goodbye"], "max_tokens": [4, 4]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(root / "data")


@pytest.mark.slow
def test_the_using_it_commands_run_as_written(tmp_path, tiny_model_dirs):
    commands = _using_it_commands()
    assert len(commands) >= 8, commands
    _user_files(tmp_path, tiny_model_dirs["llama"])
    for command in commands:
        if command.startswith(SKIPPED):
            continue
        done = run_shell(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, command
    assert {line["id"] for line in read_lines(tmp_path / "labels.jsonl")} == {"a", "b"}
    results = read_lines(tmp_path / "results.jsonl")
    assert sorted(line["custom_id"] for line in results) == ["req-2", "req-3"]
    report = json.loads((tmp_path / "label_job.output.memory.json").read_text())
    assert report["peak_blocks"] > 0 and report["prefix_hit_rate"] > 0.5
