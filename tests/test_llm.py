"""The LLM library API on a tiny model: sampling, stops, per-record errors, callbacks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedbatch import LLM, Record, SamplingParams

PROMPTS = [f"The {w} of the story is" for w in ("start", "end", "middle", "point", "hero")]


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", max_model_len=256)


@pytest.mark.parametrize(
    ("capabilities", "dtype"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": True}, torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, torch.float32),
        ({"architecture": "arm64", "bf16": True}, torch.float32),  # not measured there
    ],
)
def test_auto_dtype_on_cpu_is_bfloat16_only_with_native_bfloat16_matmul(
    capabilities, dtype, monkeypatch
):
    from pagedbatch.engine.config import EngineConfig

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert EngineConfig(device="cpu").torch_dtype == dtype
    assert EngineConfig(device="cpu", dtype="float32").torch_dtype == torch.float32


@pytest.mark.native_cpu
def test_this_cpu_runs_auto_in_what_its_capabilities_say(tiny_model_dirs):
    caps = torch.cpu.get_capabilities()
    native = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=8)
    assert llm.dtype == ("bfloat16" if native else "float32")
    assert llm.kv_cache.k[0].dtype == llm.model.dtype


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch_of_32(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    target = {"id": "target", "prompt": "Once upon a time", "seed": 1234}
    alone = llm.generate([target], params)[0]
    others = [{"prompt": f"{PROMPTS[i % 5]} {i}", "seed": i} for i in range(31)]
    batch = llm.generate(others[:13] + [target] + others[13:], params)
    assert [o.id for o in batch].index("target") == 13
    assert batch[13].completions[0].token_ids == alone.completions[0].token_ids
    assert len(alone.completions[0].token_ids) == 24
    # A different seed samples something else: the test can tell seeds apart.
    other_seed = llm.generate([{**target, "seed": 99}], params)[0]
    assert other_seed.completions[0].token_ids != alone.completions[0].token_ids


def test_sampling_follows_top_k_one_as_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12))
    top1 = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=3))
    assert [o.completions[0].token_ids for o in top1] == [
        o.completions[0].token_ids for o in greedy
    ]


def test_max_tokens_ends_with_length_and_stop_strings_cut_the_text(llm):
    free = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    choice = free.completions[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 20
    text = choice.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string, text was {text!r}"
    cut = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))[0]
    assert cut.completions[0].finish_reason == "stop"
    assert cut.completions[0].text == text[: text.index(stop)]
    assert len(cut.completions[0].token_ids) < 20


def test_eos_ends_a_sequence_with_stop(llm, tiny_model_dirs, tmp_path):
    free = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    ids = list(free.completions[0].token_ids)
    eos = ids[4]  # make the 5th generated token the model's EOS, in a copy of the model
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], copy)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((copy / name).read_text())
        data["eos_token_id"] = eos
        (copy / name).write_text(json.dumps(data))
    with_eos = LLM(str(copy), device="cpu", dtype="float32")
    out = with_eos.generate(PROMPTS[:1], SamplingParams(max_tokens=12))[0]
    c = out.completions[0]
    assert c.finish_reason == "stop"
    assert list(c.token_ids) == ids[: ids.index(eos) + 1]
    # ignore_eos runs past that EOS to the length limit, with the same tokens.
    out = with_eos.generate(PROMPTS[:1], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert (list(out.completions[0].token_ids), out.completions[0].finish_reason) == (ids, "length")


def test_bad_records_get_their_own_error_and_the_rest_runs(llm):
    records = [
        {"id": "ok", "prompt": "Hello there"},
        {"id": "neg", "prompt": "x", "max_tokens": -5},
        {"id": "temp", "prompt": "x", "temperature": -1},
        {"id": "none"},
        {"id": "long", "prompt": "word " * 400},
        {"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    ]
    seen = []
    params = SamplingParams(max_tokens=5, ignore_eos=True)  # every record runs to its limit
    outs = llm.generate(records, params, on_output=lambda o: seen.append(o.id))
    by_id = {o.id: o for o in outs}
    assert [o.id for o in outs] == ["ok", "neg", "temp", "none", "long", "chat"]
    assert sorted(seen) == sorted(by_id)
    # Errors are reported first, before any step runs.
    assert set(seen[:4]) == {"neg", "temp", "none", "long"}
    assert (
        by_id["neg"].error.code == "invalid_params" and "max_tokens" in by_id["neg"].error.message
    )
    assert (
        by_id["temp"].error.code == "invalid_params"
        and "temperature" in by_id["temp"].error.message
    )
    assert by_id["none"].error.code == "invalid_record" and "prompt" in by_id["none"].error.message
    assert by_id["long"].error.code == "prompt_too_long" and "256" in by_id["long"].error.message
    ok, chat = by_id["ok"], by_id["chat"]
    assert ok.error is None and chat.error is None
    assert [(len(c.token_ids), c.finish_reason) for c in ok.completions] == [(5, "length")]
    assert [(len(c.token_ids), c.finish_reason) for c in chat.completions] == [(3, "length")]
    assert ok.prompt_tokens == len(llm.tokenizer("Hello there")["input_ids"])


def test_a_record_that_cannot_fit_the_pool_even_alone_is_an_error_not_a_deadlock(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=4, block_size=8)
    outs = llm.generate(
        [
            Record(id="big", prompt_token_ids=tuple(range(3, 30))),
            Record(id="small", prompt_token_ids=(5, 6, 7)),
        ],
        SamplingParams(max_tokens=8),
    )
    assert outs[0].error.code == "prompt_too_long"
    assert "needs 5 KV blocks but the cache has 4" in outs[0].error.message
    assert outs[1].error is None and outs[1].completions


def test_output_json_line_holds_independently_computed_values(llm, tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer("Hello")["input_ids"]
    assert len(prompt_ids) < llm.config.block_size  # shorter than a block: nothing cached
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(4):  # plain greedy, EOS or not
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(prompt_ids) :]

    params = SamplingParams(max_tokens=4, ignore_eos=True)
    out = llm.generate([{"id": 7, "prompt": "Hello"}], params)[0]
    assert out.completions[0].token_ids == tuple(greedy)
    assert json.loads(json.dumps(out.to_json())) == {
        "id": 7,
        "choices": [
            {
                "index": 0,
                "text": tokenizer.decode(greedy, skip_special_tokens=True),
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 4, "cached_tokens": 0},
    }


def test_outputs_not_kept_are_only_given_to_on_output(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=64)
    seen = []
    params = SamplingParams(max_tokens=3)
    returned = llm.generate(["a b", "c d e"], params, on_output=seen.append, keep_outputs=False)
    assert returned == [] and sorted(o.id for o in seen) == [0, 1]
    kept = llm.generate(["a b", "c d e"], params)
    assert [o.text for o in kept] == [o.text for o in sorted(seen, key=lambda o: o.id)]
