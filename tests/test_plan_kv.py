"""`pagedbatch plan` sizes the KV pool exactly as `LLM` (and so `run`) allocates it."""

from __future__ import annotations

import pytest
import torch

import pagedbatch.engine.kv_cache as kv_cache
import pagedbatch.llm as llm_module
from pagedbatch import LLM
from pagedbatch.cli.plan import kv_blocks
from pagedbatch.job.settings import resolve_settings
from pagedbatch.models.loader import load_tokenizer_and_config
from pagedbatch.models.weights import config_model_bytes, model_bytes


class FakeMemory:
    """A device with `free` bytes, whatever else the machine is doing, from which loading a
    model takes `taken(weight bytes)`: the weights themselves (a GPU, or a copy on CPU),
    nothing (float32 weights mapped from the page cache, which counts as available), or
    more (the loader's temporaries not yet given back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: int, taken) -> None:
        self.free = free
        load = llm_module.load_model

        def load_taking_memory(*args, **kwargs):
            model, tokenizer = load(*args, **kwargs)
            self.free -= taken(model_bytes(model))
            return model, tokenizer

        monkeypatch.setattr(kv_cache, "free_memory", lambda device: self.free)
        monkeypatch.setattr(llm_module, "free_memory", lambda device: self.free)
        monkeypatch.setattr(llm_module, "load_model", load_taking_memory)


SETTINGS = [
    {},  # the CPU default: a quarter of free memory (under the 4 GiB cap here)
    {"kv_memory": "0.5"},
    {"kv_memory": "0.5", "dtype": "bfloat16"},
    {"kv_memory": "300MiB"},
    {"num_blocks": 123},
]


TAKEN = {"weights": lambda w: w, "nothing": lambda w: 0, "twice": lambda w: 2 * w}


@pytest.mark.parametrize("model", ["tiny-random", "smollm2-135m"])
def test_plan_sizes_the_pool_llm_allocates(monkeypatch, model):
    config = load_tokenizer_and_config(model)[1]
    for flags in SETTINGS:
        for taken in TAKEN:
            FakeMemory(monkeypatch, free=6 * 2**30, taken=TAKEN[taken])
            engine = resolve_settings({"model": model, "device": "cpu", **flags}).engine
            planned = kv_blocks(engine, config)
            llm = LLM(config=engine)
            assert planned == llm.kv_cache.num_blocks, (flags, taken)
            del llm


def test_config_model_bytes_equals_the_loaded_weights():
    for model, dtype in (("tiny-random", "float32"), ("smollm2-135m", "bfloat16")):
        engine = resolve_settings({"model": model, "device": "cpu", "dtype": dtype}).engine
        config = load_tokenizer_and_config(model)[1]
        llm = LLM(config=engine, num_blocks=4)
        assert config_model_bytes(config, engine.torch_dtype) == model_bytes(llm.model) > 0


def test_fraction_is_of_memory_free_after_the_weights():
    spec = kv_cache.KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4,
                                dtype=torch.float32)  # fmt: skip
    cuda = torch.device("cuda")  # only its type is read: the default is 0.8, no cap
    assert spec.bytes_per_block == 2 * 2 * 1 * 4 * 4 * 4 == 256
    blocks = kv_cache.num_blocks_for(spec, cuda, kv_memory=0.5, weight_bytes=1000, free=11240)
    assert blocks == (11240 - 1000) // 2 // 256
    assert kv_cache.num_blocks_for(spec, cuda, weight_bytes=1000, free=11240) == 8192 // 256
    assert kv_cache.num_blocks_for(spec, cuda, kv_memory="2560", weight_bytes=10**9, free=0) == 10
    with pytest.raises(ValueError, match="holds no KV block"):
        kv_cache.num_blocks_for(spec, cuda, kv_memory=0.5, weight_bytes=10**6, free=10**5)
