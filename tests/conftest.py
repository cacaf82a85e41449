"""Session fixtures: tiny random-weight models and the converted embedded SmolLM2."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from tiny_models import (
    ARCHS,
    OPEN_THINKING_CHAT_TEMPLATE,
    THINKING_CHAT_TEMPLATE,
    build_thinking_tokenizer,
    build_tiny_model,
)

from pagedbatch.models.loader import DEFAULT_MODEL, alias_gguf_path, convert_gguf

_session_cache: str | None = None  # the temporary model cache this session made


@pytest.fixture(autouse=True)
def cpu_without_native_bfloat16(request: pytest.FixtureRequest, monkeypatch) -> None:
    """In-process, dtype auto resolves as on a CPU without native bfloat16 matmul (float32),
    whatever this machine is: CI machines differ (AVX2 only, AVX512-BF16, AMX), and the
    exactness tests compare with transformers in float32. Tests of bfloat16 ask for it by
    name; `@pytest.mark.native_cpu` tests see the machine's own capabilities."""
    if request.node.get_closest_marker("native_cpu") is not None:
        return
    import torch

    capabilities = {**torch.cpu.get_capabilities(), "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)


def pytest_configure(config: pytest.Config) -> None:
    """One model cache for the whole session (fixtures, CLI runs, subprocesses), never
    the user's own unless PAGEDBATCH_CACHE points there: the embedded model converts once."""
    global _session_cache
    if "PAGEDBATCH_CACHE" not in os.environ:
        _session_cache = os.environ["PAGEDBATCH_CACHE"] = tempfile.mkdtemp(
            prefix="pagedbatch-cache-"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's model cache (the converted SmolLM2 is about 0.5 GB)."""
    if _session_cache is not None:
        shutil.rmtree(_session_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a saved tiny model with its tokenizer, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def thinking_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen3 models whose tokenizers have <think> and </think>: "qwen3" with a
    Qwen3-style template (the model opens its thinking; enable_thinking false closes it in
    the prompt), "r1" with a DeepSeek-style one (the prompt opens it; thinking false
    closes it)."""
    root = tmp_path_factory.mktemp("thinking")
    templates = {"qwen3": THINKING_CHAT_TEMPLATE, "r1": OPEN_THINKING_CHAT_TEMPLATE}
    return {
        name: build_tiny_model("qwen3", root / name, tokenizer=build_thinking_tokenizer(t))
        for name, t in templates.items()
    }


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted embedded SmolLM2, in the session's model cache."""
    return convert_gguf(alias_gguf_path(DEFAULT_MODEL), Path(os.environ["PAGEDBATCH_CACHE"]))


@pytest.fixture(scope="session")
def forked():
    """Real `pagedbatch` processes, forked from one that has imported it (job_helpers.Forked)."""
    from job_helpers import Forked

    server = Forked()
    yield server
    server.close()
