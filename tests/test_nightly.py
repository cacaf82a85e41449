"""What a nightly job (a cron job, a monitor) can trust: exit codes, the summary JSON, the
plan's counts and the words of the final lines. Each test runs the installed `pagedbatch`
command as a process, as a user or a cron job does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from job_helpers import BIN, ROOT, read_lines, write_jsonl


def pagedbatch(args: list[object], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pagedbatch"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def tiny(model_dir: Path, *extra: object, progress: bool = False) -> list[object]:
    return ["-m", model_dir, "--device", "cpu", "--num-blocks", "64", "--max-tokens", "4",
            "--threads", "1", "--progress" if progress else "--no-progress", *extra]  # fmt: skip


# Four records, two of which fail: one lacks the template's field, one has bad params.
REVIEWS = [
    {"id": "a", "text": "Great phone, the battery lasts for days"},
    {"id": "b", "title": "no text here"},
    {"id": "c", "text": "Broke after a week", "max_tokens": -1},
    {"id": "d", "text": "Fine for the price"},
]
TEMPLATE = ["--template", "Review: {text}"]


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)


def test_too_many_failed_records_is_exit_3_with_the_output_complete_and_resumable(
    tmp_path, reviews, tiny_model_dirs
):
    model = tiny_model_dirs["llama"]
    args = ["run", reviews, "-o", "out.jsonl", *tiny(model, *TEMPLATE)]
    done = pagedbatch([*args, "--max-errors", "1", "--summary-json", "summary.json"], tmp_path)
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 4 records failed, more than --max-errors 1 (exit 3)")
    lines = read_lines(tmp_path / "out.jsonl")
    assert sorted(line["id"] for line in lines) == ["a", "b", "c", "d"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["exit_code"]) == ("too_many_errors", 3)
    assert summary["records"] == {
        "input": 4, "written": 4, "ok": 2, "failed": 2, "skipped": 0, "not_run": 0
    }  # fmt: skip
    assert summary["written_by_code"] == {"invalid_params": 1, "invalid_record": 1, "ok": 2}
    generated = sum(line["usage"]["completion_tokens"] for line in lines)
    prompt = sum(line["usage"]["prompt_tokens"] for line in lines)
    assert summary["tokens"]["generated"] == generated > 0
    assert summary["tokens"]["prompt"] == prompt
    assert summary["kv"]["blocks"] == 64 and 1 <= summary["kv"]["peak_blocks"] <= 64
    assert summary["model"] == str(model) and summary["settings"]["max_tokens"] == 4
    assert summary["seconds"]["total"] >= summary["seconds"]["generating"] > 0

    # A resume finds nothing to do; the limits count the whole output, so still exit 3.
    again = pagedbatch([*args, "--resume", "--max-errors", "1"], tmp_path)
    assert again.returncode == 3, again.stderr
    assert "Nothing to do" in again.stderr
    # Half the records failed: a rate of 0.5 allows it, 0.4 does not.
    assert pagedbatch([*args, "--resume", "--max-error-rate", "0.5"], tmp_path).returncode == 0
    over = pagedbatch([*args, "--resume", "--max-error-rate", "0.4", "--summary-json", "-"],
                      tmp_path)  # fmt: skip
    assert over.returncode == 3, over.stderr
    printed = json.loads(over.stdout)  # stdout holds the summary and nothing else
    assert printed["output_by_code"] == {"invalid_params": 1, "invalid_record": 1, "ok": 2}
    assert printed["records"]["skipped"] == 4 and printed["error_limit"].startswith("2 of 4")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-errors", "-1"], "max_errors must be >= 0, got -1"),
        (["--max-error-rate", "1.5"], "max_error_rate must be a fraction from 0 to 1, got 1.5"),
        (["--summary-json", "reviews.jsonl"], "the summary file reviews.jsonl is the same file"),
    ],
)
def test_bad_error_limits_and_summary_paths_are_one_line_errors(tmp_path, reviews, flags, message):
    done = pagedbatch(["run", reviews, *TEMPLATE, *flags], tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert json.loads(reviews.read_text().splitlines()[0]) == REVIEWS[0]


def test_a_run_that_ends_early_leaves_no_summary_of_an_earlier_run(tmp_path, reviews):
    """A monitor must not read last night's summary as tonight's."""
    (tmp_path / "summary.json").write_text('{"status": "ok"}\n')
    done = pagedbatch(
        ["run", reviews, *TEMPLATE, "--model", "./no-such-dir", "--summary-json", "summary.json"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "summary.json").exists()


PLAN = ["-m", "tiny-random", "--device", "cpu", "--num-blocks", "64", "--no-estimate"]


def test_plan_counts_the_invalid_records_by_code(tmp_path, reviews):
    args = ["plan", reviews, *TEMPLATE, *PLAN]
    as_json = pagedbatch([*args, "--json"], tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    plan = json.loads(as_json.stdout)
    assert (plan["records"], plan["would_run"]) == (4, 2)
    assert plan["invalid"] == {"invalid_params": 1, "invalid_record": 1}
    text = pagedbatch(args, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "│ records that would run" in text.stdout and "2 of 4 │" in text.stdout
    assert "1 invalid_params, 1 invalid_record" in text.stdout


def test_plan_of_a_job_whose_every_record_fails_says_none_would_run(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": "Hello", "max_tokens": -5},
        {"id": "b", "prompt": ""},
        {"id": "c", "prompt": "Hi", "temperature": -1},
    ])  # fmt: skip
    text = pagedbatch(["plan", src, *PLAN[:-1]], tmp_path)  # the estimate asked for, too
    assert text.returncode == 0, text.stderr
    assert "0 of 3 │" in text.stdout and "2 invalid_params, 1 invalid_record" in text.stdout
    assert "none: no record would run" in text.stdout
    for nonsense in ("sequences that fit at once", "KV blocks", "prompt tokens"):
        assert nonsense not in text.stdout, text.stdout
    plan = json.loads(pagedbatch(["plan", src, *PLAN, "--json"], tmp_path).stdout)
    assert (plan["records"], plan["would_run"], plan["concurrent_sequences"]) == (3, 0, 0)


@pytest.mark.parametrize("job", [["--choices", "positive,negative,mixed"], ["--n", "3"]])
def test_one_prefix_hit_rate_in_the_lines_the_report_the_summary_and_the_plan(
    tmp_path, tiny_model_dirs, job
):
    """Choices and samples share their record's prompt: the prompt counts once, as in
    the lines' usage, wherever a hit rate is told."""
    src = ROOT / "examples" / "reviews.jsonl"
    model = ["-m", tiny_model_dirs["llama"], "--device", "cpu", "--num-blocks", "1024", *job]
    run = pagedbatch(["run", src, "-o", "out.jsonl", *model, "--max-tokens", "2",
                      "--threads", "1", "--no-progress", "--memory-report",
                      "--summary-json", "summary.json"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    usage = [line["usage"] for line in read_lines(tmp_path / "out.jsonl") if "error" not in line]
    lines = sum(u["cached_tokens"] for u in usage) / sum(u["prompt_tokens"] for u in usage)
    assert lines > 0.3  # the reviews share an instruction
    report = json.loads((tmp_path / "out.memory.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert report["prefix_hit_rate"] == pytest.approx(lines, abs=1e-12)
    assert summary["prefix_hit_rate"] == pytest.approx(lines, abs=1e-4)
    assert summary["tokens"]["prompt"] == sum(u["prompt_tokens"] for u in usage)
    assert f"prefix hit rate │ {lines:.1%}" in " ".join(run.stderr.split())
    plan = pagedbatch(["plan", src, *model, "--no-estimate", "--json"], tmp_path)
    assert json.loads(plan.stdout)["predicted_hit_rate"] == pytest.approx(lines, abs=0.01)


def on_a_terminal(args: list[object], cwd: Path) -> tuple[int, str]:
    """(exit code, what the terminal got) of `pagedbatch ARGS` run on a pseudo-terminal."""
    import fcntl
    import pty
    import struct
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([str(BIN / "pagedbatch"), *map(str, args)], cwd=cwd, env=env,
                               stdin=side, stdout=side, stderr=side)  # fmt: skip
    os.close(side)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the command ended: the terminal is gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(main)
    return process.wait(timeout=600), screen.decode(errors="replace")


def _plain(screen: str) -> list[str]:
    """The terminal's text, one entry per redraw or line, colours left out."""
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    return [part.strip() for part in re.split(r"[\r\n]+", text) if part.strip()]


CHOICES = ["--choices", "positive,negative,mixed"]


def test_a_choices_job_speaks_of_records_per_second_on_a_terminal(tmp_path, tiny_model_dirs):
    """No tok/s of a job that generates nothing; the bar's last state (with its elapsed
    time) comes before the summary and says the same rate."""
    src = ROOT / "examples" / "reviews.jsonl"
    code, screen = on_a_terminal(
        ["run", src, "-o", "out.jsonl", *tiny(tiny_model_dirs["llama"], *CHOICES, progress=True)],
        tmp_path,
    )  # fmt: skip
    assert code == 0, screen
    parts = _plain(screen)
    summary = parts[-1]
    assert summary.startswith("Wrote 61 records") and " s scoring, " in summary, parts
    last_bar = parts[-2]
    assert last_bar.startswith("records") and "61/61" in last_bar and "ETA" not in last_bar
    assert " | elapsed 0:00:" in last_bar
    rate = summary.split(" s scoring, ")[1].split(" records/s")[0]
    assert f" {rate} records/s | elapsed" in last_bar, (last_bar, summary)
    bars = [part for part in parts if part.startswith("records")]
    assert all("elapsed" in bar for bar in bars)
    assert "tok/s" not in screen


def test_the_log_of_a_job_says_each_thing_once_in_words_that_fit(tmp_path, tiny_model_dirs):
    src = ROOT / "examples" / "reviews.jsonl"
    env_args = ["env", "PAGEDBATCH_LOG_INTERVAL=0.01", BIN / "pagedbatch"]
    args = ["run", src, "-o", "out.jsonl", *tiny(tiny_model_dirs["llama"], *CHOICES, progress=True)]
    done = subprocess.run([*map(str, env_args), *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert sum("records 61/61 (100%)" in line for line in lines) == 1, lines
    assert "tok/s" not in done.stderr
    rate = lines[-1].split(" s scoring, ")[1].split(" records/s")[0]
    assert f"records 61/61 (100%) | {rate} records/s |" in done.stderr

    # Resumed with the same records done: the summary does not time the skipping.
    (tmp_path / "out.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "out.jsonl").read_text().splitlines()[:20])
    )
    resumed = pagedbatch([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    last = resumed.stderr.splitlines()[-1]
    assert last.startswith("Wrote 41 records") and last.endswith("; skipped 20 already done.")


def test_a_job_whose_every_record_fails_reports_no_rate(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": "Hello", "max_tokens": -5}, {"id": "b", "prompt": ""},
    ])  # fmt: skip
    env = ["env", "PAGEDBATCH_LOG_INTERVAL=0.01", BIN / "pagedbatch"]
    args = ["run", src, "-o", "out.jsonl", *tiny(tiny_model_dirs["llama"], progress=True)]
    done = subprocess.run([*map(str, env), *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "records/s" not in done.stderr and "tok/s" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        "in "
        + done.stderr.split(" in ")[-1].split(" s")[0]
        + " s: no record ran (each failed before it started)."
    )


def _chart(path: Path) -> dict[str, float]:
    """What the memory chart's PNG says of itself: its y-axis top, the pool, the peak held."""
    from PIL import Image

    words = Image.open(path).info["Description"].replace(";", "").split()
    return {"top": float(words[3]), "pool": float(words[8]), "held": float(words[12])}


def test_the_memory_chart_spans_the_jobs_peak_with_the_pool_as_a_line(tmp_path, tiny_model_dirs):
    src = ROOT / "examples" / "reviews.jsonl"
    model = ["-m", tiny_model_dirs["llama"], "--max-tokens", "8", "--threads", "1",
             "--no-progress", "--memory-report"]  # fmt: skip
    for blocks in (4096, 400):  # a pool far above the job's peak; one it nearly fills
        out = f"out{blocks}.jsonl"
        run = pagedbatch(["run", src, "-o", out, "--num-blocks", blocks, *model], tmp_path)
        assert run.returncode == 0, run.stderr
        assert f"Memory report: out{blocks}.memory.json, out{blocks}.memory.png" in run.stderr
        chart = _chart(tmp_path / f"out{blocks}.memory.png")
        assert chart["pool"] == blocks and 0 < chart["held"] <= blocks
        if blocks == 4096:  # the axis ends near the peak, not at the pool
            assert chart["held"] < chart["top"] <= 1.2 * chart["held"], chart
        else:  # the pool is on the chart
            assert blocks < chart["top"] <= 1.2 * blocks, chart


def test_without_matplotlib_the_report_says_why_there_is_no_chart(tmp_path, tiny_model_dirs):
    hidden = tmp_path / "hide"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello there"}])
    done = subprocess.run(
        [str(BIN / "pagedbatch"), "run", str(src), "-o", "out.jsonl", "--memory-report",
         *map(str, tiny(tiny_model_dirs["llama"]))],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(hidden)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "Memory report: out.memory.json; no chart out.memory.png: matplotlib is not installed "
        "(pip install matplotlib, or scripts/setup.sh)"
    )
    assert not (tmp_path / "out.memory.png").exists()


def test_setup_installs_matplotlib_for_the_chart_the_readme_promises():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    extras = next(line for line in setup.splitlines() if line.startswith("extras="))
    assert "report" in extras.split('"')[1].split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'report = ["matplotlib' in pyproject


def _seconds(clock: str) -> int:
    h, m, s = (int(part) for part in clock.split(":"))
    return 3600 * h + 60 * m + s


def test_the_logged_eta_foretells_the_end_of_a_job(tmp_path, tiny_model_dirs):
    """Every record generates its max_tokens (EOS ignored): the work is known, and the ETA
    of each line from a fifth of the job on puts its end near the real one (the exact
    figures: tests/test_progress.py's simulated job)."""
    rows = [{"id": i, "prompt": f"review {i}: " + "the fabric is soft and warm " * (1 + i % 5)}
            for i in range(480)]  # fmt: skip
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = [BIN / "pagedbatch", "run", src, "-o", "out.jsonl", "-m", tiny_model_dirs["llama"],
            "--device", "cpu", "--num-blocks", "512", "--max-tokens", "64", "--ignore-eos",
            "--max-num-seqs", "32", "--threads", "1"]  # fmt: skip
    done = subprocess.run(
        [str(a) for a in args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PAGEDBATCH_LOG_INTERVAL": "0.25"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("records ")]
    total = _seconds(lines[-1].split("elapsed ")[1].split(" ")[0])
    assert total >= 3, "too short a job to time"
    ends = []
    for line in lines[:-1]:
        if "ETA -" in line:
            continue
        eta = _seconds(line.split("ETA ")[1].split(" ")[0])
        elapsed = _seconds(line.split("elapsed ")[1].split(" ")[0])
        if elapsed >= total / 5:
            ends.append(elapsed + eta)
    assert ends, lines
    # Within half the job's time (the clock shows whole seconds; the machine is shared):
    # a moving average of tokens/s said several times the job's time early on.
    assert all(abs(end - total) <= max(0.5 * total, 3) for end in ends), (total, ends, lines)


def test_the_readme_says_what_its_first_command_does_when_run_again(tmp_path, tiny_model_dirs):
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "pagedbatch run examples/" in line)
    command = first.split("&& ")[1].replace(".venv/bin/pagedbatch ", "").split()
    assert command[:2] == ["run", "examples/reviews.jsonl"], first
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "reviews.jsonl").write_bytes((ROOT / command[1]).read_bytes())
    model = tiny(tiny_model_dirs["llama"])
    assert pagedbatch([*command, *model], tmp_path).returncode == 0
    again = pagedbatch([*command, *model], tmp_path)
    assert again.returncode == 2
    said = again.stderr.strip().removeprefix("error: ")
    assert said.startswith("out.jsonl already exists (61 records done); pass --resume")
    assert f"`error: {said.split('; ')[0]}; pass --resume to continue that job" in " ".join(
        readme.split()
    )
    resumed = pagedbatch([*command, *model, "--resume"], tmp_path)
    assert "Nothing to do: all 61 records are already in out.jsonl." in resumed.stderr


def test_the_library_does_not_print_a_progress_bar_while_it_loads(tmp_path, tiny_model_dirs):
    code = (
        "from pagedbatch import LLM\n"
        "from transformers.utils import logging\n"
        f"LLM({str(tiny_model_dirs['llama'])!r}, device='cpu', num_blocks=16)\n"
        "print(logging.is_progress_bar_enabled())\n"  # the caller's setting, as it was
    )
    done = subprocess.run([str(BIN / "python"), "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr, done.stderr


def test_plan_states_the_basis_and_range_of_its_time_estimate(tmp_path):
    src = ROOT / "examples" / "reviews.jsonl"
    args = ["plan", src, "-m", "tiny-random", "--device", "cpu", "--threads", "1", "--probe"]
    as_json = pagedbatch([*args, "--json"], tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    e = json.loads(as_json.stdout)["estimate"]
    assert 0 < e["low_seconds"] < e["seconds"]
    assert e["basis"].startswith("rates from a probe of this model just now: prefill ")
    assert "the range is every output of one token to every output at max_tokens" in e["basis"]
    assert 0 < e["load_seconds"] <= e["probe_seconds"]
    text = pagedbatch(args, tmp_path).stdout
    flat = " ".join(text.replace("│", " ").split())
    assert "(outputs of 1 token to all at max_tokens; model load not included)" in flat
    assert "probe just now (" in flat
    scored = " ".join(pagedbatch([*args, *CHOICES], tmp_path).stdout.replace("│", " ").split())
    assert "(scoring, no outputs; model load not included)" in scored
    assert "decode" not in scored and "max_tokens" not in scored
