"""Engine configuration, and the named presets in configs/ that the CLI loads."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedbatch.engine.reasoning import REASONING_PARSERS
from pagedbatch.engine.threads import cpus_busy_elsewhere, default_threads, process_cpus
from pagedbatch.engine.units import parse_memory
from pagedbatch.models.names import DEFAULT_MODEL
from pagedbatch.models.quantization import QUANTIZE_MODES
from pagedbatch.sampling_params import short_repr

if TYPE_CHECKING:  # torch is imported where a property needs it: checking a config is cheap
    import torch

DTYPES = ("float32", "bfloat16", "float16")
# The KV cache's element type: "auto" is the model's dtype; fp8 is float8 e4m3 with a scale
# per layer and KV head (engine/kv_cache.py).
KV_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes the engine (sampling defaults live in SamplingParams)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory: str | float | None = None
    # Measured on CPU too: per-token cost flat from 1024 tokens and 128 sequences a step
    # (docs/MEASUREMENTS.md, "Step size on CPU"); the same defaults serve both devices.
    max_batch_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    chat: bool = False
    # Variables of the chat template (e.g. {"enable_thinking": False}); a record's own win.
    chat_template_kwargs: Mapping[str, Any] | None = None
    prefix_sharing: bool = True
    memory_report: bool = False  # keep a KV snapshot per step, for memory_report()
    cache_dir: str | None = None
    threads: int | None = None  # torch's intra-op threads; None: see torch_threads
    cuda_graphs: bool | None = None  # decode from CUDA graphs; None: see use_cuda_graphs
    cascade: bool = True  # read shared prefix pages once per step (engine/cascade.py)
    quantize: str | None = None  # quantize the weights at load with torchao: int8, int4, fp8
    kv_dtype: str = "auto"  # the KV cache's dtype: auto (the model's), fp32, bf16, fp16, fp8
    tensor_parallel: int = 1  # ranks the model is sharded over (engine/tensor_parallel.py)
    # Split a thinking model's output into reasoning and answer (engine/reasoning.py).
    reasoning_parser: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}"
            )
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPES:
            raise ValueError(
                f"kv_dtype must be auto or one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}"
            )
        if self.attention not in BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(BACKENDS)}, got {self.attention!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("num_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"threads must be >= 1, got {self.threads}; leave it unset for the default "
                f"({process_cpus()} CPUs usable here)"
            )
        if self.cuda_graphs and (self.device == "cpu" or self.attention == "torch"):
            raise ValueError(
                "cuda_graphs needs a CUDA device and triton attention, got device "
                f"{self.device} and attention {self.attention}"
            )
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and (problem := self._tensor_parallel_problem()) is not None:
            raise ValueError(problem)
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
        if self.num_blocks is not None and self.kv_memory is not None:
            raise ValueError("give num_blocks or kv_memory, not both")
        if self.kv_memory is not None:
            parse_memory(self.kv_memory)
        check_template_kwargs(self.chat_template_kwargs, "chat_template_kwargs")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                f"got {self.reasoning_parser!r}"
            )

    def _tensor_parallel_problem(self) -> str | None:
        """What tensor parallelism cannot run with (engine/tensor_parallel.py), or None."""
        n = self.tensor_parallel
        if self.cuda_graphs:
            return (
                f"tensor_parallel {n} runs decode eagerly: CUDA graphs are not captured with "
                "collectives yet; drop cuda_graphs (--no-cuda-graphs)"
            )
        if self.attention == "triton":
            return f"tensor_parallel {n} runs the torch attention only, got attention triton"
        if self.device.startswith("cuda:"):
            return f"tensor_parallel {n} puts rank r on cuda:r; give device cuda, not {self.device}"
        if self.quantize is not None or self.kv_dtype != "auto":
            return (
                f"tensor_parallel {n} runs full-precision weights and the model's KV dtype "
                "only: drop quantize and kv_dtype (not built yet)"
            )
        return None

    @property
    def pool_from_job(self) -> bool:
        """The KV pool is the CPU default (neither num_blocks nor kv_memory, one rank): a
        job may size it from its records instead (engine/job_pool.py)."""
        return (
            self.num_blocks is None and self.kv_memory is None and self.tensor_parallel == 1
            and self.torch_device.type == "cpu"
        )  # fmt: skip

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype`; auto is bfloat16 on CUDA and on a CPU that multiplies bfloat16 natively
        (`cpu_has_native_bfloat16`), else float32."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device.type == "cuda" or cpu_has_native_bfloat16():
            return torch.bfloat16
        return torch.float32

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: `kv_dtype`, or the model's (`torch_dtype`) for auto."""
        import torch

        if self.kv_dtype == "auto":
            return self.torch_dtype
        return getattr(torch, KV_DTYPES[self.kv_dtype])

    @property
    def attention_backend(self) -> str:
        """The attention to run: 'auto' is triton on CUDA when Triton imports, else torch."""
        from pagedbatch.engine.attention import resolve_backend

        if self.tensor_parallel > 1:
            return "torch"  # config_problem refused triton by name
        return resolve_backend(self.attention, self.torch_device)

    @property
    def use_cuda_graphs(self) -> bool:
        """Replay decode steps from CUDA graphs: `cuda_graphs`, else on for CUDA with triton
        attention. The torch backend sizes each step's gathers from its contexts on the
        host, so a graph of it would be wrong for the next step: True then is refused."""
        capturable = self.torch_device.type == "cuda" and self.attention_backend == "triton"
        capturable = capturable and self.tensor_parallel == 1
        if self.cuda_graphs and not capturable:  # device or attention auto, resolved here
            raise ValueError(
                "cuda_graphs needs a CUDA device and triton attention, got device "
                f"{self.torch_device.type} and attention {self.attention_backend}"
            )
        return capturable if self.cuda_graphs is None else self.cuda_graphs

    @property
    def torch_threads(self) -> int | None:
        """The intra-op threads to give torch: `threads`, else (on CPU) the CPUs this process
        may use less those other processes keep busy now, at least 1 (engine/threads.py),
        shared by the tensor-parallel ranks (each computes at once on the same cores);
        None (torch's own) on CUDA or when OMP_NUM_THREADS is set."""
        if self.threads is not None:
            return self.threads
        if "OMP_NUM_THREADS" in os.environ:
            return None
        if self.torch_device.type != "cpu":
            return None  # the host thread mostly launches kernels
        threads = default_threads(process_cpus(), cpus_busy_elsewhere())
        return max(1, threads // self.tensor_parallel)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX512-BF16): there a job
    in bfloat16 measured faster than in float32 (docs/MEASUREMENTS.md, "bfloat16 on CPU").
    Elsewhere bfloat16 matmuls are not native, so auto stays float32."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def check_template_kwargs(kwargs: Any, name: str) -> None:
    """Raise ValueError unless `kwargs` is None or an object of named template variables."""
    if kwargs is None:
        return
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(
            f"{name} must be an object of template variables, got {short_repr(kwargs)}"
        )


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The settings of a preset: a name from configs/ (e.g. 'cpu') or a TOML file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read config {name_or_path}: {e.strerror}") from None
    else:
        preset = resources.files("pagedbatch.configs") / f"{name_or_path}.toml"
        if not preset.is_file():
            raise ValueError(
                f"unknown config {name_or_path!r}; presets: {', '.join(preset_names())}"
            )
        text = preset.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config {name_or_path}: invalid TOML ({e})") from None


def preset_names() -> list[str]:
    files = resources.files("pagedbatch.configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))
