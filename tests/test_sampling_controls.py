"""The sampling controls (repetition, presence and frequency penalties, logit bias, min_p,
min_tokens, stop_token_ids) against transformers' own logits processors: the engine's
processed logits under teacher forcing, and greedy tokens through the engine and
`pagedbatch run` against transformers `generate` with the same processors, with prefix
sharing, forks and preemption."""

from __future__ import annotations

import re

import pytest
import torch
from job_helpers import by_id, invoke, one_line_error, read_lines, tiny_args, write_jsonl
from tiny_models import ARCHS, ENGINE_PATHS
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.logits_processor import LogitsProcessor as EngineProcessor
from pagedbatch.engine.sampler import filter_min_p
from pagedbatch.engine.sequence import Sequence

EOS = 2
STOP = 100  # a stop token id, made likely by a bias
# Per-record controls, cycled over the prompts: none, each alone, all together.
CONTROLS = [
    {},
    {"repetition_penalty": 1.5},
    {"presence_penalty": 0.8, "frequency_penalty": 0.6},
    {"logit_bias": {"10": 2.0, "20": -1.5, "30": 1.0}},
    {"repetition_penalty": 0.8, "frequency_penalty": -0.4},  # rewarding repeats
    {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3,
     "logit_bias": {str(STOP): 8.0, "7": -100}, "min_tokens": 4, "stop_token_ids": [STOP]},
]  # fmt: skip


class PresenceFrequency(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the output tokens (transformers has
    none): logit - count * frequency - (count > 0) * presence."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        output = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output).float())
        return scores - counts * self.frequency - (counts > 0).float() * self.presence


def hf_processors(params: SamplingParams, prompt_len: int) -> LogitsProcessorList:
    """transformers' processors for `params`, in the order its `generate` builds them (its
    own first; presence/frequency, which it lacks, as a custom processor after them)."""
    processors = LogitsProcessorList()
    if params.logit_bias:
        bias = {(token,): value for token, value in params.logit_bias}
        processors.append(SequenceBiasLogitsProcessor(sequence_bias=bias))
    if params.repetition_penalty != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
    if params.min_tokens:
        stops = torch.tensor([EOS, *params.stop_token_ids])
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, params.min_tokens, stops))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            PresenceFrequency(prompt_len, params.presence_penalty, params.frequency_penalty)
        )
    return processors


def prompts_sharing_prefixes(count: int = 12) -> list[list[int]]:
    """Prompts of 10 to 300 tokens, in pairs that share a 20-token prefix."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.linspace(10, 300, count).long().tolist()
    prompts = []
    for k, n in enumerate(lengths):
        head = prompts[-1][:20] if k % 2 else []
        prompts.append(head + torch.randint(3, 440, (n,), generator=gen).tolist())
    return prompts


def records(prompts: list[list[int]], n: int = 1) -> list[dict]:
    return [
        {"id": k, "prompt_token_ids": p, "n": n, **CONTROLS[k % len(CONTROLS)]}
        for k, p in enumerate(prompts)
    ]


def record_params(defaults: SamplingParams, record: dict) -> SamplingParams:
    overrides = {k: v for k, v in record.items() if k not in ("id", "prompt_token_ids")}
    return defaults.with_overrides(overrides)


class Recorder:
    """The engine's own LogitsProcessor, run as the engine runs it, keeping for each row it
    changed: the sequence's tokens then, its params, the logits in and out."""

    def __init__(self, processor: EngineProcessor) -> None:
        self.processor = processor
        self.rows: list[tuple[list[int], int, SamplingParams, torch.Tensor, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        out = self.processor(logits, seqs)
        for i, seq in enumerate(seqs):
            if seq.params.processes_logits:
                entry = (list(seq.token_ids), seq.num_prompt_tokens, seq.params)
                self.rows.append((*entry, logits[i].clone(), out[i].clone()))
        return out

    def accept(self, tokens: torch.Tensor) -> None:
        self.processor.accept(tokens)


def generate(llm: LLM, rows: list[dict], params: SamplingParams):
    """LLM.generate over records given as token ids (a Record with overrides)."""
    from pagedbatch.requests.records import Record

    items = [
        Record(id=r["id"], prompt_token_ids=tuple(r["prompt_token_ids"]),
               overrides={k: v for k, v in r.items() if k not in ("id", "prompt_token_ids")})
        for r in rows
    ]  # fmt: skip
    return llm.generate(items, params)


# --- the processed logits, step by step, against transformers' processors ---


@pytest.mark.parametrize("arch", ARCHS)
def test_processed_logits_equal_transformers_processors_under_teacher_forcing(
    arch, tiny_model_dirs
):
    """Every row the engine changed, in a run with shared prefixes, sampled forks (n=2,
    which diverge: each keeps its own counts) and preemption (a 40-block pool), equals
    transformers' processors applied to the same logits with the sequence's tokens then."""
    llm = LLM(tiny_model_dirs[arch], device="cpu", num_blocks=40, max_batch_tokens=64)
    recorder = Recorder(llm.engine.logits_processor)
    llm.engine.logits_processor = recorder
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=5)
    rows = records(prompts_sharing_prefixes(), n=2)
    outputs = generate(llm, rows, params)
    stats = llm.stats()
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0
    assert any(
        len(set(o.completions[0].token_ids) ^ set(o.completions[1].token_ids)) for o in outputs
    )
    kinds = set()
    for token_ids, prompt_len, p, logits, out in recorder.rows:
        expected = hf_processors(p, prompt_len)(torch.tensor([token_ids]), logits[None].clone())
        torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=0)
        kinds.add(tuple(sorted(k for k in ("min_tokens", "logit_bias") if getattr(p, k))))
    assert len(recorder.rows) > 100 and ("logit_bias", "min_tokens") in kinds
    stop = rows[5]["stop_token_ids"][0]
    assert any(o.completions[0].token_ids[-1] == stop for o in outputs[5::6])  # it ended some


