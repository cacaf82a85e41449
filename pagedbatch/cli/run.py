"""`pagedbatch run`: Typer options in, Rich progress and JSONL out."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pagedbatch.cli import options as shared
from pagedbatch.cli.cluster import RayOptions, load_ray_llm, ray_note, ray_options
from pagedbatch.cli.common import Float, Int, Str, console, fail, first_line, opt, quiet_libraries
from pagedbatch.cli.options import (
    DEFAULT,
    INPUT_PANEL,
    MEMORY_PANEL,
    MODEL_PANEL,
    OUTPUT_PANEL,
    RAY_PANEL,
    SAMPLING_PANEL,
)
from pagedbatch.cli.progress import JobProgress
from pagedbatch.job.interrupts import Interrupts, Stopped
from pagedbatch.job.job import JobResult, ResumePolicy
from pagedbatch.job.outcome import TOO_MANY_ERRORS, RunTimes, error_limit_problem, run_summary
from pagedbatch.job.settings import RunSettings, resolve_settings

if TYPE_CHECKING:
    from pagedbatch.generator import Generator
    from pagedbatch.job.job import Job


def run(
    ctx: typer.Context,
    input: shared.Input,
    output: Annotated[Path | None, opt(OUTPUT_PANEL, "Output JSONL path. [default: <input name>.output.jsonl]", "--output", "-o")] = None,
    resume: Annotated[bool | None, opt(OUTPUT_PANEL, "Continue the job whose output this is: skip every record it holds, run the rest.", "--resume")] = None,
    retry_errors: Annotated[bool | None, opt(OUTPUT_PANEL, "Resume, and run again the records whose line is an error.", "--retry-errors")] = None,
    overwrite: Annotated[bool | None, opt(OUTPUT_PANEL, "Start over, replacing an output that already has lines.", "--overwrite")] = None,
    force: Annotated[bool | None, opt(OUTPUT_PANEL, "Resume even though the job fingerprint stored beside the output differs.", "--force")] = None,
    errors: Annotated[Path | None, opt(OUTPUT_PANEL, "Also write each failed record's input line, with its error, to this file (feed it back as input).")] = None,
    max_errors: Annotated[Int, opt(OUTPUT_PANEL, f"Exit {TOO_MANY_ERRORS} (not 0) when more than N records of the output failed (its error lines, those of earlier runs resumed included); the output is still complete and resumable. [default: no limit]", "--max-errors")] = None,
    max_error_rate: Annotated[Float, opt(OUTPUT_PANEL, f"Exit {TOO_MANY_ERRORS} when more than this fraction (0 to 1) of the output's records failed. [default: no limit]", "--max-error-rate")] = None,
    summary_json: Annotated[Path | None, opt(OUTPUT_PANEL, "At the end, write the run's summary as JSON to this file (- for stdout): status and exit code, records by outcome and error code, tokens, seconds, prefix hit rate, peak KV, model and settings.", "--summary-json")] = None,
    order: Annotated[Str, opt(OUTPUT_PANEL, f"completion (lines as records finish) or input (the lines of a sequential run, in input order). [default: {DEFAULT.order}]")] = None,
    config: shared.Config = None,
    split: shared.Split = None,
    prompt_field: shared.PromptField = None,
    messages_field: shared.MessagesField = None,
    id_field: shared.IdField = None,
    template: shared.Template = None,
    system: shared.System = None,
    chat: shared.Chat = None,
    chat_template_kwargs: Annotated[Str, opt(INPUT_PANEL, 'Variables for the chat template, as a JSON object, e.g. \'{"enable_thinking": false}\' (a record\'s chat_template_kwargs win, key by key).', "--chat-template-kwargs")] = None,
    lenient: Annotated[bool | None, opt(INPUT_PANEL, "OpenAI batch input: run a request whose body has fields pagedbatch does not support without them (counted in the summary) instead of writing it as an invalid_params error.", "--lenient")] = None,
    skip_invalid: Annotated[bool | None, opt(INPUT_PANEL, "Turn lines that are not JSON objects into invalid_record error lines instead of stopping.", "--skip-invalid")] = None,
    model: shared.Model = None,
    device: shared.Device = None,
    dtype: shared.Dtype = None,
    quantize: shared.Quantize = None,
    attention: Annotated[Str, opt(MODEL_PANEL, "Attention implementation: auto (triton on CUDA when Triton imports, else torch), torch or triton. [default: auto]")] = None,
    max_model_len: shared.MaxModelLen = None,
    cache_dir: shared.CacheDir = None,
    threads: shared.Threads = None,
    cuda_graphs: shared.CudaGraphs = None,
    tensor_parallel: shared.TensorParallel = None,
    block_size: shared.BlockSize = None,
    num_blocks: shared.NumBlocks = None,
    kv_memory: shared.KvMemory = None,
    kv_dtype: shared.KvDtype = None,
    max_batch_tokens: shared.MaxBatchTokens = None,
    max_num_seqs: shared.MaxNumSeqs = None,
    max_tokens: shared.MaxTokens = None,
    temperature: Annotated[Float, opt(SAMPLING_PANEL, f"0 is greedy. [default: {DEFAULT.sampling.temperature}]")] = None,
    top_p: Annotated[Float, opt(SAMPLING_PANEL, f"Nucleus sampling mass, in (0, 1]. [default: {DEFAULT.sampling.top_p}]")] = None,
    top_k: Annotated[Int, opt(SAMPLING_PANEL, f"Sample among the k most likely tokens; 0 is off. [default: {DEFAULT.sampling.top_k}]")] = None,
    seed: Annotated[Int, opt(SAMPLING_PANEL, f"Job seed: a record without its own seed samples with a seed derived from this and its id. [default: {DEFAULT.sampling.seed}]")] = None,
    stop: Annotated[list[str] | None, opt(SAMPLING_PANEL, "Stop string (repeatable); the text ends before it.")] = None,
    logprobs: Annotated[Int, opt(SAMPLING_PANEL, "Report each generated token's log-probability and the K most likely tokens at its position, 0 to 20 (a record's logprobs wins). [default: none reported]", "--logprobs")] = None,
    reasoning_parser: Annotated[Str, opt(MODEL_PANEL, "Split a thinking model's output into reasoning and text: auto (when the tokenizer has <think> and </think> tokens and its chat template uses them), think, or none. [default: auto]", "--reasoning-parser")] = None,
    reasoning_budget: Annotated[Int, opt(SAMPLING_PANEL, "Thinking tokens a thinking model may spend before its </think> is forced; the answer then has max_tokens of its own (a record's reasoning_budget wins). [default: none: max_tokens counts thinking and answer]", "--reasoning-budget")] = None,
    choices: shared.Choices = None,
    choice_score: shared.ChoiceScore = None,
    n: shared.N = None,
    json_schema: shared.JsonSchema = None,
    json_object: shared.JsonObject = None,
    regex: shared.Regex = None,
    grammar: shared.Grammar = None,
    repetition_penalty: Annotated[Float, opt(SAMPLING_PANEL, "Divide the positive logits of the tokens already in the prompt or output, multiply the negative ones (transformers' repetition penalty; > 0, 1 is off). [default: 1]", "--repetition-penalty")] = None,
    presence_penalty: Annotated[Float, opt(SAMPLING_PANEL, "Subtract this from the logit of every token already in the output (OpenAI's; -2 to 2). [default: 0]", "--presence-penalty")] = None,
    frequency_penalty: Annotated[Float, opt(SAMPLING_PANEL, "Subtract this times its count from the logit of every token already in the output (OpenAI's; -2 to 2). [default: 0]", "--frequency-penalty")] = None,
    min_p: Annotated[Float, opt(SAMPLING_PANEL, "Sample only among tokens at least this fraction as probable as the most probable one, after temperature (0 to 1). [default: 0, off]", "--min-p")] = None,
    logit_bias: Annotated[Str, opt(SAMPLING_PANEL, 'Add to token logits before sampling: a JSON object of token id to bias, -100 to 100 (\'{"50256": -100}\'). [default: none]', "--logit-bias")] = None,
    min_tokens: Annotated[Int, opt(SAMPLING_PANEL, "Generate at least this many tokens: EOS and the stop token ids are not sampled and stop strings do not end the output before. [default: 0]", "--min-tokens")] = None,
    stop_token_ids: Annotated[Str, opt(SAMPLING_PANEL, "Token ids that end the output as EOS does, comma-separated (\"7,42\"). [default: none]", "--stop-token-ids")] = None,
    ignore_eos: Annotated[bool | None, opt(SAMPLING_PANEL, "Generate max_tokens tokens even past EOS (benchmarks). [default: stop-at-eos]", "--ignore-eos/--stop-at-eos")] = None,
    prefix_sharing: shared.PrefixSharing = None,
    cascade: Annotated[bool | None, opt(MEMORY_PANEL, "Attend to shared prefix pages once per step for all the records that share them, then each to its own tokens, merged exactly (attention torch: decoding records behind a shared prefix of 512+ tokens; not in decode steps replayed from CUDA graphs). [default: cascade]", "--cascade/--no-cascade")] = None,
    memory_report: Annotated[bool | None, opt(OUTPUT_PANEL, "At the end, show the KV memory report and write it to <output>.memory.json (and .memory.png with matplotlib).", "--memory-report")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the live progress display.", rich_help_panel=OUTPUT_PANEL)] = True,
    ray: Annotated[bool | None, opt(RAY_PANEL, "Run the job on a Ray cluster: replicas of the model take shards of it, this process writes the output (needs pip install -e \".[ray]\").", "--ray")] = None,
    ray_address: Annotated[Str, opt(RAY_PANEL, "The cluster to join. [default: auto, the one running on this machine (never another job's own), else a local one started for the job]", "--ray-address")] = None,
    replicas: Annotated[Int, opt(RAY_PANEL, "Replicas of the model, each on one GPU (or CPU slot) of the cluster, or on --tensor-parallel N of one node. [default: as many as the nodes' GPUs hold, or the nodes without GPUs]", "--replicas")] = None,
) -> None:  # fmt: skip
    """Generate a completion for every record of INPUT and write them to a JSONL file."""
    given = {k: v for k, v in locals().items() if v is not None and k not in _NOT_SETTINGS}
    cluster = ray_options(ray, ray_address, replicas)
    try:
        settings = resolve_settings(given, config)
        policy = ResumePolicy(
            resume=bool(resume), overwrite=bool(overwrite), force=bool(force),
            retry_errors=bool(retry_errors),
        )  # fmt: skip
    except ValueError as e:
        fail(str(e))
    _run_job(input, settings, policy, progress, resume_command(ctx), cluster)


# Flags of one invocation, not settings; a resume command leaves them out.
_NOT_RESUMED = ("resume", "retry_errors", "overwrite", "force")
_NOT_SETTINGS = (
    "ctx", "input", "config", "progress", "ray", "ray_address", "replicas", *_NOT_RESUMED,
)  # fmt: skip


def resume_command(ctx: typer.Context) -> str:
    """The command line that resumes this run: its arguments as given, plus --resume."""
    words = ["pagedbatch", "run"]
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in _NOT_RESUMED or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[name]
        if param.param_type_name != "option":  # (typer vendors click: no isinstance checks)
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            flag = max(param.opts, key=len)
            for item in value if param.multiple else [value]:
                words += [flag, str(item)]
    return shlex.join([*words, "--resume"])


def _run_job(
    source: str, settings: RunSettings, policy: ResumePolicy, show_progress: bool, resume: str,
    cluster: RayOptions | None = None,
) -> None:  # fmt: skip
    from pagedbatch.inputs.reader import InputError
    from pagedbatch.job.job import Job, JobError
    from pagedbatch.models.names import ModelLoadError, resolve_model_name

    started, loading = time.monotonic(), 0.0
    with (
        Interrupts() as interrupts,
        contextlib.ExitStack() as files,
        JobProgress(console, show_progress) as progress,
    ):
        try:
            with progress.phase(f"reading {source}"):
                job = files.enter_context(Job(source, settings, policy, progress.counted))
            _drop_stale_summary(settings.summary_json)
            if job.input_note:
                console.print(job.input_note, soft_wrap=True, markup=False, highlight=False)
            llm = None
            if job.todo:
                resolve_model_name(settings.engine.model)
                where = " on Ray replicas" if cluster else ""
                with progress.phase(f"loading {settings.engine.model}{where}"):
                    loaded = time.monotonic()
                    llm = _load_llm(settings, cluster)
                    loading = time.monotonic() - loaded
                # the replicas and a cluster started here; the tensor-parallel workers
                files.callback(llm.close)
            interrupts.on_first = _say_stopping
            interrupts.on_second = lambda signum: _exit_now(job, signum, resume)
            interrupts.started = True  # from here a signal stops the job between steps
        except Stopped as e:
            fail(f"stopped by {e.name} before the job started; nothing was written", e.exit_code)
        except (InputError, JobError, ModelLoadError) as e:
            fail(str(e))
        result = _run_with_progress(job, llm, interrupts, progress, resume)
        times = RunTimes(time.monotonic() - started, loading, progress.generation_seconds)
        _summary(job, result, llm, times.total, times.generating)
        if cluster is not None and llm is not None:
            ray_note(llm)
        if llm is not None and settings.engine.memory_report:
            _memory_report(llm, job.output)
        interrupted = interrupts.requested() and result.not_run > 0
        too_many = error_limit_problem(settings, result)
        code = interrupts.exit_code if interrupted else TOO_MANY_ERRORS if too_many else 0
        if settings.summary_json is not None:
            status = "interrupted" if interrupted else "too_many_errors" if too_many else "ok"
            summary = run_summary(
                job, result, status=status, exit_code=code, times=times, error_limit=too_many,
                stats=llm.stats() if llm is not None else None,
                peak_kv_bytes=llm.memory_report()["paged_peak_bytes"] if llm is not None else None,
            )  # fmt: skip
            _write_summary(summary, settings.summary_json)
    if interrupted:
        console.print(
            f"Interrupted by {interrupts.name}: {records(result.not_run)} not run yet. "
            f"Resume with:\n  {resume}",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
        raise typer.Exit(code)
    if too_many:
        fail(f"{too_many} (exit {code}); every line is written: fix the failed records "
             "and run them again with --retry-errors", code=code)  # fmt: skip


def _load_llm(settings: RunSettings, cluster: RayOptions | None = None) -> Any:
    from pagedbatch.engine.tensor_parallel import TensorParallelError
    from pagedbatch.llm import LLM
    from pagedbatch.models.names import ModelLoadError
    from pagedbatch.models.weights import model_bytes

    if cluster is not None:
        return load_ray_llm(settings, cluster)
    quiet_libraries()
    try:
        llm = LLM(config=settings.engine)
    except (ModelLoadError, ValueError, TensorParallelError) as e:
        fail(str(e))
    except (RuntimeError, MemoryError) as e:  # the KV cache (or the model) does not fit
        fail(f"cannot load {settings.engine.model} with this KV cache ({first_line(e)}); "
             "lower --num-blocks or --kv-memory", code=1)  # fmt: skip
    if llm.quantization is not None:
        console.print(
            f"Weights: {llm.quantization.description}; {model_bytes(llm.model) / 2**20:,.1f} MiB.",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
    if llm.kv_cache.quantized:
        console.print(
            f"KV cache: {str(llm.kv_cache.spec.dtype).removeprefix('torch.')}, a scale per "
            f"layer and KV head: {llm.kv_cache.scales_source}.",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
    if llm.cuda_graphs_problem:
        console.print(
            f"CUDA graphs are off, decode runs eagerly: {llm.cuda_graphs_problem}",
            style="yellow", soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
    return llm


def _run_with_progress(
    job: Job, llm: Generator | None, interrupts: Interrupts, progress: JobProgress, resume: str
) -> JobResult:
    if llm is None:
        return job.run(None, should_stop=interrupts.requested)
    import torch

    from pagedbatch.engine.tensor_parallel import TensorParallelError
    from pagedbatch.inputs.reader import InputError
    from pagedbatch.ray.cluster import ClusterError  # (it imports Ray only when asked)

    prior = job.settings.sampling.most_output_tokens
    progress.generating(len(job.todo), prior_tokens_per_record=prior)
    try:
        return job.run(
            llm, should_stop=interrupts.requested, on_step=progress.step,
            on_output=lambda output: progress.record_done(
                output.completion_tokens, failed=output.error is not None
            ),
            on_prepared=progress.prepared,
        )  # fmt: skip
    except (
        InputError,
        TensorParallelError,
        ClusterError,
    ) as e:  # the input changed, a rank died, the Ray cluster went away
        fail(f"{e}; the lines before are safe. Resume with: {resume}", code=1)
    except OSError as e:
        where = e.filename or job.output
        fail(f"cannot write {where}: {e.strerror or e}; the lines before are safe. "
             f"Resume with: {resume}", code=1)  # fmt: skip
    except torch.OutOfMemoryError as e:
        fail(f"out of memory in a step ({first_line(e)}); lower --kv-memory, "
             f"--max-batch-tokens or --max-num-seqs, then resume with: {resume}", code=1)  # fmt: skip
    finally:
        progress.finish()


def _say_stopping(signum: int) -> None:
    name = signal.Signals(signum).name
    _raw_stderr(f"\n{name}: stopping after the current step (again: exit at once)\n")


def _exit_now(job: Job, signum: int, resume: str) -> None:
    """The second signal: cut the files to whole lines, say how to resume, exit."""
    job.abandon()
    name = signal.Signals(signum).name
    _raw_stderr(
        f"\n{name} again: exiting now; {job.output} ends on a whole line. "
        f"Resume with:\n  {resume}\n"
    )
    os._exit(128 + signum)


def _raw_stderr(text: str) -> None:
    """Write from a signal handler: no Rich, no Python buffers (which may be mid-write)."""
    show_cursor = "\x1b[?25h" if os.isatty(2) else ""
    with contextlib.suppress(OSError):
        os.write(2, (show_cursor + text).encode(errors="replace"))


def records(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"


def _summary(
    job: Job, result: JobResult, llm: Generator | None, seconds: float, generating: float
) -> None:
    if not job.records:
        console.print(
            f"The input has no records; {job.output} is empty.",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
        return
    if not job.todo:
        console.print(
            f"Nothing to do: all {records(len(job.records))} are already in {job.output}.",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
        return
    codes = result.codes
    failed = result.failed
    detail = ", ".join(f"{n} {code}" for code, n in sorted(codes.items()) if code != "ok")
    text = f"Wrote {records(result.written)} to {job.output} ({codes['ok']} ok" + (
        f", {failed} failed: {detail})" if failed else ")"
    )
    text += f" in {seconds:.1f} s"
    if llm is not None:
        text += _run_figures(llm.stats(), codes["ok"], generating, llm.dtype)
    if result.incomplete:
        text += (
            f"; {records(result.incomplete)} cut before the end of their constraint "
            "(no parsed value)"
        )
    if result.skipped:
        text += f"; skipped {result.skipped} already done"
    if job.index.ignored:
        fields = ", ".join(f"{name!r} in {records(n)}" for name, n in job.index.ignored.items())
        text += f"; ran without unsupported body fields (--lenient): {fields}"
    if failed and job.errors_path is not None:
        text += f"; failed records in {job.errors_path}"
    console.print(text + ".", soft_wrap=True, markup=False, highlight=False)


def _run_figures(stats: Any, ran: int, generating: float, dtype: str) -> str:
    """' (12.0 s generating, 43.4 output tok/s, bfloat16); peak KV ...' for the records that ran: a
    job that generates nothing (choices are scored) in records/s; none when every record
    failed before it ran."""
    if not ran:
        return ": no record ran (each failed before it started)"
    seconds = max(generating, 1e-9)
    if stats.generated_tokens:
        pace = f"{generating:.1f} s generating, {stats.generated_tokens / seconds:.1f} output tok/s"
    else:
        pace = f"{generating:.1f} s scoring, {ran / seconds:.1f} records/s"
    pace += f", {dtype}"
    text = (
        f" ({pace}); peak KV blocks {stats.peak_blocks_in_use}/{stats.num_blocks}, "
        f"{stats.preemptions} preemption{'' if stats.preemptions == 1 else 's'}"
    )
    if stats.graph_steps:
        text += f", {stats.graph_steps} decode steps from CUDA graphs"
    return text


def _drop_stale_summary(path: Path | None) -> None:
    """A summary left by an earlier run goes once this one starts: if this run ends
    before writing its own, none is there to be taken for it."""
    if path is not None and str(path) != "-":
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_summary(summary: dict[str, Any], path: Path) -> None:
    text = json.dumps(summary, indent=1) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from pagedbatch.files import atomic_write

    try:
        with atomic_write(path, "w") as f:
            f.write(text)
    except OSError as e:
        fail(f"cannot write the summary {path}: {e.strerror or e}; the output is complete", 1)


def _memory_report(llm: Generator, output: Path) -> None:
    from pagedbatch.cli.report import memory_table, write_timeline_png
    from pagedbatch.job.job import report_paths

    report = llm.memory_report()
    console.print(memory_table(report))
    json_path, png_path = report_paths(output)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    drawn = write_timeline_png(report, png_path)
    console.print(
        f"Memory report: {json_path}" + (f", {png_path}" if drawn else "; no chart "
        f"{png_path}: matplotlib is not installed (pip install matplotlib, or "
        "scripts/setup.sh)"), soft_wrap=True, markup=False, highlight=False,
    )  # fmt: skip
