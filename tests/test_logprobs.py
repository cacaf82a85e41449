"""--logprobs: each generated token's log-probability and the most likely alternatives,
checked against transformers' log-softmax at each position (teacher forcing)."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from job_helpers import ROOT, by_id, invoke, read_lines, tiny_args, write_jsonl
from tiny_models import ARCHS, ENGINE_PATHS
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.cascade import ANY_GROUP

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), vocab]: log-softmax of the logits each token was drawn from."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(dim=-1)


def check_logprobs(llm: LLM, reference, prompts: list[list[int]], outputs, k: int) -> None:
    """Every token's logprob and top k against `reference(prompt, generated)`: a
    `reference_logprobs` of the transformers model."""
    for prompt, output in zip(prompts, outputs, strict=True):
        for completion in output.completions:
            generated = list(completion.token_ids)
            want = reference(tuple(prompt), tuple(generated))
            assert len(completion.logprobs) == len(generated) > 0
            for row, (token, entry) in enumerate(zip(generated, completion.logprobs)):
                assert entry.token_id == token
                assert entry.token == llm.tokenizer.decode([token])
                assert entry.logprob == pytest.approx(want[row, token].item(), abs=1e-4)
                top_values, top_ids = want[row].topk(k)
                assert [i for _, i, _ in entry.top] == top_ids.tolist()
                assert [v for _, _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def shared_prefix_prompts() -> list[list[int]]:
    """Five prompts, four of them after one 13-token prefix (3 whole 4-token blocks)."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 400, (13,), generator=gen).tolist()
    tails = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (1, 6, 3, 9)]
    return [shared + tail for tail in tails] + [torch.randint(3, 400, (5,), generator=gen).tolist()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("engine", ENGINE_PATHS.values(), ids=ENGINE_PATHS.keys())
def test_logprobs_equal_transformers_log_softmax(arch, engine, tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs[arch], device="cpu", dtype="float32", num_blocks=64, block_size=4, **engine
    )
    llm.engine.runner.cascade_rule = ANY_GROUP  # any group: the short prompts' too
    prompts = shared_prefix_prompts()
    params = SamplingParams(max_tokens=7, ignore_eos=True, logprobs=3, temperature=0.9,
                            seed=4, n=2)  # fmt: skip
    outputs = llm.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    check_logprobs(llm, lambda p, g: reference_logprobs(model, list(p), list(g)), prompts,
                   outputs, 3)  # fmt: skip
    assert all(len(c.token_ids) == 7 for o in outputs for c in o.completions)
    stats = llm.stats()
    # The paths named in the id ran: the cache served prompts, cascade read shared pages once.
    assert (stats.prefix_hit_tokens > 0) == engine["prefix_sharing"]
    assert (stats.cascade_saved_token_reads > 0) == engine.get("cascade", False)


@pytest.mark.slow
def test_logprobs_on_smollm2_labelling_records(smollm2_dir):
    from pagedbatch.requests.records import parse_record

    rows = [json.loads(line) for line in (ROOT / "examples" / "label_job.jsonl").open()][:3]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    reference = functools.cache(lambda p, g: reference_logprobs(model, list(p), list(g)))
    for sharing in (True, False):
        llm = LLM(
            str(smollm2_dir), device="cpu", dtype="float32", num_blocks=256, prefix_sharing=sharing
        )
        params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5)
        outputs = llm.generate(rows, params)
        prompts = [llm.prompts.token_ids(parse_record(r, default_id=i)) for i, r in enumerate(rows)]
        stats = llm.stats()
        assert (stats.prefix_hit_tokens > 0) == sharing
        assert (stats.cascade_saved_token_reads > 0) == sharing  # cascade is on by default
        check_logprobs(llm, reference, prompts, outputs, 5)


