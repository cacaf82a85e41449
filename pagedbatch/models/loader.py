"""Load a causal LM and its tokenizer by alias, GGUF file, local directory or hub id.

GGUF files (the embedded default model among them) are dequantized once and cached
as a float32 safetensors directory; every load, the first included, then reads that
directory with plain `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pagedbatch.files import atomic_directory
from pagedbatch.models.names import (
    ALIASES,
    DEFAULT_MODEL,
    WHAT_TO_PASS,
    ModelLoadError,
    alias_gguf_path,
    resolve_model_name,
)
from pagedbatch.models.quantization import (
    WeightQuantization,
    quantize_like_loading,
    weight_quantization,
)
from pagedbatch.models.random_presets import RANDOM_PRESETS, build_random_model, preset_config

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "alias_gguf_path", "load_model"]


# Part of every GGUF cache key: bump it when the conversion changes.
_CONVERSION_VERSION = 1


def load_model(
    name: str | os.PathLike[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    cache_dir: Path | None = None,
    quantize: str | None = None,
    device_mesh: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `name` (alias, random preset, .gguf file, model directory or hub id) and its
    tokenizer.

    The model is in eval mode on `device` with `dtype` and needs no gradients; `quantize`
    (int8, int4, fp8: models/quantization.py) quantizes its weights with torchao as they
    load, and a checkpoint quantized already loads through its own quantizer. A
    `device_mesh` (a 1-D torch DeviceMesh, engine/tensor_parallel.py) loads this rank's
    shard of each weight by the model's own tensor-parallel plan. Raises ModelLoadError
    when it cannot be found or loaded, or pagedbatch cannot run it (see
    `check_supported`), or its quantization cannot run here (before the weights load).
    """
    name = os.fspath(name)
    if name in RANDOM_PRESETS and device_mesh is not None:
        raise ModelLoadError(f"tensor parallel runs checkpoints, not random preset {name}")
    if name in RANDOM_PRESETS:
        quantization = weight_quantization(preset_config(name), name, quantize, device, dtype)
        model, tokenizer = build_random_model(
            name, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        if quantization is not None:
            quantize_like_loading(model, quantization.torchao)
        check_supported(model)
        return model, tokenizer
    source, cached_only = _resolve_source(name, cache_dir)
    config = _load_config(source, name, cached_only)
    _check_config(config, _architecture(config))
    quantization = weight_quantization(config, name, quantize, device, dtype)
    extra: dict[str, Any] = {"attn_implementation": attn_implementation}
    if quantization is not None:  # quantized weights load straight onto the device
        extra.update(device_map=device, quantization_config=quantization.torchao)
    extra = {k: v for k, v in extra.items() if v is not None}
    if device_mesh is not None:
        from transformers.distributed import DistributedConfig

        extra.update(distributed_config=DistributedConfig(tp_size=device_mesh.size()),
                     device_mesh=device_mesh)  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cached_only)
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=cached_only, **extra
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model '{name}': {_short_reason(exc)}") from exc
    check_supported(model)
    # Quantized weights load straight onto the device; a sharded model is on its rank's.
    if quantization is None and device_mesh is None:
        model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def model_directory(name: str, cache_dir: Path | None = None) -> Path | None:
    """The local directory of `name`'s files (a directory, a converted GGUF, a hub id's
    snapshot in the hub cache), None for a random preset or where there is none."""
    if name in RANDOM_PRESETS:
        return None
    source, _ = _resolve_source(name, cache_dir)
    if Path(source).is_dir():
        return Path(source)
    from transformers.utils import cached_file

    try:
        config = cached_file(source, "config.json", local_files_only=True)
    except OSError:
        return None
    return Path(config).parent if config else None


def model_quantization(
    name: str, quantize: str | None, device: torch.device, dtype: torch.dtype,
    cache_dir: Path | None = None,
) -> WeightQuantization | None:  # fmt: skip
    """How `load_model` quantizes `name`'s weights (None: full precision), from its config
    alone; ModelLoadError, one line, when that cannot run here."""
    config = model_config(name, cache_dir)
    return weight_quantization(config, name, quantize, device, dtype)


def model_config(name: str, cache_dir: Path | None = None) -> PretrainedConfig:
    """The config of `name` alone (no tokenizer, no weights); ModelLoadError, one line."""
    if name in RANDOM_PRESETS:
        return preset_config(name)
    source, cached_only = _resolve_source(name, cache_dir)
    return _load_config(source, name, cached_only)


