"""pagedbatch: offline batch generation for LLMs on a paged KV cache.

The names below are imported on first use, so that `import pagedbatch` (and every
`pagedbatch` command that stops on a bad argument) does not pay for torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# Where torchao (the `quantize` extra) is installed, transformers imports it as it imports
# its model code, and that import logs a warning for each CUDA extension a CPU build lacks,
# and torch one about torchao's enums: noise on every run, before any output. Set here,
# the first module of any pagedbatch import; their errors still show.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from pagedbatch.constraint import Constraint
    from pagedbatch.engine.config import EngineConfig
    from pagedbatch.llm import LLM
    from pagedbatch.outputs import Completion, RecordError, RequestOutput
    from pagedbatch.requests.records import Record
    from pagedbatch.sampling_params import SamplingParams

_HOMES = {
    "LLM": "pagedbatch.llm",
    "Completion": "pagedbatch.outputs",
    "Constraint": "pagedbatch.constraint",
    "EngineConfig": "pagedbatch.engine.config",
    "Record": "pagedbatch.requests.records",
    "RecordError": "pagedbatch.outputs",
    "RequestOutput": "pagedbatch.outputs",
    "SamplingParams": "pagedbatch.sampling_params",
}
__all__ = [
    "LLM",
    "Completion",
    "Constraint",
    "EngineConfig",
    "Record",
    "RecordError",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pagedbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
