"""`pagedbatch run`: Typer options in, Rich progress and JSONL out."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pagedbatch.cli.cluster import RayOptions, load_ray_llm, ray_note, ray_options
from pagedbatch.cli.common import Float, Int, Str, console, fail, first_line, opt, quiet_libraries
from pagedbatch.cli.progress import JobProgress
from pagedbatch.job.interrupts import Interrupts, Stopped
from pagedbatch.job.job import JobResult, ResumePolicy
from pagedbatch.job.settings import RunSettings, resolve_settings

if TYPE_CHECKING:
    from pagedbatch.job.job import Job

DEFAULT = RunSettings()  # shown in --help

INPUT_PANEL, OUTPUT_PANEL, MODEL_PANEL, MEMORY_PANEL, SAMPLING_PANEL, RAY_PANEL = (
    "Input",
    "Output",
    "Model",
    "KV cache and batching",
    "Sampling",
    "Ray cluster",
)


def run(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="JSONL file (plain or OpenAI batch), local data file (json, csv, parquet), dataset saved with save_to_disk, or a Hugging Face dataset name.", show_default=False)],
    output: Annotated[Path | None, opt(OUTPUT_PANEL, "Output JSONL path. [default: <input name>.output.jsonl]", "--output", "-o")] = None,
    resume: Annotated[bool | None, opt(OUTPUT_PANEL, "Continue the job whose output this is: skip every record it holds, run the rest.", "--resume")] = None,
    retry_errors: Annotated[bool | None, opt(OUTPUT_PANEL, "Resume, and run again the records whose line is an error.", "--retry-errors")] = None,
    overwrite: Annotated[bool | None, opt(OUTPUT_PANEL, "Start over, replacing an output that already has lines.", "--overwrite")] = None,
    force: Annotated[bool | None, opt(OUTPUT_PANEL, "Resume even though the job fingerprint stored beside the output differs.", "--force")] = None,
    errors: Annotated[Path | None, opt(OUTPUT_PANEL, "Also write each failed record's input line, with its error, to this file (feed it back as input).")] = None,
    order: Annotated[Str, opt(OUTPUT_PANEL, f"completion (lines as records finish) or input (the lines of a sequential run, in input order). [default: {DEFAULT.order}]")] = None,
    config: Annotated[Str, opt(MODEL_PANEL, "Preset name from configs/ (cpu, gpu, tiny) or a TOML file; flags given here win.")] = None,
    split: Annotated[Str, opt(INPUT_PANEL, "Dataset split. [default: train, or the only one]")] = None,
    prompt_field: Annotated[Str, opt(INPUT_PANEL, f"Field holding the prompt text. [default: {DEFAULT.prompt_field}]")] = None,
    messages_field: Annotated[Str, opt(INPUT_PANEL, f"Field holding chat messages. [default: {DEFAULT.messages_field}]")] = None,
    id_field: Annotated[Str, opt(INPUT_PANEL, f"Field holding the record id (missing: line number, or row index). [default: {DEFAULT.id_field}]")] = None,
    template: Annotated[Str, opt(INPUT_PANEL, 'Build each prompt from the record\'s fields, e.g. "Classify the review: {text}".')] = None,
    system: Annotated[Str, opt(INPUT_PANEL, "System message put before each prompt (implies --chat).")] = None,
    chat: Annotated[bool | None, opt(INPUT_PANEL, "Render plain prompts through the model's chat template too. [default: no-chat]", "--chat/--no-chat")] = None,
    skip_invalid: Annotated[bool | None, opt(INPUT_PANEL, "Turn lines that are not JSON objects into invalid_record error lines instead of stopping.", "--skip-invalid")] = None,
    model: Annotated[Str, opt(MODEL_PANEL, f"Local model directory, .gguf file, hub id, or the alias smollm2-135m (embedded). [default: {DEFAULT.engine.model}]", "--model", "-m")] = None,
    device: Annotated[Str, opt(MODEL_PANEL, f"auto, cpu or cuda. [default: {DEFAULT.engine.device}]")] = None,
    dtype: Annotated[Str, opt(MODEL_PANEL, "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16. [default: auto]")] = None,
    attention: Annotated[Str, opt(MODEL_PANEL, "Attention implementation: auto (triton on CUDA when Triton imports, else torch), torch or triton. [default: auto]")] = None,
    max_model_len: Annotated[Int, opt(MODEL_PANEL, "Cap on prompt + output tokens. [default: the model's context]")] = None,
    cache_dir: Annotated[Str, opt(MODEL_PANEL, "Where converted models are cached. [default: $PAGEDBATCH_CACHE or ~/.cache/pagedbatch]")] = None,
    threads: Annotated[Int, opt(MODEL_PANEL, "CPU threads torch computes with; threads sharing a core with another process stall each other. [default: on CPU, the CPUs this process may use less those other processes keep busy at start, at least 1; torch's own on CUDA or when OMP_NUM_THREADS is set]")] = None,
    cuda_graphs: Annotated[bool | None, opt(MODEL_PANEL, "Replay decode-only steps from CUDA graphs captured at load (needs triton attention); prefill and mixed steps run eagerly. [default: on with CUDA and triton attention; if the capture fails, off with a warning]", "--cuda-graphs/--no-cuda-graphs")] = None,
    block_size: Annotated[Int, opt(MEMORY_PANEL, f"Tokens per KV block (power of two). [default: {DEFAULT.engine.block_size}]")] = None,
    num_blocks: Annotated[Int, opt(MEMORY_PANEL, "Number of KV blocks (instead of --kv-memory).")] = None,
    kv_memory: Annotated[Str, opt(MEMORY_PANEL, "KV cache size: bytes like 2GiB or 512MB, or a fraction like 0.5 of the memory free once the weights are loaded (as `pagedbatch plan` counts it). [default: 0.8 on CUDA; 0.25 of available RAM up to 4GiB on CPU]")] = None,
    max_batch_tokens: Annotated[Int, opt(MEMORY_PANEL, f"Token budget of one step; longer prompts are prefilled in chunks. [default: {DEFAULT.engine.max_batch_tokens}]")] = None,
    max_num_seqs: Annotated[Int, opt(MEMORY_PANEL, f"Most sequences running at once. [default: {DEFAULT.engine.max_num_seqs}]")] = None,
    max_tokens: Annotated[Int, opt(SAMPLING_PANEL, f"Most tokens generated per record (a record's max_tokens wins). [default: {DEFAULT.sampling.max_tokens}]")] = None,
    temperature: Annotated[Float, opt(SAMPLING_PANEL, f"0 is greedy. [default: {DEFAULT.sampling.temperature}]")] = None,
    top_p: Annotated[Float, opt(SAMPLING_PANEL, f"Nucleus sampling mass, in (0, 1]. [default: {DEFAULT.sampling.top_p}]")] = None,
    top_k: Annotated[Int, opt(SAMPLING_PANEL, f"Sample among the k most likely tokens; 0 is off. [default: {DEFAULT.sampling.top_k}]")] = None,
    seed: Annotated[Int, opt(SAMPLING_PANEL, f"Job seed: a record without its own seed samples with a seed derived from this and its id. [default: {DEFAULT.sampling.seed}]")] = None,
    stop: Annotated[list[str] | None, opt(SAMPLING_PANEL, "Stop string (repeatable); the text ends before it.")] = None,
    logprobs: Annotated[Int, opt(SAMPLING_PANEL, "Report each generated token's log-probability and the K most likely tokens at its position, 0 to 20 (a record's logprobs wins). [default: none reported]", "--logprobs")] = None,
    choices: Annotated[Str, opt(SAMPLING_PANEL, 'Score these labels instead of generating: "positive,negative,neutral" (stripped), or a JSON list to keep spaces (\'[" yes", " no"]\'); each line gets the best label and every choice\'s logprob and probability (a record\'s choices win).', "--choices")] = None,
    choice_score: Annotated[Str, opt(SAMPLING_PANEL, "How choices are compared: sum (their log-probability) or mean (per token, which does not favour short choices). [default: sum]", "--choice-score")] = None,
    n: Annotated[Int, opt(SAMPLING_PANEL, f"Samples per record, 1 to 4096 (a record's n wins): the prompt is computed once, its pages shared. [default: {DEFAULT.sampling.n}]", "--n")] = None,
    ignore_eos: Annotated[bool | None, opt(SAMPLING_PANEL, "Generate max_tokens tokens even past EOS (benchmarks). [default: stop-at-eos]", "--ignore-eos/--stop-at-eos")] = None,
    prefix_sharing: Annotated[bool | None, opt(MEMORY_PANEL, "Compute and store each shared prompt prefix once (radix cache), running records that share it together. [default: prefix-sharing]", "--prefix-sharing/--no-prefix-sharing")] = None,
    cascade: Annotated[bool | None, opt(MEMORY_PANEL, "Attend to shared prefix pages once per step for all the records that share them, then each to its own tokens, merged exactly (attention torch: decoding records behind a shared prefix of 512+ tokens; not in decode steps replayed from CUDA graphs). [default: cascade]", "--cascade/--no-cascade")] = None,
    memory_report: Annotated[bool | None, opt(OUTPUT_PANEL, "At the end, show the KV memory report and write it to <output>.memory.json (and .memory.png with matplotlib).", "--memory-report")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the live progress display.", rich_help_panel=OUTPUT_PANEL)] = True,
    ray: Annotated[bool | None, opt(RAY_PANEL, "Run the job on a Ray cluster: replicas of the model take shards of it, this process writes the output (needs pip install -e \".[ray]\").", "--ray")] = None,
    ray_address: Annotated[Str, opt(RAY_PANEL, "The cluster to join. [default: auto, the one running on this machine (never another job's own), else a local one started for the job]", "--ray-address")] = None,
    replicas: Annotated[Int, opt(RAY_PANEL, "Replicas of the model, one per GPU (or CPU slot) of the cluster. [default: the cluster's GPUs, or its nodes without GPUs]", "--replicas")] = None,
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

    started = time.monotonic()
    with (
        Interrupts() as interrupts,
        contextlib.ExitStack() as files,
        JobProgress(console, show_progress) as progress,
    ):
        try:
            with progress.phase(f"reading {source}"):
                job = files.enter_context(Job(source, settings, policy, progress.counted))
            if job.input_note:
                console.print(job.input_note, soft_wrap=True, markup=False, highlight=False)
            llm = None
            if job.todo:
                resolve_model_name(settings.engine.model)
                where = " on Ray replicas" if cluster else ""
                with progress.phase(f"loading {settings.engine.model}{where}"):
                    llm = _load_llm(settings, cluster)
                if cluster is not None:
                    files.callback(llm.close)  # the replicas, and a cluster started here
            interrupts.on_first = _say_stopping
            interrupts.on_second = lambda signum: _exit_now(job, signum, resume)
            interrupts.started = True  # from here a signal stops the job between steps
        except Stopped as e:
            fail(f"stopped by {e.name} before the job started; nothing was written", e.exit_code)
        except (InputError, JobError, ModelLoadError) as e:
            fail(str(e))
        result = _run_with_progress(job, llm, interrupts, progress, resume)
        _summary(job, result, llm, time.monotonic() - started, progress.generation_seconds)
        if cluster is not None and llm is not None:
            ray_note(llm)
        if llm is not None and settings.engine.memory_report:
            _memory_report(llm, job.output)
    if interrupts.requested() and result.not_run:
        console.print(
            f"Interrupted by {interrupts.name}: {records(result.not_run)} not run yet. "
            f"Resume with:\n  {resume}",
            soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
        raise typer.Exit(interrupts.exit_code)


def _load_llm(settings: RunSettings, cluster: RayOptions | None = None) -> Any:
    from pagedbatch.llm import LLM
    from pagedbatch.models.names import ModelLoadError

    if cluster is not None:
        return load_ray_llm(settings, cluster)
    quiet_libraries()
    try:
        llm = LLM(config=settings.engine)
    except (ModelLoadError, ValueError) as e:
        fail(str(e))
    except (RuntimeError, MemoryError) as e:  # the KV cache (or the model) does not fit
        fail(f"cannot load {settings.engine.model} with this KV cache ({first_line(e)}); "
             "lower --num-blocks or --kv-memory", code=1)  # fmt: skip
    if llm.cuda_graphs_problem:
        console.print(
            f"CUDA graphs are off, decode runs eagerly: {llm.cuda_graphs_problem}",
            style="yellow", soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
    return llm


def _run_with_progress(
    job: Job, llm: Any, interrupts: Interrupts, progress: JobProgress, resume: str
) -> JobResult:
    if llm is None:
        return job.run(None, should_stop=interrupts.requested)
    import torch

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
    except (InputError, ClusterError) as e:  # the input changed, the Ray cluster went away
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


def _summary(job: Job, result: JobResult, llm: Any, seconds: float, generating: float) -> None:
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
    failed = result.written - codes["ok"]
    detail = ", ".join(f"{n} {code}" for code, n in sorted(codes.items()) if code != "ok")
    text = f"Wrote {records(result.written)} to {job.output} ({codes['ok']} ok" + (
        f", {failed} failed: {detail})" if failed else ")"
    )
    if result.skipped:
        text += f"; skipped {result.skipped} already done"
    if llm is not None:
        stats = llm.stats()
        rate = (
            f"{stats.generated_tokens / max(generating, 1e-9):.1f} output tok/s"
            if stats.generated_tokens
            else f"{result.written / max(generating, 1e-9):.1f} records/s"
        )
        text += (
            f" in {seconds:.1f} s ({generating:.1f} s generating, {rate}); peak KV "
            f"blocks {stats.peak_blocks_in_use}/{stats.num_blocks}, {stats.preemptions} "
            "preemptions"
        )
        if stats.graph_steps:
            text += f", {stats.graph_steps} decode steps from CUDA graphs"
    if failed and job.errors_path is not None:
        text += f"; failed records in {job.errors_path}"
    console.print(text + ".", soft_wrap=True, markup=False, highlight=False)


def _memory_report(llm: Any, output: Path) -> None:
    from pagedbatch.cli.report import memory_table, write_timeline_png
    from pagedbatch.job.job import report_paths

    report = llm.memory_report()
    console.print(memory_table(report))
    json_path, png_path = report_paths(output)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    drawn = write_timeline_png(report, png_path)
    console.print(
        f"Memory report: {json_path}" + (f", {png_path}" if drawn else " (pip install "
        "matplotlib for the timeline chart)"), soft_wrap=True, markup=False, highlight=False,
    )  # fmt: skip
