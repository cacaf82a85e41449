"""--logprobs: each generated token's log-probability and the most likely alternatives,
checked against transformers' log-softmax at each position (teacher forcing)."""

from __future__ import annotations

import pytest
import torch
from job_helpers import by_id, invoke, read_lines, tiny_args, write_jsonl
from transformers import AutoModelForCausalLM

from pagedbatch import LLM, SamplingParams

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), vocab]: log-softmax of the logits each token was drawn from."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logprobs_equal_transformers_log_softmax(arch, tiny_model_dirs):
    llm = LLM(tiny_model_dirs[arch], device="cpu", num_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (5, 13, 9)]
    params = SamplingParams(max_tokens=7, ignore_eos=True, logprobs=3, temperature=0.9,
                            seed=4, n=2)  # fmt: skip
    outputs = llm.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    for prompt, output in zip(prompts, outputs):
        for completion in output.completions:
            generated = list(completion.token_ids)
            want = reference_logprobs(model, prompt, generated)
            assert len(completion.logprobs) == len(generated) == 7
            for row, (token, entry) in enumerate(zip(generated, completion.logprobs)):
                assert entry.token_id == token
                assert entry.token == llm.tokenizer.decode([token])
                assert entry.logprob == pytest.approx(want[row, token].item(), abs=1e-4)
                top_values, top_ids = want[row].topk(3)
                assert [i for _, i, _ in entry.top] == top_ids.tolist()
                assert [v for _, _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_no_logprobs_unless_asked_and_zero_means_the_token_alone(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
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
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64)
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
