"""Session fixtures: tiny random-weight models and the converted embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import ARCHS, build_tiny_model

from pagedbatch.models import DEFAULT_MODEL, alias_gguf_path, convert_gguf


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a saved tiny model with its tokenizer, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted embedded SmolLM2; kept in `$PAGEDBATCH_CACHE` when set (CI keeps it warm)."""
    env = os.environ.get("PAGEDBATCH_CACHE")
    cache_dir = Path(env) if env else tmp_path_factory.mktemp("pagedbatch_cache")
    return convert_gguf(alias_gguf_path(DEFAULT_MODEL), cache_dir)
