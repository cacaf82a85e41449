"""A new user's first commands: help and every argument, file or model error answer at once.

The installed `pagedbatch` command runs as a real process; what is measured is the CPU
time it used (getrusage of the children), so the machine's load does not matter.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import BIN, read_lines

from pagedbatch.models.names import ModelLoadError, resolve_model_name

CPU_LIMIT = 1.0  # seconds of CPU for an answer that needs no model
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with an empty hub cache and a hub that refuses connections."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=UNREACHABLE_HUB, **extra)
    return env


def _pagedbatch(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Run the installed command: (exit code, stderr, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(BIN / "pagedbatch"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.returncode, done.stderr, cpu


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "Hi"}\n')
    (tmp_path / "text.jsonl").write_text('{"id": "a", "text": "Hi", "stars": 5}\n')
    return path


@pytest.mark.parametrize(
    "args",
    [["--help"], ["run", "--help"], ["plan", "--help"], ["bench", "--help"]],
)
def test_help_answers_in_well_under_a_cpu_second(tmp_path, args):
    code, stderr, cpu = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 0, stderr
    assert cpu < CPU_LIMIT, f"pagedbatch {' '.join(args)} used {cpu:.2f} CPU s"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nosuch.jsonl"], "nosuch.jsonl: no such file"),
        (["run", "in.jsonl", "--model", "gpt2"], "the hub (127.0.0.1) cannot be reached"),
        (["run", "in.jsonl", "--model", "owner/model"], "not in the hub cache"),
        (["run", "in.jsonl", "--model", "./no-such-dir"], "'./no-such-dir': no such directory"),
        (["run", "in.jsonl", "--model", "absent.gguf"], "no such GGUF file"),
        (["run", "text.jsonl"], "no record has a 'prompt' or 'messages' field"),
        (["run", "in.jsonl", "--block-size", "12"], "power of two"),
        (["run", "in.jsonl", "--temperature", "-1"], "temperature must be >= 0"),
        (["run", "in.jsonl", "--kv-memory", "lots"], "kv_memory must look like"),
        (["run", "in.jsonl", "--config", "nosuch"], "unknown config 'nosuch'"),
        (["plan", "nosuch.jsonl"], "nosuch.jsonl: no such file"),
        (["run", "pagedbatch-tests/no-such-set"], "not a Hugging Face dataset cached here"),
        (["plan", "no-such-set"], "the hub (127.0.0.1) cannot be reached"),
    ],
)
def test_errors_are_one_line_exit_2_in_well_under_a_cpu_second(tmp_path, job, args, message):
    code, stderr, cpu = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert cpu < CPU_LIMIT, f"pagedbatch {' '.join(args)} used {cpu:.2f} CPU s"
    if "--model" in args:
        assert "a local model directory, a .gguf file, or a hub id cached here" in lines[0]
    if "set" in args[1]:
        assert "pass a JSONL, JSON, CSV or Parquet file, or a directory saved" in lines[0]
    assert not (tmp_path / "in.output.jsonl").exists()


def _tables_without_a_prompt(root: Path) -> None:
    """reviews.{csv,parquet,json} and the saved datasets `saved` and `saved_dict`, with the
    columns text and stars."""
    import datasets

    (root / "reviews.csv").write_text('text,stars\n"Great phone",5\n"Bad",1\n')
    rows = datasets.Dataset.from_dict({"text": ["Great phone", "Bad"], "stars": [5, 1]})
    rows.to_parquet(str(root / "reviews.parquet"))
    (root / "reviews.json").write_text(json.dumps(rows.to_list(), indent=1))
    rows.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"test": rows}).save_to_disk(str(root / "saved_dict"))


@pytest.mark.parametrize(
    "args",
    [
        ["run", "reviews.csv"],
        ["run", "reviews.parquet"],
        ["run", "reviews.json"],
        ["run", "saved"],
        ["run", "saved_dict"],
        ["plan", "reviews.csv"],
        ["bench", "reviews.parquet"],
    ],
)
def test_a_table_without_the_prompt_field_names_its_columns_and_the_options(tmp_path, args):
    """Refused from the file's header, schema or saved features, before `datasets` (a
    second of CPU on its own) or torch is imported."""
    _tables_without_a_prompt(tmp_path)
    code, stderr, cpu = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 2, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: {args[1]}: no record has a 'prompt' or 'messages' field")
    for part in ("'text', 'stars'", "--prompt-field text", "--messages-field", "--template"):
        assert part in line, line
    assert cpu < CPU_LIMIT, f"pagedbatch {' '.join(args)} used {cpu:.2f} CPU s"


def _reviews_with_an_id_first(root: Path) -> None:
    """Tables whose first column is an id and whose text is in a column named otherwise."""
    import datasets

    (root / "ids.csv").write_text('review_id,stars,text\nR1,5,"Great phone, fast"\nR2,1,Bad\n')
    rows = {"review_id": ["R1", "R2"], "stars": [5, 1], "comment": ["Great phone, fast", "Bad"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "ids.parquet"))
    rows = {"review_id": ["R1"], "stars": [5], "review_body": ["Great phone, fast"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "ids_saved"))
    line = {"review_id": "R1", "title": "Great", "body": "The phone is fast and the battery lasts"}
    (root / "ids.jsonl").write_text(json.dumps(line) + "\n")


@pytest.mark.parametrize(
    ("src", "column"),
    [("ids.csv", "text"), ("ids.parquet", "comment"), ("ids_saved", "review_body"),
     ("ids.jsonl", "body")],
)  # fmt: skip
def test_the_missing_prompt_field_hint_names_the_text_column_not_the_first(tmp_path, src, column):
    _reviews_with_an_id_first(tmp_path)
    code, stderr, cpu = _pagedbatch(["run", src], tmp_path, _env(tmp_path))
    assert code == 2, stderr
    [line] = stderr.strip().splitlines()
    assert f"--prompt-field {column}, " in line and f"--template '... {{{column}}}'" in line, line
    assert cpu < CPU_LIMIT, f"pagedbatch run {src} used {cpu:.2f} CPU s"


JSON_TEMPLATE = 'Reply as JSON {"label": ...}. Review: {text}'


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["run", "reviews.parquet", "--template", "{title}: {text}"], "'title'"),
        (["run", "reviews.csv", "--template", "{title}: {text} {meta[lang]}"], "'title', 'meta'"),
        (["run", "saved", "--template", "{title}: {text}"], "'title'"),
        (["run", "reviews.json", "--template", JSON_TEMPLATE], "'\"label\"'"),
        (["run", "text.jsonl", "--template", JSON_TEMPLATE], "'\"label\"'"),
        (["plan", "reviews.csv", "--template", "{title}: {text}"], "'title'"),
    ],
)
def test_a_template_no_record_can_fill_is_exit_2_before_the_model_loads(
    tmp_path, job, args, missing
):
    """Every record would be an invalid_record line and the job exit 0: refused instead, from
    a table's columns before `datasets` loads, from a JSON Lines file once it is read; a
    field that looks like JSON says how to write braces that are text."""
    _tables_without_a_prompt(tmp_path)
    code, stderr, cpu = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 2, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: {args[1]}: --template uses the field"), line
    assert f" {missing}, which no record has (fields: " in line, line
    assert ("write {{ and }}" in line) == ("label" in missing), line
    assert cpu < CPU_LIMIT, f"pagedbatch {' '.join(args)} used {cpu:.2f} CPU s"
    assert not list(tmp_path.glob("*.output.jsonl"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "reviews.csv", "--split", "test"], "no split 'test' (available: train)"),
        (["run", "saved", "--split", "test"], "has no splits, so there is no split 'test'"),
        (["run", "saved_dict", "--split", "train"], "no split 'train' (available: test)"),
        (["bench", "nosuch.jsonl"], "nosuch.jsonl: no such file"),
        (["bench", "in.jsonl", "--model", "./no-such-dir"], "no such directory"),
        (["bench", "in.jsonl", "--num-prompts", "0"], "num_records must be >= 1"),
        (["bench", "--workload", "chat"], "unknown workload 'chat'"),
    ],
)
def test_split_and_bench_errors_answer_before_the_libraries_load(tmp_path, job, args, message):
    _tables_without_a_prompt(tmp_path)
    code, stderr, cpu = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 2, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert cpu < CPU_LIMIT, f"pagedbatch {' '.join(args)} used {cpu:.2f} CPU s"


def test_the_columns_read_first_do_not_refuse_what_datasets_reads(tmp_path, tiny_model_dirs):
    """A template, a --prompt-field naming a column, an OpenAI batch table: read as before."""
    _tables_without_a_prompt(tmp_path)
    model = ["--model", str(tiny_model_dirs["llama"]), "--max-tokens", "2", "--num-blocks",
             "16", "--no-progress"]  # fmt: skip
    for src, extra in [
        ("reviews.csv", ["--template", "Review: {text}"]),
        ("reviews.parquet", ["--prompt-field", "text"]),
        ("saved_dict", ["--prompt-field", "text"]),
        ("reviews.json", ["--prompt-field", "text"]),
    ]:
        out = tmp_path / f"{src}.out.jsonl"
        code, stderr, _ = _pagedbatch(["run", src, "-o", str(out), *model, *extra], tmp_path,
                                      _env(tmp_path))  # fmt: skip
        assert code == 0, stderr
        assert [line.get("error") for line in read_lines(out)] == [None, None], src


def test_commands_and_the_job_reader_do_not_import_torch(tmp_path, job):
    code = f"""
