"""pagedbatch: offline batch generation for LLMs on a paged KV cache."""

from __future__ import annotations

from pagedbatch.engine.config import EngineConfig
from pagedbatch.job.records import Record
from pagedbatch.llm import LLM
from pagedbatch.outputs import Completion, RecordError, RequestOutput
from pagedbatch.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "Completion",
    "EngineConfig",
    "Record",
    "RecordError",
    "RequestOutput",
    "SamplingParams",
]
