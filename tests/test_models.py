"""Model loading: tiny local models, the embedded SmolLM2 GGUF and clear load errors."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from test_generate import reference_tokens
from tiny_models import ARCHS, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BloomConfig,
    Gemma2Config,
    GptOssConfig,
    PretrainedConfig,
)

import pagedbatch.models.loader as models
from pagedbatch import LLM, SamplingParams
from pagedbatch.models.loader import ModelLoadError, check_supported, eos_token_ids, load_model

CPU = torch.device("cpu")


def _load(name: str | Path, **kwargs: object) -> tuple:
    return load_model(str(name), device=CPU, dtype=torch.float32, **kwargs)


def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_directory_loads_its_saved_weights_ready_for_inference(
    arch: str, tiny_model_dirs: dict[str, Path]
) -> None:
    model, tokenizer = _load(tiny_model_dirs[arch])
    assert model.config.model_type == arch
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    text = "The quick brown fox"
    saved = AutoTokenizer.from_pretrained(tiny_model_dirs[arch])
    assert tokenizer(text)["input_ids"] == saved(text)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    ids = torch.tensor([saved(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.eval()(ids).logits)


def test_a_sliding_window_from_the_config_is_kept_and_applied(tmp_path: Path) -> None:
    # The same seeded weights, with a window of 8 tokens and without one.
    windowed = build_tiny_model("mistral", tmp_path / "window", sliding_window=8)
    unwindowed = build_tiny_model("mistral", tmp_path / "no_window", sliding_window=None)
    model, _ = _load(windowed)
    assert model.config.sliding_window == 8
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in (23, 40)]
    params = SamplingParams(max_tokens=12)

    def paged(model_dir: Path) -> list[list[int]]:
        llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4)
        return [list(o.completions[0].token_ids) for o in llm.generate(prompts, params)]

    expected = reference_tokens(windowed, prompts, max_new=12)
    assert paged(windowed) == expected
    assert paged(unwindowed) != expected  # the window changes the tokens


def test_eos_token_ids_unite_generation_config_config_and_tokenizer(tmp_path: Path) -> None:
    path = build_tiny_model("llama", tmp_path / "model")
    for name, eos in (("generation_config.json", [5, 8]), ("config.json", 6)):
        data = json.loads((path / name).read_text())
        data["eos_token_id"] = eos
        (path / name).write_text(json.dumps(data))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(7)
    tokenizer.save_pretrained(path)
    model, tokenizer = _load(path)
    assert tokenizer.eos_token_id == 7
    assert eos_token_ids(model, tokenizer) == {5, 6, 7, 8}


def test_attn_implementation_is_passed_through(tiny_model_dirs: dict[str, Path]) -> None:
    model, _ = _load(tiny_model_dirs["llama"], attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_tiny_tokenizer_is_deterministic_chatml() -> None:
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    text = "Label the review: the food was cold. 12 + 30 = 42"
    assert first(text)["input_ids"] == second(text)["input_ids"]
    assert first.decode(first(text)["input_ids"]) == text
    assert first.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert 400 <= len(first) <= 512
    rendered = first.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_logits_rarely_tie(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    """Greedy comparisons with transformers need a clear top-1 and varied generations."""
    model, tokenizer = _load(tiny_model_dirs[arch])
    generator = torch.Generator().manual_seed(123)
    prompts = torch.randint(3, len(tokenizer), (8, 64), generator=generator)
    with torch.no_grad():
        top2 = model(prompts).logits.topk(2, dim=-1).values  # [8, 64, 2]
    gap = top2[..., 0] - top2[..., 1]
    assert (gap < 1e-3).float().mean() < 0.01, f"near-ties: {(gap < 1e-3).sum()} of 512"
    generated = _greedy(model, prompts[0, :16].tolist(), 64)
    assert len(set(generated[-32:])) > 8, f"degenerate generation: {generated}"


@pytest.mark.slow
def test_smollm2_converts_once_then_reads_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions: list[Path] = []
    write_converted = models._write_converted

    def counting_write(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(gguf_path)
        write_converted(gguf_path, out_dir)

    monkeypatch.setattr(models, "_write_converted", counting_write)
    first, _ = _load("smollm2-135m", cache_dir=tmp_path)
    entry = models.gguf_cache_path(models.alias_gguf_path("smollm2-135m"), tmp_path)
    assert conversions == [models.alias_gguf_path("smollm2-135m").resolve()]
    assert (entry / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [entry.name]  # no staging left
    second, _ = _load("smollm2-135m", cache_dir=tmp_path)
    assert len(conversions) == 1, "the second load converted the GGUF again"
    assert first.name_or_path == second.name_or_path == str(entry)


@pytest.mark.slow
def test_smollm2_ends_turns_with_im_end(smollm2_dir: Path) -> None:
    model, tokenizer = _load("smollm2-135m", cache_dir=smollm2_dir.parents[1])
    assert model.name_or_path == str(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert 2 in eos_token_ids(model, tokenizer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(
        "<|im_start|>user\n" + messages[0]["content"] + "<|im_end|>\n" + "<|im_start|>assistant\n"
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    out = model.generate(torch.tensor([prompt["input_ids"]]), max_new_tokens=48, do_sample=False)[
        0
    ].tolist()
    assert out[-1] == 2, f"no <|im_end|> after: {tokenizer.decode(out)!r}"
    assert "Paris" in tokenizer.decode(out)


def test_unknown_model_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so set the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "pagedbatch-tests/no-such-model"
    with pytest.raises(ModelLoadError) as info:  # at once: see tests/test_first_minutes.py
        _load(name)
    message = str(info.value)
    assert f"'{name}'" in message and "not in the hub cache" in message
    assert "\n" not in message


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        _load(tmp_path)
    assert str(tmp_path / "weights.gguf") in str(info.value)


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        _load(tmp_path / "absent.gguf")


def _tiny_bart() -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def test_check_supported_rejects_encoder_decoder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="BartForConditionalGeneration.*encoder-decoder"):
        check_supported(_tiny_bart())
    _tiny_bart().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="BartForConditionalGeneration.*encoder-decoder"):
        _load(tmp_path)  # AutoModelForCausalLM alone would load it as BartForCausalLM


def _tiny_from_config(config: PretrainedConfig) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(config)


def test_check_supported_rejects_softcapping_sinks_and_other_attention() -> None:
    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "head_dim": 16}
    small |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    gemma2 = _tiny_from_config(Gemma2Config(**small, attn_logit_softcapping=50.0))
    with pytest.raises(ModelLoadError, match="Gemma2ForCausalLM.*soft-capping"):
        check_supported(gemma2)
    gpt_oss = _tiny_from_config(GptOssConfig(**small, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ModelLoadError, match="GptOssForCausalLM.*attention sinks"):
        check_supported(gpt_oss)
    bloom = _tiny_from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ModelLoadError, match="BloomForCausalLM.*attention interface"):
        check_supported(bloom)


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="cannot convert GGUF file") as info:
        _load(bad, cache_dir=cache)
    assert "\n" not in str(info.value)
    assert list((cache / "models").iterdir()) == []  # neither an entry nor a staging dir
