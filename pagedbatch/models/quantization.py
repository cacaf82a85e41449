"""Quantized weights, always through transformers' quantizers (nothing quantized by hand).

Two sources: a checkpoint whose config carries a `quantization_config` (GPTQ, AWQ,
compressed-tensors, bitsandbytes, fp8, torchao, ...) loads through that method's
quantizer, whose `validate_environment` says whether its package and kernels are here;
and `--quantize int8|int4|fp8` quantizes a full-precision checkpoint at load time with
torchao (`TorchAoConfig`):

  int8  int8 weights, a scale per output row; activations stay in the model dtype
        (weight-only). Runs wherever torch does, CPU included.
  int4  int4 weights in groups of 128 along the input (64 or 32 where the model's widths
        need it), torchao's tinygemm layout: a CUDA GPU of compute capability 8.0+,
        bfloat16.
  fp8   float8 e4m3 weights with a scale per row, activations quantized per row at each
        matmul (torch._scaled_mm): a CUDA GPU of compute capability 8.9+ (Ada, Hopper).

The quantized Linear layers are the model's own modules with tensor-subclass weights:
the model's forward, and so the paged attention, is unchanged.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedbatch.models.names import ModelLoadError

if TYPE_CHECKING:  # imported where used: EngineConfig checks --quantize without torch
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

QUANTIZE_MODES = ("int8", "int4", "fp8")
INSTALL_TORCHAO = 'pip install "pagedbatch[quantize]" (torchao)'
INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides every quantized layer's input
_NEEDS_CAPABILITY = {"int4": (8, 0), "fp8": (8, 9)}
_WHAT = {
    "int8": "int8 weight-only (per-row scales)",
    "int4": "int4 weight-only (groups of {group})",
    "fp8": "fp8 e4m3 weights and activations (per-row scales)",
}


def quantize_problem(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `--quantize mode` cannot run on `device` in `dtype`, or None when it can."""
    import torch

    if mode not in QUANTIZE_MODES:
        return f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}"
    if importlib.util.find_spec("torchao") is None:
        return f"--quantize {mode} needs torchao, which is not installed: {INSTALL_TORCHAO}"
    if mode == "int8":
        return None
    need = _NEEDS_CAPABILITY[mode]
    if device.type != "cuda":
        return (
            f"--quantize {mode} has no torchao kernel on {device.type}: it needs a CUDA GPU "
            f"of compute capability {need[0]}.{need[1]} or more; --quantize int8 runs on CPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < need:
        name = torch.cuda.get_device_name(device)
        return (
            f"--quantize {mode} needs a CUDA GPU of compute capability {need[0]}.{need[1]} "
            f"or more; {name} has {capability[0]}.{capability[1]}: use --quantize int8"
        )
    if mode == "int4" and dtype != torch.bfloat16:
        got = str(dtype).removeprefix("torch.")
        return f"--quantize int4 runs in bfloat16 (torchao's tinygemm kernel): got --dtype {got}"
    return None


def torchao_config(mode: str, model: torch.nn.Module) -> Any:
    """The `TorchAoConfig` of `--quantize mode` for `model` (its shapes pick the int4 group
    size; a model on the meta device is enough). ValueError when int4 cannot pack it."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )
    from transformers import TorchAoConfig

    if mode == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if mode == "fp8":
        return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    config = TorchAoConfig(Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"))
    widths = {module.in_features for _, module in _quantized_linears(model, config)}
    for group in INT4_GROUP_SIZES:
        if all(width % group == 0 for width in widths):
            quant_type = Int4WeightOnlyConfig(
                group_size=group, int4_packing_format="tile_packed_to_4d"
            )
            return TorchAoConfig(quant_type)
    odd = sorted(w for w in widths if w % INT4_GROUP_SIZES[-1])
    raise ValueError(
        f"--quantize int4 cannot pack this model: layers {odd[:3]} wide are not a multiple "
        f"of {INT4_GROUP_SIZES[-1]} (int4 groups of {', '.join(map(str, INT4_GROUP_SIZES))}); "
        "use --quantize int8"
    )


@dataclass(frozen=True)
class WeightQuantization:
    """How a model's weights are quantized as they load: `torchao`, the `TorchAoConfig` of
    --quantize, passed to `from_pretrained`; or `quantizer`, the quantizer of a checkpoint
    that is quantized already. `description` is the one line a user reads."""

    description: str
    torchao: Any = None
    quantizer: Any = None

    def apply_on_meta(self, model: PreTrainedModel, dtype: torch.dtype) -> None:
        """Give a meta-device `model` the modules and weights loading gives it (to count
        their bytes): the checkpoint quantizer's own Linear replacements, torchao's weights."""
        if self.quantizer is not None:
            self.quantizer.preprocess_model(model, dtype=dtype)
        config = self.torchao if self.torchao is not None else _torchao_of(self.quantizer)
        if config is not None:
            quantize_like_loading(model, config)


def weight_quantization(
    config: PretrainedConfig, name: str, quantize: str | None, device: torch.device,
    dtype: torch.dtype,
) -> WeightQuantization | None:  # fmt: skip
    """How model `name` (its `config`) loads here: --quantize `quantize`, its checkpoint's
    own quantization, or None (full precision). Raises ModelLoadError, one line naming
    what to install or change, when it cannot load on `device` in `dtype`."""
    import torch

    own = checkpoint_quantization(config)
    if own is not None:
        what = describe_checkpoint(own)
        if quantize is not None:
            raise ModelLoadError(
                f"model '{name}' is quantized already ({what}): drop --quantize {quantize}"
            )
        quantizer, problem = _checkpoint_quantizer(own, device, dtype)
        if problem is not None:
            raise ModelLoadError(
                f"model '{name}' is quantized ({what}) and cannot load on {device.type} here: "
                f"{problem}"
            )
        if getattr(quantizer.quantization_config, "dequantize", False):
            what += f", dequantized to {dtype} at load (no kernels for it on {device.type})"
        return WeightQuantization(
            f"{what}: the checkpoint's own, through transformers' quantizer", quantizer=quantizer
        )
    if quantize is None:
        return None
    problem = quantize_problem(quantize, device, dtype)
    if problem is not None:
        raise ModelLoadError(problem)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        torchao = torchao_config(quantize, skeleton)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    group = getattr(torchao.quant_type, "group_size", None)
    what = _WHAT[quantize].format(group=group)
    return WeightQuantization(
        f"{what}, quantized at load with torchao (--quantize {quantize})", torchao=torchao
    )


def checkpoint_quantization(config: PretrainedConfig) -> Any | None:
    """The quantization config a checkpoint's config carries, or None."""
    return getattr(config, "quantization_config", None) or getattr(
        config.get_text_config(decoder=True), "quantization_config", None
    )


def describe_checkpoint(quantization: Any) -> str:
    """'gptq 4-bit (group size 128)', 'bitsandbytes 4-bit nf4', ... from its config."""
    data = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = data.get("quant_method", "unknown")
    method = str(getattr(method, "value", method)).lower()
    parts = [method]
    if data.get("load_in_4bit"):
        parts.append(f"4-bit {data.get('bnb_4bit_quant_type', '')}".strip())
    elif data.get("load_in_8bit"):
        parts.append("8-bit")
    elif data.get("bits") is not None:
        parts.append(f"{data['bits']}-bit")
    elif method == "torchao":
        parts.append(str(data.get("quant_type", {}).get("default", {}).get("_type", "")))
    if data.get("group_size") not in (None, -1):
        parts.append(f"(group size {data['group_size']})")
    return " ".join(p for p in parts if p)


def _checkpoint_quantizer(
    quantization: Any, device: torch.device, dtype: torch.dtype
) -> tuple[Any, str | None]:
    """Ask the checkpoint's quantizer whether it loads here: the quantizer, or the reason it
    does not (its package or kernels are missing), in its own words."""
    from transformers.quantizers.auto import AutoHfQuantizer

    if not AutoHfQuantizer.supports_quant_method(quantization):
        return None, "transformers has no quantizer for it"
    try:
        quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
        quantizer.validate_environment(device_map={"": device}, dtype=dtype, weights_only=True)
    except (ImportError, RuntimeError, ValueError) as e:
        lines = str(e).strip().splitlines()
        return None, lines[0] if lines else type(e).__name__
    return quantizer, None


def quantize_like_loading(model: torch.nn.Module, quantization_config: Any) -> None:
    """Quantize `model` in place as transformers' torchao quantizer does while it loads
    weights (the same layers, the same torchao config): for a model built without
    `from_pretrained` (random presets) and for counting bytes on the meta device."""
    from torchao.quantization import quantize_

    for _, module in _quantized_linears(model, quantization_config):
        quantize_(module, quantization_config.quant_type, lambda m, fqn: True)


def _torchao_of(quantizer: Any) -> Any:
    """The TorchAoConfig of a pre-quantized torchao checkpoint's quantizer, else None."""
    config = quantizer.quantization_config
    method = str(getattr(config.quant_method, "value", config.quant_method))
    return config if method == "torchao" else None


def _quantized_linears(
    model: torch.nn.Module, quantization_config: Any
) -> list[tuple[str, torch.nn.Module]]:
    """The modules whose weight transformers' torchao quantizer quantizes (not the LM head,
    tied weights or the modules the config keeps)."""
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    quantizer.preprocess_model(model)
    needs = quantizer.param_needs_quantization
    names = [n for n, _ in model.named_parameters() if needs(model, n)]
    return [(n, get_module_from_name(model, n)[0]) for n in names]


# An fp8 KV cache's scales in a checkpoint, as llm-compressor and AutoFP8 write them (and
# vLLM reads them): per attention layer, K's and V's (or one for both), a number or one
# per KV head; stored = K / k_scale.
_KV_SCALE = re.compile(
    r"layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale|kv_scale)$"
)


def checkpoint_kv_scales(
    directory: Path, num_layers: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fp8 KV scales stored in `directory`'s safetensors files, as two [num_layers,
    num_kv_heads] float32 tensors (K's, V's); None unless every layer has both."""
    import torch
    from safetensors import safe_open

    scales = {part: torch.zeros(num_layers, num_kv_heads) for part in ("k", "v")}
    seen: set[tuple[str, int]] = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file is not a dict)
                match = _KV_SCALE.search(key)
                if match is None or int(match[1]) >= num_layers:
                    continue
                value = f.get_tensor(key).float().flatten()
                if value.numel() not in (1, num_kv_heads):
                    continue
                layer, which = int(match[1]), match[2] or match[3]
                for part in (which,) if which else ("k", "v"):
                    scales[part][layer] = value
                    seen.add((part, layer))
    if len(seen) < 2 * num_layers or not all((t > 0).all() for t in scales.values()):
        return None
    return scales["k"], scales["v"]
