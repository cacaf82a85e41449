"""What a model's weights take in memory, from the loaded model or from its config alone."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied weight counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def config_model_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """`model_bytes` of the model `config` describes, loaded in `dtype`, without loading it:
    the model is built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model_bytes(model)
