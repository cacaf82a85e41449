"""What a model's weights take in memory, from the loaded model or from its config alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

if TYPE_CHECKING:
    from pagedbatch.models.quantization import WeightQuantization


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once), a quantized
    weight as stored: its packed data and scales."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor_bytes(t) for t in tensors)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`; for a tensor subclass (torchao's quantized weights), of the plain
    tensors it is made of; a tensor-parallel shard (a DTensor), the whole weight's."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or hasattr(t, "to_local"):
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(t, name)) for name in names)


def config_model_bytes(
    config: PretrainedConfig, dtype: torch.dtype, quantization: WeightQuantization | None = None
) -> int:
    """`model_bytes` of the model `config` describes, loaded in `dtype` and quantized as
    `quantization` says, without loading it: the model is built on the meta device (no
    memory, no weights read) and given the modules and weights its quantization makes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantization is not None:
        quantization.apply_on_meta(model, dtype)
    return model_bytes(model)
