"""Structured output in the engine: greedy tokens as transformers `generate` with xgrammar's
own logits processor makes them, on every engine path; forks, preemption, logprobs, EOS."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, ENGINE_PATHS
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedbatch import LLM, SamplingParams
from pagedbatch.constraint import Constraint, build_grammar, record_constraint
from pagedbatch.engine.cascade import ANY_GROUP
from pagedbatch.engine.token_masks import StepMask, TokenMasks
from pagedbatch.requests.records import Record
from pagedbatch.sampling_params import derive_seed

xgr = pytest.importorskip("xgrammar")

EOS = 2  # the tiny models' <|im_end|>
# Nested: an enum, a number with bounds, an array with bounds, required fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "mixed"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "aspects": {"type": "array", "items": {"enum": ["price", "delivery"]}, "maxItems": 2},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "confidence", "aspects", "stars"],
}
CONSTRAINT = Constraint.json_schema(SCHEMA)


def validate(value, schema) -> None:
    """jsonschema's check (the GPU machines lack jsonschema: only the tests that need it skip)."""
    pytest.importorskip("jsonschema").validate(value, schema)


def prompts() -> list[list[int]]:
    """Five prompts, four of them after one 13-token prefix (3 whole 4-token blocks)."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 400, (13,), generator=gen).tolist()
    tails = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (1, 6, 3, 9)]
    return [shared + tail for tail in tails] + [torch.randint(3, 400, (5,), generator=gen).tolist()]


@functools.cache
def reference(model_dir, prompt: tuple[int, ...], constraint: Constraint, max_tokens: int):
    """transformers greedy `generate` under xgrammar's own HF logits processor, built from
    xgrammar's public API only (not pagedbatch's), for the same grammar."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=model.config.vocab_size, stop_token_ids=[EOS]
    )
    compiled = xgr.GrammarCompiler(info).compile_grammar(
        build_grammar(constraint.kind, constraint.text)
    )
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
        logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)],
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def check_greedy(model_dir, ps: list[list[int]], outputs, max_tokens: int) -> None:
    """Our tokens are transformers' (which end with the EOS that alone could follow the
    grammar's end, a token we do not generate); complete outputs are valid."""
    for prompt, output in zip(ps, outputs, strict=True):
        (c,) = output.completions
        want = reference(model_dir, tuple(prompt), CONSTRAINT, max_tokens + 1)
        if c.finish_reason == "stop":
            assert list(c.token_ids) + [EOS] == want
            assert c.complete and c.json.value == json.loads(c.text)
            validate(c.json.value, SCHEMA)
        else:
            assert list(c.token_ids) == want[:max_tokens]
            assert c.complete is False and c.json is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("engine", ENGINE_PATHS.values(), ids=ENGINE_PATHS.keys())
def test_greedy_tokens_equal_transformers_with_xgrammar(arch, engine, tiny_model_dirs):
    llm = LLM(tiny_model_dirs[arch], device="cpu", num_blocks=64, block_size=4, **engine)
    llm.engine.runner.cascade_rule = ANY_GROUP  # any group: the short prompts' too
    ps = prompts()
    outputs = llm.generate(ps, SamplingParams(max_tokens=80, constraint=CONSTRAINT))
    check_greedy(tiny_model_dirs[arch], ps, outputs, 80)
    assert any(o.completions[0].complete for o in outputs)
    stats = llm.stats()
    assert stats.masked_steps > 0
    # The paths named in the id ran: the cache served prompts, cascade read shared pages once.
    assert (stats.prefix_hit_tokens > 0) == engine["prefix_sharing"]
    assert (stats.cascade_saved_token_reads > 0) == engine.get("cascade", False)


def test_preempted_sequences_keep_their_matchers(tiny_model_dirs):
    d = tiny_model_dirs["qwen3"]
    llm = LLM(d, device="cpu", num_blocks=32, block_size=4, max_num_seqs=5)
    ps = prompts()
    outputs = llm.generate(ps, SamplingParams(max_tokens=80, constraint=CONSTRAINT))
    assert llm.stats().preemptions > 0
    check_greedy(d, ps, outputs, 80)


@pytest.mark.parametrize("sharing", [True, False], ids=["forked", "not-forked"])
def test_each_sample_follows_its_own_matcher(sharing, tiny_model_dirs):
    """n = 2 sampled: each sample is valid JSON, and is the record run alone with its seed
    (sample 1 was forked from sample 0's prompt with its own matcher)."""
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=96, block_size=4,
              prefix_sharing=sharing)  # fmt: skip
    params = SamplingParams(max_tokens=120, temperature=1.0, constraint=CONSTRAINT)

    def records(seed: int) -> list[Record]:  # each record with its own seed
        return [Record(i, prompt_token_ids=tuple(p), overrides={"seed": seed})
                for i, p in enumerate(prompts()[:3])]  # fmt: skip

    both = llm.generate(records(5), dataclasses.replace(params, n=2))
    alone = llm.generate(records(derive_seed(5, 1)), params)
    for pair, single in zip(both, alone, strict=True):
        first, second = pair.completions
        assert second.token_ids == single.completions[0].token_ids
        assert first.token_ids != second.token_ids
        for c in pair.completions:
            if c.complete:
                validate(c.json.value, SCHEMA)
    assert sum(c.complete for o in both for c in o.completions) >= 4


