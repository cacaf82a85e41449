"""The job's progress: an ETA that does not jump when records finish in bursts, plain lines
when stderr is not a terminal, and help that reads as a command's."""

from __future__ import annotations

import math
import random
import re

from job_helpers import invoke, tiny_args, write_jsonl
from typer.testing import CliRunner

from pagedbatch.cli.app import app
from pagedbatch.cli.eta import RATE_TIME_CONSTANT, Eta
from pagedbatch.cli.progress import clock


def test_eta_counts_tokens_left_at_the_smoothed_rate():
    eta = Eta(records=10, prior_tokens_per_record=8)
    assert eta.seconds_left() is None  # no rate yet
    eta.step(0.0, 0)
    eta.step(1.0, 40)  # 40 tok/s
    assert eta.rate == 40
    assert eta.tokens_left == 10 * 8 - 40  # the prior, less what running records made
    assert math.isclose(eta.seconds_left(), 1.0)
    eta.step(2.0, 60)  # 20 tok/s for a second: the average moves a little towards it
    alpha = 1 - math.exp(-1 / RATE_TIME_CONSTANT)
    assert math.isclose(eta.rate, 40 + alpha * (20 - 40))
    for _ in range(4):  # four records finish with 5 tokens each: the mean replaces the prior
        eta.record_done(5)
    assert eta.tokens_left == 0  # 6 x 5 left, but the running ones made 60 - 20 already
    eta.step(3.0, 60)
    eta.record_done(0)  # a record that generated nothing: the mean is now 20 / 5 = 4
    assert eta.tokens_left == 0  # 5 left x 4 = 20, less the 40 the running made: never < 0
    eta.record_done(40)  # the mean is now 10 over 6 records, 4 left, none running
    assert math.isclose(eta.tokens_left, 4 * 10)
    assert math.isclose(eta.seconds_left(), 40 / eta.rate)


def test_eta_does_not_jump_when_a_burst_of_records_finishes():
    # A steady 100 tok/s; records end in bursts of 20 every 2 s (10 tokens each).
    eta, estimates, generated = Eta(records=200, prior_tokens_per_record=10), [], 0
    for tick in range(1, 201):
        now = tick * 0.1
        generated += 10
        eta.step(now, generated)
        if tick % 20 == 0:
            for _ in range(20):
                eta.record_done(10)
        if tick >= 10:
            estimates.append(now + eta.seconds_left())  # the predicted end
    # The true end is 20 s; every prediction along the way is within 1 s of it.
    assert all(abs(end - 20) < 1.0 for end in estimates), estimates


def test_clock():
    assert clock(None) == "-:--:--"
    assert clock(3725.4) == "1:02:05"


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("PAGEDBATCH_LOG_INTERVAL", "0.01")
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p {i}"} for i in range(6)])
    args = [a for a in tiny_args(tiny_model_dirs["llama"]) if a != "--no-progress"]
    result = invoke(src, "-o", tmp_path / "out.jsonl", *args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    last = [line for line in lines if line.startswith("records ")][-1]
    assert re.fullmatch(
        r"records 6/6 \(100%\) \| [\d.]+ tok/s \| elapsed \d:\d\d:\d\d \| "
        r"KV \d+ used \+ \d+ cached / 64 blocks",
        last,
    ), last
    assert "\x1b" not in result.stderr and "…" not in result.stderr  # no redraws, no cuts
    # Each phase before generation ends with a line of what it did and how long it took.
    took = r" \(\d:\d\d:\d\d\)"
    phases = [rf"reading .*in\.jsonl: 6 records, [\d,]+/s{took}", rf"loading .*llama{took}",
              rf"tokenized 6/6 records{took}"]  # fmt: skip
    at = [next(i for i, line in enumerate(lines) if re.fullmatch(p, line)) for p in phases]
    assert at == sorted(at) and at[-1] < lines.index(last), lines
    assert re.search(r"Wrote 6 records .* s generating, [\d.]+ output tok/s, float32\)", lines[-1])


def test_help_reads_as_a_commands():
    result = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    for name in ("run", "plan", "bench"):  # one sentence each, not cut mid-way
        assert re.search(rf"│ {name} +[A-Z][^│]*\. +│", result.output), result.output
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=100)
    assert "run [OPTIONS] INPUT" in result.output
    assert "<bool>" not in result.output and "{input}" not in result.output
    assert re.search(r"--output +-o +PATH", result.output), result.output


