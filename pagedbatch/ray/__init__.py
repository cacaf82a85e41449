"""pagedbatch on a Ray cluster: one job across replicas (`RayLLM`, `pagedbatch run --ray`),
and a batch processor for Ray Data users (`PagedBatchProcessor`, `build_processor`).

Ray is an optional extra (`pip install -e ".[ray]"`); nothing here imports it until used.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "RayLLM": "pagedbatch.ray.ray_llm",
    "PagedBatchProcessor": "pagedbatch.ray.data",
    "build_processor": "pagedbatch.ray.data",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pagedbatch.ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
