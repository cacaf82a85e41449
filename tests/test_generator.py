"""`LLM` and `RayLLM` are both `Generator`s (what `Job.run` takes): the same signatures,
to the letter, so that one cannot drift from the other."""

from __future__ import annotations

import inspect

import pytest

from pagedbatch.generator import Generator
from pagedbatch.llm import LLM
from pagedbatch.ray.ray_llm import RayLLM

METHODS = sorted(n for n, v in vars(Generator).items() if inspect.isfunction(v) and n[0] != "_")


def test_the_protocol_names_what_a_job_uses():
    assert METHODS == ["generate", "memory_report", "stats"]
    assert Generator.__annotations__ == {"config": "EngineConfig"}


@pytest.mark.parametrize("implementation", [LLM, RayLLM])
@pytest.mark.parametrize("name", METHODS)
def test_each_implementation_keeps_the_protocol_s_signature(implementation, name):
    expected = inspect.signature(getattr(Generator, name))
    assert inspect.signature(getattr(implementation, name)) == expected, (
        f"{implementation.__name__}.{name} differs from Generator.{name}"
    )