def test_one_record_is_not_records(tmp_path, tiny_model_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    result = invoke(src, "-o", tmp_path / "out.jsonl", *tiny_args(tiny_model_dirs["llama"]))
    assert "Wrote 1 record to" in result.stderr


def test_the_reading_phase_counts_records_and_their_rate():
    import io
    import time

    from rich.console import Console

    from pagedbatch.cli.progress import JobProgress

    output = io.StringIO()
    progress = JobProgress(Console(file=output), enabled=True)  # not a terminal
    began = time.monotonic()
    with progress.phase("reading big.jsonl"):
        assert re.fullmatch(r"reading big\.jsonl \(\d:\d\d:\d\d\)", progress.line())
        time.sleep(0.05)
        progress.counted(12_345)
        line = progress.line()
        seconds = time.monotonic() - began  # at least what the line counted, however loaded
    assert re.fullmatch(r"reading big\.jsonl: 12,345 records, [\d,]+/s \(\d:\d\d:\d\d\)", line)
    rate = int(line.split(", ")[1].split("/s")[0].replace(",", ""))
    assert 12_345 / seconds - 1 <= rate <= 12_345 / 0.05  # records over the seconds since it began
    # The phase's last line says the same, printed once the next phase begins (an error
    # found between the two stays the only line).
    assert output.getvalue() == ""
    with progress.phase("loading m"):
        assert output.getvalue().startswith("reading big.jsonl: 12,345 records, ")


def test_error_lines_written_first_do_not_make_the_eta_zero():
    """Records that fail are written before any step, with no output: they count as done,
    not in the mean output of a record (which made the ETA 0:00:00 at 7% of a job)."""
    eta = Eta(records=10, prior_tokens_per_record=8)
    for _ in range(4):
        eta.record_done(0, failed=True)
    eta.step(0.0, 0)
    eta.step(1.0, 8)  # 8 tok/s
    assert eta.records_done == 4
    assert eta.tokens_left == 6 * 8 - 8  # the prior still, for the 6 records left
    assert math.isclose(eta.seconds_left(), 5.0)
    eta.record_done(8)  # the first record that generated: its output is the mean now
    assert eta.tokens_left == 5 * 8


def _predicted_ends(lengths: list[int], prior: float, width: int) -> tuple[float, list[float]]:
    """A job whose record k generates lengths[k] tokens, `width` records running at a time,
    one token each per 0.1 s step: (when it ends, the end the ETA predicts after each step
    while records remain)."""
    eta, now, made, running, queue = Eta(len(lengths), prior), 0.0, 0, {}, list(lengths)
    eta.step(now, 0, running=0)
    ends = []
    while queue or running:
        while len(running) < width and queue:
            k = len(lengths) - len(queue)
            running[k] = queue.pop(0)
        now += 0.1
        made += len(running)
        for k in [k for k in running if running[k] == 1]:
            eta.record_done(lengths[k])
            del running[k]
        running = {k: left - 1 for k, left in running.items()}
        eta.step(now, made, running=len(running))
        if queue or running:
            ends.append(now + eta.seconds_left())
    return now, ends


def test_eta_holds_when_short_records_finish_first():
    """Records stopping at EOS end first, so the mean of those done is low: a running
    record is expected to end between what it has made and max_tokens (the prior), and the
    ETA neither drops towards 0 while records run nor jumps back up."""
    end, ends = _predicted_ends([2 + 2 * k for k in range(20)], prior=40, width=20)
    assert math.isclose(end, 4.0)
    # (Counting only the done records' mean predicted 0.4 s at first, creeping up to 3.7.)
    assert all(2.0 <= e <= 4.0 + 0.1 for e in ends[1:]), ends
    lengths = [random.Random(k).randint(1, 64) for k in range(200)]
    end, ends = _predicted_ends(lengths, prior=64, width=20)
    later = ends[len(ends) // 10 :]
    assert all(abs(e - end) < 0.15 * end for e in later), (end, later)
    # Every record at its max_tokens: exact from the first step.
    end, ends = _predicted_ends([10] * 200, prior=10, width=20)
    assert all(math.isclose(e, end) for e in ends), ends


def test_the_prior_is_the_records_own_max_tokens(tiny_model_dirs):
    """`on_prepared` tells the mean max_tokens x n of the records that passed the checks."""
    from pagedbatch import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    told = []
    records = [
        {"id": "a", "prompt": "one", "max_tokens": 2},
        {"id": "b", "prompt": "two", "max_tokens": 6, "n": 2},
        {"id": "c", "prompt": "three"},  # the default, 4
        {"id": "d", "prompt": "bad", "max_tokens": -1},  # an error: not counted
    ]
    llm.generate(records, SamplingParams(max_tokens=4), on_prepared=lambda *a: told.append(a))
    assert told[-1] == (4, 4, (2 + 12 + 4) / 3)
    told.clear()
    llm.generate(
        records[:1], SamplingParams(choices=("x", "y")), on_prepared=lambda *a: told.append(a)
    )
    assert told[-1] == (1, 1, 0.0)  # choices are scored: nothing generated


def _simulated_job(eta: Eta, *, tell_computed: bool) -> list[tuple[float, float]]:
    """A job of 240 records (120-token prompts, 32 output tokens each) on an engine whose
    step takes 0.05 s + 10 ms a sampled token + 2 ms a prompt token, running at most 64
    sequences and 1024 tokens a step: a prefill-heavy start, a batch that grows, a tail.
    Returns (time, predicted end) after every step."""
    now, generated, computed, ends = 0.0, 0, 0, []
    waiting, running = [120] * 240, []  # prompt tokens left of each; running: [left, made]
    while waiting or running:
        budget, sampled, prompt = 1024, 0, 0
        for seq in running:  # decode first, a token each
            seq[1] += 1
            sampled += 1
            budget -= 1
        while waiting and len(running) < 64 and budget > 0:
            chunk = min(waiting[0], budget)
            waiting[0] -= chunk
            budget -= chunk
            prompt += chunk
            if waiting[0] == 0:
                waiting.pop(0)
                running.append([0, 1])  # its first token sampled with its last chunk
                sampled += 1
        now += 0.05 + 0.010 * sampled + 0.002 * prompt
        generated += sampled
        computed += sampled + prompt
        for seq in [s for s in running if s[1] >= 32]:
            running.remove(seq)
            eta.record_done(32)
        eta.step(now, generated, len(running), computed if tell_computed else None)
        left = eta.seconds_left()
        if left is not None:
            ends.append((now, now + left))
    return ends


def test_the_eta_prices_prompts_and_outputs_at_the_measured_step_costs():
    """A moving average of tokens/s, taken while the batch grows and prompts are computed,
    put the end of a 3-minute job at 3x its time in its first third; the step costs fitted
    from the engine's computed and sampled tokens put it within 15% from the first tenth."""
    ends = _simulated_job(Eta(240, 32), tell_computed=True)
    finish = ends[-1][0]
    for now, end in ends:
        if now >= 0.1 * finish:
            assert abs(end - finish) <= 0.15 * finish, (now, end, finish)
    blind = _simulated_job(Eta(240, 32), tell_computed=False)
    early = [end for now, end in blind if 0.02 * finish <= now <= 0.1 * finish]
    assert max(early) > 1.5 * finish  # what the rate alone said