import sys
import pagedbatch, pagedbatch.cli.app
from pagedbatch.job.job import Job, ResumePolicy
from pagedbatch.job.settings import resolve_settings
from pagedbatch.models.names import resolve_model_name
with Job({str(job)!r}, resolve_settings({{}}), ResumePolicy()) as job:
    resolve_model_name(job.settings.engine.model)
    assert len(job.todo) == 1
heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
print(",".join(heavy))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported before the model loads: {done.stdout}"


def _cache_as_hub_model(model_dir: Path, hub_cache: Path, repo_id: str) -> None:
    """Lay `model_dir` out in a hub cache as the client does: refs/main -> snapshots/<commit>."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_a_cached_hub_model_runs_with_the_hub_unreachable(tmp_path, job, tiny_model_dirs):
    _cache_as_hub_model(tiny_model_dirs["llama"], tmp_path / "hub", "pagedbatch-tests/tiny")
    args = ["run", "in.jsonl", "--model", "pagedbatch-tests/tiny", "--max-tokens", "3",
            "--num-blocks", "16", "--no-progress"]  # fmt: skip
    code, stderr, _ = _pagedbatch(args, tmp_path, _env(tmp_path))
    assert code == 0, stderr
    [line] = read_lines(tmp_path / "in.output.jsonl")
    assert line["id"] == "a" and line["usage"]["completion_tokens"] >= 1, json.dumps(line)


def test_model_names_resolve_without_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model_name("smollm2-135m").kind == "alias"
    assert resolve_model_name("tiny-random").kind == "random"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_name(str(gguf)) == ("gguf", gguf, False)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")
    assert resolve_model_name(str(tmp_path / "dir")).kind == "directory"
    snapshot = tmp_path / "hub" / "models--o--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model_name("o/m") == ("hub", None, True)  # cached, hub unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the hub cache, and HF_HUB_OFFLINE is set"):
        resolve_model_name("o/other")
    with pytest.raises(ModelLoadError, match="it is a file but not a .gguf file"):
        resolve_model_name(str(tmp_path / "dir" / "config.json"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_name("a/b/c")


def test_too_few_open_files_is_one_line(job, tiny_model_dirs):
    """`ulimit -n` of a few: importing the libraries (which scan their directories) runs out
    of file descriptors; that used to be a 100-line traceback."""
    args = ["run", str(job), "-m", str(tiny_model_dirs["llama"]), "--no-progress"]
    failed = []
    for limit in (6, 7):

        def few_files(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        done = subprocess.run(
            [str(BIN / "pagedbatch"), *args], cwd=job.parent, capture_output=True, text=True,
            timeout=600, preexec_fn=few_files,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        if done.returncode:
            assert done.returncode == 1 and done.stderr == (
                f"error: too many open files: this process may open only {limit} at once; "
                "raise ulimit -n\n"
            ), done.stderr
            failed.append(limit)
    assert failed, "no limit was low enough to fail"


def _run_under_address_limit(args: list[str], cwd: Path, limit: int) -> subprocess.CompletedProcess:
    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(
        [str(BIN / "pagedbatch"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=600, preexec_fn=capped,
    )  # fmt: skip


def test_a_model_larger_than_the_address_space_limit_is_one_line(job, tiny_model_dirs, tmp_path):
    """`ulimit -v` below what the model needs: one line naming the limit, before any weight
    loads (past the limit the tokenizer's Rust code aborts the process: exit 134, silent)."""
    big = tmp_path / "big-model"
    shutil.copytree(tiny_model_dirs["llama"], big)
    config = json.loads((big / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16)
    (big / "config.json").write_text(json.dumps(config))  # about 3 GB of float32 weights
    args = ["run", str(job), "-m", str(big), "--device", "cpu", "--threads", "1", "--no-progress"]
    done = _run_under_address_limit(args, job.parent, 2 * 2**30)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: the address-space limit (ulimit -v) leaves this process ")
    assert done.stderr.count("\n") == 1 and "raise ulimit -v" in done.stderr, done.stderr


@pytest.mark.slow
def test_ulimit_v_of_a_million_kib_is_one_line(job, smollm2_dir):
    """The red team's reproduction: `ulimit -v 1000000` and the embedded model."""
    args = ["run", str(job), "--device", "cpu", "--threads", "1", "--no-progress"]
    done = _run_under_address_limit(args, job.parent, 1_000_000 * 1024)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "raise ulimit -v" in done.stderr, done.stderr