def test_min_p_equals_transformers_warper_after_temperature():
    logits = torch.randn(16, 448, generator=torch.Generator().manual_seed(0)) * 4
    logits[3, 10:200] = float("-inf")  # a row a mask or a filter thinned out
    for min_p in (0.0, 0.05, 0.3, 1.0):
        scaled = TemperatureLogitsWarper(0.7)(None, logits.clone())
        expected = MinPLogitsWarper(min_p)(None, scaled.clone()) if min_p else scaled
        ours = filter_min_p(scaled.clone(), torch.full((16,), min_p))
        assert torch.equal(ours, expected), min_p
        assert (ours.isfinite().sum(dim=-1) >= 1).all()


def test_sampled_tokens_stay_within_min_p_of_the_processed_logits(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    recorder = Recorder(llm.engine.logits_processor)
    llm.engine.logits_processor = recorder
    params = SamplingParams(
        max_tokens=16, temperature=1.5, min_p=0.2, seed=1, frequency_penalty=0.5
    )
    outputs = llm.generate(["Once upon a time", "The quick brown fox"], params)
    sampled = {}
    for token_ids, _, _, _, out in recorder.rows:
        sampled[tuple(token_ids)] = out
    checked = 0
    for output, prompt in zip(outputs, ["Once upon a time", "The quick brown fox"], strict=True):
        ids = llm.tokenizer(prompt)["input_ids"]
        tokens = list(output.completions[0].token_ids)
        for k, token in enumerate(tokens):
            out = sampled[tuple(ids + tokens[:k])]
            kept = MinPLogitsWarper(0.2)(
                None, TemperatureLogitsWarper(1.5)(None, out[None].clone())
            )
            assert kept[0, token].isfinite()
            checked += 1
    assert checked == 32


# --- greedy tokens against transformers generate ---


def reference_tokens(model_dir, rows: list[dict], defaults: SamplingParams) -> list[list[int]]:
    """transformers `generate(do_sample=False)` with each record's processors, one prompt at
    a time; it stops at EOS or a stop token id, as the engine does."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        params, prompt = record_params(defaults, row), row["prompt_token_ids"]
        ids = torch.tensor([prompt])
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
            do_sample=False, logits_processor=hf_processors(params, len(prompt)),
            eos_token_id=[EOS, *params.stop_token_ids], pad_token_id=0,
        )  # fmt: skip
        out.append(tokens[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    cache = {}

    def get(arch: str, rows: list[dict], defaults: SamplingParams):
        key = (arch, defaults)
        if key not in cache:
            cache[key] = reference_tokens(tiny_model_dirs[arch], rows, defaults)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("engine", ENGINE_PATHS.values(), ids=ENGINE_PATHS.keys())
def test_greedy_tokens_equal_generate_with_the_same_processors(
    arch, engine, tiny_model_dirs, references
):
    rows = records(prompts_sharing_prefixes(), n=2)
    defaults = SamplingParams(max_tokens=16, min_p=0.5)  # min_p: no effect on greedy
    expected = references(arch, rows, defaults)
    llm = LLM(tiny_model_dirs[arch], device="cpu", num_blocks=48, max_batch_tokens=64, **engine)
    outputs = generate(llm, rows, defaults)
    for row, output, want in zip(rows, outputs, expected, strict=True):
        assert [list(c.token_ids) for c in output.completions] == [want, want], row["id"]
    stats = llm.stats()
    assert stats.preemptions > 0
    assert (stats.prefix_hit_tokens > 0) == engine["prefix_sharing"]
    assert any(w[-1] == STOP and len(w) < 16 for w in expected)  # a stop token id ended one
    assert any(w != expected[0] for w in expected[1:])
    llm.engine.check_integrity()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_through_pagedbatch_run_with_flags_and_records(
    arch, tmp_path, tiny_model_dirs
):
    """Flags set the job's controls, records their own; each line's tokens, of both its
    samples (read from their logprobs), are transformers generate's with the same
    processors; the prompts share prefixes and the 28-block pool preempts."""
    from tiny_models import CORPUS
    from transformers import AutoTokenizer

    model_dir = tiny_model_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [CORPUS[k // 2][: 60 + 40 * k] for k in range(6)]  # pairs share their start
    rows = [
        {"id": f"r{k}", "prompt": t, **CONTROLS[k]} for k, t in enumerate(texts)
    ]  # fmt: skip
    defaults = SamplingParams(
        max_tokens=10, repetition_penalty=1.2, presence_penalty=0.3, logit_bias={"11": 1.5}
    )
    with_ids = [
        {"prompt_token_ids": tokenizer(r["prompt"])["input_ids"], **r} for r in rows
    ]  # fmt: skip
    for r in with_ids:
        del r["prompt"]
    expected = reference_tokens(model_dir, with_ids, defaults)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = tiny_args(
        model_dir, "--max-tokens", "10", "--repetition-penalty", "1.2", "--presence-penalty",
        "0.3", "--logit-bias", '{"11": 1.5}', "--logprobs", "0", "--num-blocks", "28",
        "--max-batch-tokens", "32", "--block-size", "4", "--n", "2",
    )  # fmt: skip
    result = invoke(source, "-o", out, *args)
    assert result.exit_code == 0, result.output
    lines = by_id(read_lines(out))
    for r, want in zip(rows, expected, strict=True):
        samples = [[t["id"] for t in c["logprobs"]] for c in lines[r["id"]]["choices"]]
        assert samples == [want, want], r["id"]
    assert any(line["usage"]["cached_tokens"] for line in lines.values())
    preemptions = re.search(r"(\d+) preemptions", result.output)
    assert preemptions and int(preemptions.group(1)) > 0, result.output


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("repetition_penalty", 0, "repetition_penalty must be > 0, got 0"),
        ("repetition_penalty", -1.5, "repetition_penalty must be > 0, got -1.5"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", "high", "frequency_penalty must be a finite number, got 'high'"),
        ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("logit_bias", {"9999": 5}, "logit_bias: token 9999 is outside the vocabulary (0 to 447)"),
        ("logit_bias", {"dog": 5}, "a logit_bias token id must be an integer, got 'dog'"),
        ("logit_bias", {"5": 101}, "logit_bias[5] must be in [-100, 100], got 101"),
        ("logit_bias", [5], "logit_bias: 5 is not a token id and a bias"),
        ("min_tokens", 9, "min_tokens (9) must be <= max_tokens (8)"),
        ("min_tokens", -1, "min_tokens must be >= 0, got -1"),
        ("stop_token_ids", [3, 448],
         "stop_token_ids: token 448 is outside the vocabulary (0 to 447)"),
        ("stop_token_ids", 3, "stop_token_ids must be a list of token ids, got 3"),
    ],
)  # fmt: skip
def test_bad_values_are_the_records_invalid_params_line(
    field, value, message, tiny_model_dirs, llm_plain
):
    (out,) = llm_plain.generate([{"prompt": "hi", field: value}], SamplingParams(max_tokens=8))
    assert out.error is not None and out.error.code == "invalid_params"
    assert out.error.message == message


@pytest.fixture(scope="module")
def llm_plain(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)


def test_bad_flags_are_one_line_errors(tmp_path, tiny_model_dirs):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    for flags, message in (
        (["--min-p", "2"], "min_p must be in [0, 1], got 2.0"),
        (["--logit-bias", "{5: 1}"], "logit_bias: not JSON"),
        (["--stop-token-ids", "7,x"], "stop_token_ids must be token ids separated by commas"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    ):
        assert message in one_line_error(
            invoke(source, *tiny_args(tiny_model_dirs["llama"], *flags))
        )


def test_rows_without_controls_pay_nothing(tiny_model_dirs):
    processor = EngineProcessor([EOS])
    logits = torch.randn(3, 448)
    plain = [Sequence(i, [1, 2, 3], 3, SamplingParams(temperature=0.5), 100) for i in range(3)]
    assert processor(logits, plain) is logits and processor.counts is None
    mixed = [*plain[:2], Sequence(3, [1, 2, 3], 3, SamplingParams(repetition_penalty=2.0), 100)]
    out = processor(logits, mixed)
    assert (
        out is not logits
        and torch.equal(out[:2], logits[:2])
        and not torch.equal(out[2], logits[2])
    )


def test_seeded_sampling_with_controls_is_batch_and_preemption_invariant(tiny_model_dirs):
    """Each record samples the same tokens alone in a roomy pool as among all the others
    in a pool so small that sequences are preempted and recomputed."""
    rows = records(prompts_sharing_prefixes(), n=2)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=11, top_p=0.9, min_p=0.05)
    model_dir = tiny_model_dirs["mistral"]
    roomy = LLM(model_dir, device="cpu", num_blocks=256)
    alone = [generate(roomy, [row], params)[0] for row in rows]
    tight = LLM(model_dir, device="cpu", num_blocks=40, max_batch_tokens=64)
    together = generate(tight, rows, params)
    assert tight.stats().preemptions > 0
    for a, b in zip(alone, together, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]


def test_min_tokens_and_a_budget_do_not_combine_with_a_constraint(llm_plain):
    fmt = {"response_format": {"type": "json_object"}}
    outs = llm_plain.generate(
        [{"prompt": "hi", "min_tokens": 2, **fmt}, {"prompt": "hi", "reasoning_budget": 4, **fmt}],
        SamplingParams(max_tokens=8),
    )
    assert [o.error.message for o in outs] == [
        "min_tokens does not combine with a json_object constraint: the constraint decides "
        "where the output ends",
        "reasoning_budget does not combine with a json_object constraint: the constraint "
        "decides where the output ends",
    ]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_controls_never_synchronise_and_sample_what_the_cpu_samples():
    from pagedbatch.engine.sampler import sample_tokens

    kinds = [
        SamplingParams(),
        SamplingParams(temperature=0.8, repetition_penalty=1.3, min_p=0.1),
        SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5,
                       logit_bias={3: 5.0}),
        SamplingParams(min_tokens=5, stop_token_ids=(7,), repetition_penalty=0.9),
    ]  # fmt: skip

    def family() -> list[Sequence]:
        return [
            Sequence(i, list(range(i, i + 20)), 10, kinds[i % 4], 10**9, seed=i) for i in range(32)
        ]

    logits = [torch.randn(32, 3000, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    results = {}
    for device in ("cpu", "cuda"):
        processor, seqs, tokens = EngineProcessor([2]), family(), []
        for step, step_logits in enumerate([x.to(device) for x in logits]):
            if device == "cuda" and step == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                sampled = sample_tokens(step_logits, seqs, None, processor)
                processor.accept(sampled)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            tokens.append(sampled.tolist())
            for seq, token in zip(seqs, tokens[-1], strict=True):
                seq.token_ids.append(token)
        results[device] = tokens
    assert results["cuda"] == results["cpu"]
