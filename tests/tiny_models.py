"""Tiny random-weight causal LMs with a real byte-level BPE tokenizer, for tests.

`build_tiny_model("llama", path)` saves a 2-layer model (hidden 64, 4 query heads,
2 KV heads, head_dim 16) and its tokenizer to `path`, loadable with `from_pretrained`.
Weights are seeded, so the same call always writes the same model.

Tests compare our greedy tokens with transformers `generate` token for token, so
near-ties between the top two logits must be rare. With the default initializer range
(0.02) the logits of a 64-wide model are almost flat; INITIALIZER_RANGE makes them
spread out while generations stay varied (measured in tests/test_models.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
# The engine paths exactness tests compare with transformers: id -> LLM keyword arguments.
ENGINE_PATHS = {
    "sharing-cascade": {"prefix_sharing": True, "cascade": True},
    "sharing": {"prefix_sharing": True, "cascade": False},
    "no-sharing": {"prefix_sharing": False},
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
VOCAB_SIZE = 448
INITIALIZER_RANGE = 0.3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Thinking models mark their reasoning with two added tokens (not special, as Qwen3's).
THINK_TOKENS = ("<think>", "</think>")  # ids 448, 449
# Qwen3's chat template reduced to ChatML and its thinking switch: enable_thinking false
# writes an empty thinking into the prompt; else the model opens its own.
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
# DeepSeek's style: the assistant turn opens the thinking in the prompt (R1), or with
# `thinking` false closes it there (V3.1).
OPEN_THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if thinking is defined and thinking is false %}{{ '</think>' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A paged cache stores keys and values "
    "in fixed-size blocks, so that many sequences can share the memory of one pool.",
    "Once upon a time there was a small model that wanted to write stories. Every "
    "morning it read the prompts in its batch, thought about the words that came "
    "before, and wrote the next token with great care.",
    "Label the following review as positive or negative. The food was cold, the "
    "service was slow, and the room was far too loud for a quiet dinner with friends.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. "
    "Question: How many days are in a week? Answer: There are seven days in a week.",
    "In the spring the river rises, the fields turn green, and the farmers plant their "
    "seeds. In the autumn they bring in the harvest and store the grain for winter.",
    "Summarize the text below in one sentence. Keep the names of people and places, "
    "and do not add facts that the text does not state.",
    "Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 10 + 20 = 30, 100% of 50 is 50; "
    "emails like user@example.com and paths like /home/user/data.jsonl appear too.",
)

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


@functools.cache
def _trained_tokenizer_json() -> str:
    """The trained tokenizer as JSON, trained once per process (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ChatML tokenizer over the built-in corpus; eos is `<|im_end|>` (id 2)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_thinking_tokenizer(template: str = THINKING_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with <think> and </think> added and a thinking chat template."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(list(THINK_TOKENS))
    tokenizer.chat_template = template
    return tokenizer


def tiny_config(arch: str, vocab_size: int, **overrides: object) -> PretrainedConfig:
    """The config of a tiny `arch` model; `overrides` replace any field."""
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(ARCHS)}")
    fields: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "initializer_range": INITIALIZER_RANGE,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if arch == "qwen2":
        del fields["head_dim"]  # Qwen2 derives it: hidden_size / num_attention_heads
    if arch == "mistral":
        fields["sliding_window"] = 4096  # as in the real config; wider than any test
    fields.update(overrides)
    return _CONFIG_CLASSES[arch](**fields)


def build_tiny_model(
    arch: str, path: Path, tokenizer: PreTrainedTokenizerFast | None = None,
    **config_overrides: object,
) -> Path:  # fmt: skip
    """Save a seeded random-weight `arch` causal LM and its tokenizer (default: the tiny
    ChatML one) to `path`."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer), **config_overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