def test_an_eos_the_grammar_does_not_allow_is_masked(tiny_model_dirs):
    """A model that always prefers EOS: unconstrained it stops at once; constrained it
    writes a whole value and stops where the grammar ends (no EOS token spent)."""
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    eos = torch.tensor([EOS])
    llm.model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill_(-1, eos, 50.0))
    ps = prompts()[:2]
    free = llm.generate(ps, SamplingParams(max_tokens=40))
    assert [list(o.completions[0].token_ids) for o in free] == [[EOS], [EOS]]
    constrained = llm.generate(ps, SamplingParams(max_tokens=100, constraint=CONSTRAINT))
    for output in constrained:
        c = output.completions[0]
        assert c.finish_reason == "stop" and EOS not in c.token_ids
        validate(c.json.value, SCHEMA)


def test_logprobs_are_the_masked_distribution(tiny_model_dirs):
    """A constrained token's logprob is the log-softmax of the logits after the mask: the
    model's probability renormalised over the tokens the grammar allows there; the
    alternatives listed are allowed tokens only."""
    d = tiny_model_dirs["qwen2"]
    llm = LLM(d, device="cpu", num_blocks=64)
    constraint = Constraint.regex(r"(yes|no|maybe)( [a-z]{1,6}){0,3}")
    (prompt,) = prompts()[:1]
    (output,) = llm.generate([prompt], SamplingParams(max_tokens=12, logprobs=5,
                                                      constraint=constraint))  # fmt: skip
    c = output.completions[0]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tokens = list(c.token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 :].float()
    matcher = llm.grammars.matcher(constraint)
    bits = torch.zeros((1, llm.grammars.words), dtype=torch.int32)
    for row, (token, entry) in enumerate(zip(tokens, c.logprobs, strict=True)):
        matcher.fill(bits, 0)
        allowed = torch.tensor([bool(bits[0, t // 32] >> (t % 32) & 1) for t in range(448)])
        want = logits[row].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        assert entry.logprob == pytest.approx(want[token].item(), abs=1e-4)
        top = want.topk(5)
        finite = [(i, v) for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > -1e30]
        assert [(i, pytest.approx(v, abs=1e-4)) for i, v in finite] == [
            (i, v) for _, i, v in entry.top
        ]
        matcher.accept(token)
    assert all(entry.logprob <= 0 for entry in c.logprobs)


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 5]], ids=["all-rows", "some-rows"])
def test_the_mask_is_xgrammar_s_on_sparse_and_dense_rows(rows):
    """StepMask.apply (sparse rows: -inf, then the allowed logits put back) masks exactly as
    xgrammar's kernel, on a vocabulary that is not a multiple of 32 (padding bits set)."""
    rng = np.random.default_rng(0)
    vocab, words = 1000, 32
    bits = np.zeros((6, words), dtype=np.uint32)
    bits[:2] = rng.integers(0, 2**32, (2, words), dtype=np.uint32)  # dense, padding bits too
    for row in range(2, 6):  # sparse: 3 tokens each, one of them past the vocabulary's end
        for token in (*rng.integers(0, vocab, 2), 1000 + row):
            bits[row, token // 32] |= np.uint32(1 << (token % 32))
    bits = torch.from_numpy(bits.view(np.int32))
    logits = torch.from_numpy(rng.standard_normal((6, vocab), dtype=np.float32))
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bits, indices=rows)
    masks = TokenMasks(torch.device("cpu"))
    StepMask(bits, rows, masks).apply(logits)
    assert torch.equal(logits, want)
    assert masks.seconds > 0
    masked = range(6) if rows is None else rows
    finite = [2 if row in masked else vocab for row in range(2, 6)]
    assert (logits[2:] > -math.inf).sum(dim=1).tolist() == finite


def test_max_tokens_and_stop_strings_cut_the_value(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    ps = prompts()[:2]
    cut = llm.generate(ps, SamplingParams(max_tokens=6, constraint=CONSTRAINT))
    stopped = llm.generate(ps, SamplingParams(max_tokens=60, stop=['"confidence"'],
                                              constraint=CONSTRAINT))  # fmt: skip
    for output in cut:
        c = output.completions[0]
        assert (c.finish_reason, c.complete, c.json, len(c.token_ids)) == ("length", False, None, 6)
        assert c.text.startswith('{"')
        assert "json" not in output.to_json()["choices"][0]
    for output in stopped:
        c = output.completions[0]
        assert (c.finish_reason, c.complete, c.json) == ("stop", False, None)
        assert c.text.startswith('{"label": "') and c.text.endswith(", ")


def test_records_own_constraints_win_and_bad_ones_are_their_errors(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    rows = [
        {"id": "flag", "prompt": "a"},
        {"id": "regex", "prompt": "b", "regex": "[0-9]{3}"},
        {"id": "text", "prompt": "c", "response_format": {"type": "text"}},
        {"id": "object", "prompt": "d", "response_format": {"type": "json_object"}},
        {"id": "bad", "prompt": "e", "response_format": {"type": "json_schema",
                                                          "json_schema": {"schema": {"type": 7}}}},
        {"id": "both", "prompt": "f", "regex": "a", "grammar": 'root ::= "a"'},
        {"id": "shape", "prompt": "g", "response_format": {"type": "xml"}},
        {"id": "choices", "prompt": "h", "choices": ["x", "y"]},
    ]  # fmt: skip
    outs = {
        o.id: o for o in llm.generate(rows, SamplingParams(max_tokens=90, constraint=CONSTRAINT))
    }
    assert set(outs["flag"].completions[0].json.value) == set(SCHEMA["required"])
    assert outs["regex"].text.isdigit() and len(outs["regex"].text) == 3
    assert outs["regex"].completions[0].json is None  # not a JSON constraint
    assert outs["text"].completions[0].complete is None  # unconstrained
    obj = outs["object"].completions[0]
    assert obj.text.startswith("{") and (obj.json is None) == (obj.finish_reason == "length")
    errors = {rid: outs[rid].error for rid in ("bad", "both", "shape", "choices")}
    assert all(e is not None and e.code == "invalid_params" for e in errors.values())
    assert errors["bad"].message.startswith("response_format: the JSON schema cannot be used: ")
    assert errors["both"].message == "give one of regex, grammar, not several"
    assert errors["shape"].message.startswith('response_format: must be {"type": "json_schema"')
    assert "constraint applies to generated text, not to choices" in errors["choices"].message


def test_constraints_are_canonical_and_compiled_once(tiny_model_dirs):
    a = Constraint.json_schema('{"type": "object",  "properties": {"b": {}, "a": {}}}')
    b = Constraint.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert a == b and a.text == '{"type":"object","properties":{"b":{},"a":{}}}'
    assert record_constraint({"response_format": {"type": "json_object"}}) == Constraint(
        "json_object"
    )
    assert record_constraint({"regex": None}) is None
    with pytest.raises(ValueError, match=r"^regex: the regex cannot be used: Regex parsing error"):
        record_constraint({"regex": "[0-9"})
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
    rows = [{"prompt": f"p{i}", "response_format": {"type": "json_schema", "json_schema":
             {"name": "x", "schema": json.loads(a.text)}}} for i in range(3)]  # fmt: skip
    llm.generate(rows, SamplingParams(max_tokens=4))
    assert llm.grammars.num_compiled == 1


@pytest.mark.slow
def test_smollm2_labels_the_label_job_as_transformers_with_xgrammar(smollm2_dir):
    """Two records of examples/label_job.jsonl under examples/label_schema.json: our greedy
    tokens with sharing and cascade on, and off, are transformers' under xgrammar's processor."""
    from pagedbatch.requests.records import parse_record

    root = Path(__file__).resolve().parent.parent
    lines = (root / "examples" / "label_job.jsonl").open()
    rows = [{**json.loads(line), "max_tokens": 24} for line in itertools.islice(lines, 2)]
    schema = json.loads((root / "examples" / "label_schema.json").read_text())
    constraint = Constraint.json_schema(schema)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    wants: dict[int, list[int]] = {}  # transformers' tokens of each record, made once
    for sharing in (True, False):
        llm = LLM(str(smollm2_dir), device="cpu", num_blocks=512, prefix_sharing=sharing)
        outputs = llm.generate(rows, SamplingParams(constraint=constraint))
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=model.config.vocab_size,
            stop_token_ids=llm.grammars.stop_token_ids,
        )  # fmt: skip
        compiled = xgr.GrammarCompiler(info).compile_grammar(
            build_grammar(constraint.kind, constraint.text)
        )
        for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
            if i not in wants:
                prompt = llm.prompts.token_ids(parse_record(row, default_id=i))
                wants[i] = model.generate(
                    torch.tensor([prompt]), max_new_tokens=25, do_sample=False,
                    logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)],
                )[0, len(prompt) :].tolist()  # fmt: skip
            c = output.completions[0]
            assert c.finish_reason == "stop" and list(c.token_ids) == wants[i][:-1]
            assert wants[i][-1] in llm.grammars.stop_token_ids
            validate(c.json.value, schema)
        assert (llm.stats().prefix_hit_tokens > 0) == sharing


@pytest.mark.cuda
def test_constrained_greedy_on_cuda_with_graphs_equals_cpu(tiny_model_dirs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    d = tiny_model_dirs["llama"]
    ps = prompts()
    params = SamplingParams(max_tokens=40, constraint=CONSTRAINT)
    cpu = LLM(d, device="cpu", num_blocks=64).generate(ps, params)
    gpu = LLM(d, device="cuda", dtype="float32", attention="triton", num_blocks=64,
              cuda_graphs=True)  # fmt: skip
    outs = gpu.generate(ps, params)
    assert [o.completions[0].token_ids for o in outs] == [o.completions[0].token_ids for o in cpu]
    assert gpu.stats().graph_steps > 0 and gpu.stats().masked_steps > 0