def load_tokenizer_and_config(
    name: str, cache_dir: Path | None = None
) -> tuple[PreTrainedTokenizerBase, PretrainedConfig]:
    """The tokenizer and config of `name`, without its weights (for planning a job)."""
    if name in RANDOM_PRESETS:
        meta = torch.device("meta")
        model, tokenizer = build_random_model(name, device=meta, dtype=torch.float32)
        return tokenizer, model.config
    source, cached_only = _resolve_source(os.fspath(name), cache_dir)
    config = _load_config(source, name, cached_only)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=cached_only), config
    except Exception as exc:
        reason = _short_reason(exc)
        raise ModelLoadError(f"cannot load the tokenizer of '{name}': {reason}") from exc


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token id that ends a sequence per the generation config, config or tokenizer."""
    candidates = (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    )
    ids: set[int] = set()
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def check_supported(model: PreTrainedModel) -> None:
    """Raise ModelLoadError naming the architecture if pagedbatch cannot run `model`.

    Supported: decoder-only models whose attention goes through the transformers
    attention interface, without logit soft-capping or attention sinks (a sliding
    window is fine).
    """
    name = _architecture(model.config, model)
    _check_config(model.config, name)
    if not type(model)._supports_attention_backend:
        raise ModelLoadError(
            f"pagedbatch cannot run {name}: its attention does not go through the "
            "transformers attention interface"
        )
    if any(getattr(module, "sinks", None) is not None for module in model.modules()):
        raise ModelLoadError(f"pagedbatch cannot run {name}: it uses attention sinks")


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cached safetensors copy of `gguf_path`, converted on first use.

    The copy is written to a temporary directory beside the cache entry and renamed
    into place, so a killed or concurrent conversion never leaves a partial entry.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    target = gguf_cache_path(gguf_path, cache_dir)
    if target.is_dir():  # only ever created complete, by atomic_directory's rename
        return target
    try:
        with atomic_directory(target) as staging, _no_progress_bars():
            _write_converted(gguf_path, staging)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the converted model to {target.parent}: {_short_reason(exc)}; "
            "set PAGEDBATCH_CACHE to a writable directory"
        ) from exc
    return target


def gguf_cache_path(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the copy of `gguf_path` lives (maybe not yet), keyed by path, size and mtime."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{_CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return Path(root).expanduser() / "models" / f"{gguf_path.stem}-{digest}"


def default_cache_dir() -> Path:
    """`$PAGEDBATCH_CACHE` if set, else `~/.cache/pagedbatch`."""
    env = os.environ.get("PAGEDBATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedbatch"


def model_source(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """What transformers loads `name` from: a local directory (a GGUF file or alias: its
    converted copy, made now if missing) or a hub id. ValueError for a random preset,
    which lives in memory only."""
    if name in RANDOM_PRESETS:
        raise ValueError(f"{name} is a random-weight preset: it has no directory to load from")
    return _resolve_source(name, None if cache_dir is None else Path(cache_dir))[0]


def _resolve_source(name: str, cache_dir: Path | None) -> tuple[str, bool]:
    """A local directory to load from, or `name` itself as a hub id; and whether to read
    the hub cache only (the hub is unreachable)."""
    source = resolve_model_name(name)
    if source.kind in ("alias", "gguf"):
        assert source.path is not None
        return str(convert_gguf(source.path, cache_dir)), False
    if source.kind == "directory":
        return str(source.path), False
    return name, source.cached_only


def _load_config(source: str, name: str, cached_only: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, local_files_only=cached_only)
    except Exception as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"cannot load model '{name}': {_short_reason(exc)}") from exc
        aliases = ", ".join([*ALIASES, *RANDOM_PRESETS])
        raise ModelLoadError(
            f"cannot load model '{name}': not a local directory, .gguf file or known alias "
            f"({aliases}), and the hub lookup failed ({_short_reason(exc)}); {WHAT_TO_PASS}"
        ) from exc


def _check_config(config: PretrainedConfig, name: str) -> None:
    """The checks that need only the config, so they run before weights load."""
    text_config = config.get_text_config()  # itself unless the model is composite
    for sub in (config,) if text_config is config else (config, text_config):
        if getattr(sub, "is_encoder_decoder", False):
            raise ModelLoadError(
                f"pagedbatch cannot run {name}: it is an encoder-decoder model; "
                "pagedbatch runs decoder-only causal LMs"
            )
        softcap = getattr(sub, "attn_logit_softcapping", None)
        if softcap:
            raise ModelLoadError(
                f"pagedbatch cannot run {name}: it uses attention logit soft-capping "
                f"(attn_logit_softcapping={softcap})"
            )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off while
    a model loads or converts: a library does not print (the caller's setting comes back)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _architecture(config: PretrainedConfig, model: PreTrainedModel | None = None) -> str:
    if config.architectures:
        return ", ".join(config.architectures)
    return type(model).__name__ if model is not None else config.model_type


def _write_converted(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` and save it (float32) with its tokenizer to `out_dir`."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot convert GGUF file '{gguf_path}': {_short_reason(exc)}"
        ) from exc
    # A GGUF-loaded model remembers its quantization; save_pretrained refuses it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _fix_special_tokens(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the tokenizer's eos the model's: GGUF metadata can disagree with the config.

    SmolLM2's GGUF gives the tokenizer eos `<|im_start|>` (id 1), while the model ends
    a turn with `<|im_end|>` (id 2), its config's eos_token_id.
    """
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF reader sets this WordPiece option, which would corrupt BPE decoding.
    tokenizer.clean_up_tokenization_spaces = False


def _short_reason(exc: BaseException) -> str:
    """The first line of an exception, for a one-line user message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
