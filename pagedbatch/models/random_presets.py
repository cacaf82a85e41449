"""Random-weight models of real shapes, for benchmarks where nothing can be downloaded.

`load_model("llama-1b-random", ...)` (and so `LLM("llama-1b-random")`) builds a Llama
of Llama-3.2-1B's shape with seeded random weights, created directly on the target
device in the target dtype: no network, no checkpoint, no `gguf` or `datasets`. The same
name, seed, device and dtype always give the same weights, so benchmark baselines that
build the model again run exactly the model pagedbatch ran.

The tokenizer is byte-level with no merges: ids 0-2 are `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` (eos), 3-258 are the 256 bytes, and the rest of the vocabulary are filler
tokens `<|t{id}|>` that encoding never produces but decoding turns into that text. Text
encodes one token per byte and every id of the model decodes, which is all that token-id
workloads and the engine's stop checks and output text need. It carries a ChatML chat
template, so chat records run too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: naming a preset must not import torch
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
SEED = 0
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SHAPES: dict[str, dict[str, Any]] = {
    # One small layer: steps cost almost nothing but the engine's own host work.
    "tiny-random": {
        "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
    },
    # SmolLM2-135M: what the embedded default model looks like.
    "smollm2-135m-random": {
        "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
    },
    # Llama-3.2-1B (its llama3 RoPE scaling left out: the cost of a step is the same).
    "llama-1b-random": {
        "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
    },
}  # fmt: skip
RANDOM_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(shape) for name, shape in _SHAPES.items()}
)


def preset_config(name: str) -> LlamaConfig:
    """The config of random preset `name` (ValueError naming the presets if unknown)."""
    from transformers import LlamaConfig

    if name not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {name!r}; presets: {', '.join(RANDOM_PRESETS)}")
    return LlamaConfig(
        **RANDOM_PRESETS[name],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def build_random_model(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    seed: int = SEED,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Random preset `name` (seeded, on `device` in `dtype`, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Built on the meta device (nn.Linear's own kaiming init would double the work, on
    # the CPU), then given storage on `device` and initialised there, once, by the
    # model's own `_init_weights` (normal(0, initializer_range), norms 1, RoPE buffers).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG stays
        torch.manual_seed(seed)
        model.init_weights()  # also ties lm_head to the embeddings
    model.eval()
    model.requires_grad_(False)
    return model, byte_tokenizer(config.vocab_size)


def byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer of exactly `vocab_size` ids that decodes every id (see module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    names = [*SPECIAL_TOKENS, *alphabet]
    if vocab_size < len(names):
        raise ValueError(f"vocab_size must be at least {len(names)}, got {vocab_size}")
    names += [f"<|t{i}|>" for i in range(len(names), vocab_size)]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