def test_no_logprobs_unless_asked_and_zero_means_the_token_alone(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    records = [{"prompt": "Hello there"}, {"prompt": "Hello there", "logprobs": 0}]
    plain, zero = llm.generate(records, SamplingParams(max_tokens=3, ignore_eos=True))
    assert plain.completions[0].logprobs is None
    assert "logprobs" not in plain.to_json()["choices"][0]
    assert [t.top for t in zero.completions[0].logprobs] == [(), (), ()]
    assert zero.completions[0].token_ids == plain.completions[0].token_ids


@pytest.mark.parametrize(
    ("value", "message"),
    [(21, "logprobs must be <= 20, got 21"), (-1, "logprobs must be >= 0, got -1"),
     ("3", "logprobs must be an integer, got '3'")],
)  # fmt: skip
def test_bad_logprobs_are_a_record_error(value, message, tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    (out,) = llm.generate([{"prompt": "hi", "logprobs": value}], SamplingParams(max_tokens=2))
    assert out.error is not None and out.error.code == "invalid_params"
    assert out.error.message == message


def test_output_lines_plain_and_openai(tmp_path, tiny_model_dirs):
    plain_in = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "prompt": "Hello"}])
    out = tmp_path / "plain.out.jsonl"
    args = tiny_args(tiny_model_dirs["llama"], "--logprobs", "2", "--max-tokens", "3")
    assert invoke(plain_in, "-o", out, *args).exit_code == 0
    (line,) = read_lines(out)
    tokens = line["choices"][0]["logprobs"]
    assert len(tokens) == line["usage"]["completion_tokens"]
    for t in tokens:
        assert set(t) == {"token", "id", "logprob", "top"} and len(t["top"]) == 2
        assert t["logprob"] <= t["top"][0][2] + 1e-6  # the best alternative is at least as likely
        assert t["top"][0][2] >= t["top"][1][2]

    def request(cid, url, **body):
        return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m", **body}}

    batch = write_jsonl(tmp_path / "batch.jsonl", [
        request("chat", CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                logprobs=True, top_logprobs=2),
        request("chat-off", CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3),
        request("text", COMPLETIONS, prompt="Once", max_tokens=3, logprobs=1),
    ])  # fmt: skip
    out = tmp_path / "batch.out.jsonl"
    assert invoke(batch, "-o", out, *tiny_args(tiny_model_dirs["llama"])).exit_code == 0
    lines = by_id(read_lines(out))
    chat = lines["chat"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(chat) == lines["chat"]["response"]["body"]["usage"]["completion_tokens"]
    for entry in chat:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2
    assert lines["chat-off"]["response"]["body"]["choices"][0]["logprobs"] is None
    text = lines["text"]["response"]["body"]["choices"][0]["logprobs"]
    assert set(text) == {"tokens", "token_logprobs", "top_logprobs"}
    assert len(text["tokens"]) == len(text["token_logprobs"]) == len(text["top_logprobs"])
    assert all(len(top) <= 1 for top in text["top_logprobs"])


def test_logprobs_survive_chunked_prefill_and_preemption(tiny_model_dirs):
    # 3-token steps cut the prompts into chunks; 8 blocks of 4 tokens cannot hold every
    # sequence to its end, so some are preempted and recomputed: no entry twice, none lost.
    llm = LLM(tiny_model_dirs["mistral"], device="cpu", dtype="float32", num_blocks=8, block_size=4,
              max_batch_tokens=3)  # fmt: skip
    prompts = shared_prefix_prompts()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2))
    assert llm.stats().preemptions > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mistral"], dtype=torch.float32)
    check_logprobs(llm, lambda p, g: reference_logprobs(model, list(p), list(g)), prompts,
                   outputs, 2)  # fmt: skip


def test_logprobs_cover_every_generated_token_with_a_stop_string(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    prompt = "the cat sat on the mat"
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
    (free,) = llm.generate([prompt], params)
    tokens = free.completions[0].token_ids
    texts = [llm.tokenizer.decode([t]) for t in tokens]
    # A stop string: the whole text of a token from the 5th on, not found in the text before.
    at = next(
        i for i in range(4, len(tokens))
        if texts[i].strip() and texts[i] not in llm.tokenizer.decode(tokens[:i])
    )  # fmt: skip
    stopped = dataclasses.replace(params, stop=(texts[at],), n=2)
    (out,) = llm.generate([prompt], stopped)
    for completion in out.completions:
        assert completion.finish_reason == "stop"
        assert completion.text == llm.tokenizer.decode(tokens[:at])  # the text ends before it
        # One entry per generated token, the stop string's own token included (as
        # token_ids and usage count it).
        assert completion.token_ids == tokens[: at + 1]
        want = free.completions[0].logprobs[: at + 1]
        assert [t.token_id for t in completion.logprobs] == [t.token_id for t in want]
        assert [t.logprob for t in completion.logprobs] == pytest.approx(
            [t.logprob for t in want], abs=1e-5
        )
    assert out.completion_tokens == 2 * (at + 1)
