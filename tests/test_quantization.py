"""Quantized weights (models/quantization.py): --quantize int8 on CPU token for token
against transformers running the same torchao-quantized model, `plan` counting the weights
as loaded, checkpoints quantized already, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from job_helpers import read_lines, tiny_args, write_jsonl
from test_generate import random_prompts
from test_plan_kv import FakeMemory

from pagedbatch import LLM, SamplingParams
from pagedbatch.cli.plan import pool_sizing
from pagedbatch.job.settings import resolve_settings
from pagedbatch.models.loader import load_tokenizer_and_config
from pagedbatch.models.weights import model_bytes

torchao = pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
NUM_NEW = 16


def _quantized_tensors(model: torch.nn.Module) -> int:
    return sum(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


def _transformers_int8(model_dir) -> torch.nn.Module:
    """transformers' own int8 weight-only torchao model of `model_dir`, on CPU."""
    config = TorchAoConfig(Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=config, device_map="cpu"
    ).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_greedy_tokens_equal_transformers_on_the_same_quantized_model(arch, tiny_model_dirs):
    reference = _transformers_int8(tiny_model_dirs[arch])
    prompts = random_prompts(reference.config.vocab_size, count=6)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW, do_sample=False
        )
        expected.append(out[0, len(prompt) :].tolist())
    llm = LLM(tiny_model_dirs[arch], device="cpu", quantize="int8", num_blocks=256)
    assert _quantized_tensors(llm.model) == _quantized_tensors(reference) > 0
    assert "int8 weight-only" in llm.quantization.description
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NUM_NEW))
    assert [list(o.completions[0].token_ids) for o in outputs] == expected
    assert model_bytes(llm.model) == model_bytes(reference)


@pytest.mark.parametrize("model", ["tiny-random", "llama"])
def test_plan_counts_the_quantized_weights_as_loaded(monkeypatch, model, tiny_model_dirs):
    name = str(tiny_model_dirs.get(model, model))
    config = load_tokenizer_and_config(name)[1]
    full = resolve_settings({"model": name, "device": "cpu", "kv_memory": "0.5"}).engine
    engine = full.replace(quantize="int8")
    FakeMemory(monkeypatch, free=2**30, taken=lambda w: w)
    planned, unquantized = pool_sizing(engine, config), pool_sizing(full, config)
    llm = LLM(config=engine)
    assert planned.weight_bytes == model_bytes(llm.model) < unquantized.weight_bytes
    assert planned.num_blocks == llm.kv_cache.num_blocks > unquantized.num_blocks
    assert planned.weights == llm.quantization.description
    assert _quantized_tensors(llm.model) > 0  # a random preset is quantized too
    report = llm.memory_report()
    assert report["model_bytes"] == planned.weight_bytes
    assert report["weights"].startswith("int8 weight-only")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dirs, tmp_path_factory):
    """Tiny llama checkpoints whose configs carry a quantization: torchao int8 (saved by
    transformers, loads on CPU), and GPTQ / bitsandbytes configs whose packages are absent."""
    root = tmp_path_factory.mktemp("quantized")
    torchao_dir = root / "torchao-int8"
    _transformers_int8(tiny_model_dirs["llama"]).save_pretrained(torchao_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dirs["llama"] / name, torchao_dir / name)
    dirs = {"torchao": torchao_dir}
    for method, quantization in {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
        "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                         "bnb_4bit_quant_type": "nf4"},
    }.items():  # fmt: skip
        target = shutil.copytree(tiny_model_dirs["llama"], root / method)
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quantization
        (target / "config.json").write_text(json.dumps(config))
        dirs[method] = target
    return dirs


def test_a_torchao_checkpoint_loads_through_its_quantizer(checkpoints, tiny_model_dirs):
    llm = LLM(checkpoints["torchao"], device="cpu", num_blocks=64)
    assert llm.quantization.description.startswith("torchao Int8WeightOnlyConfig")
    config = load_tokenizer_and_config(str(checkpoints["torchao"]))[1]
    engine = llm.config.replace(num_blocks=64)
    assert pool_sizing(engine, config).weight_bytes == model_bytes(llm.model)
    again = LLM(tiny_model_dirs["llama"], device="cpu", num_blocks=64, quantize="int8")
    prompts = ["The quick brown fox", "Once upon a time there was"]
    params = SamplingParams(max_tokens=8)
    assert [o.completions[0].token_ids for o in llm.generate(prompts, params)] == [
        o.completions[0].token_ids for o in again.generate(prompts, params)
    ]


def test_quantized_runs_say_which_in_one_line(forked, tmp_path, tiny_model_dirs, checkpoints):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox"}])
    out = tmp_path / "out.jsonl"
    code, err = forked.run(["run", src, "-o", out, *tiny_args(tiny_model_dirs["llama"]),
                            "--quantize", "int8"], tmp_path)  # fmt: skip
    assert code == 0, err
    weights = [line for line in err.splitlines() if line.startswith("Weights: ")]
    assert len(weights) == 1 and "int8 weight-only" in weights[0] and "MiB" in weights[0], err
    assert len(read_lines(out)) == 1
    code, err = forked.run(["run", src, "-o", out, "--overwrite",
                            *tiny_args(checkpoints["torchao"])], tmp_path)  # fmt: skip
    assert code == 0, err
    assert "Weights: torchao Int8WeightOnlyConfig: the checkpoint's own" in err


@pytest.mark.parametrize(
    ("model", "flags", "says"),
    [
        ("llama", ["--quantize", "int4"], "--quantize int4 has no torchao kernel on cpu"),
        ("llama", ["--quantize", "fp8"], "--quantize fp8 has no torchao kernel on cpu"),
        ("llama", ["--quantize", "int3"], "quantize must be one of int8, int4, fp8"),
        ("gptq", [], "quantized (gptq 4-bit (group size 128)) and cannot load on cpu here: "
                     "Loading a GPTQ quantized model requires optimum (`pip install optimum`)"),
        ("bitsandbytes", [], "requires bitsandbytes: `pip install -U bitsandbytes"),
        ("torchao", ["--quantize", "int8"], "is quantized already (torchao "
                                            "Int8WeightOnlyConfig): drop --quantize int8"),
    ],
)  # fmt: skip
def test_quantizations_that_cannot_run_are_one_line_before_any_record(
    forked, tmp_path, tiny_model_dirs, checkpoints, model, flags, says
):
    model_dir = checkpoints.get(model) or tiny_model_dirs[model]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox"}])
    out = tmp_path / "out.jsonl"
    for command in (["run", src, "-o", out], ["plan", src, "--no-estimate"]):
        args = tiny_args(model_dir, *flags)
        if command[0] == "plan":  # plan has no --max-tokens / --no-progress of its own here
            args = ["-m", str(model_dir), "--device", "cpu", "--num-blocks", "64", *flags]
        code, err = forked.run([*command, *args], tmp_path)
        assert code == 2, err
        text = err.strip()
        assert text.startswith("error: ") and "\n" not in text and says in text, text
    assert not out.exists() or out.read_text() == ""
