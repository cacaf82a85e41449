"""--kv-dtype: an fp8 (float8 e4m3) KV cache with per-layer, per-KV-head scales, and 16-bit
caches under a float32 model: the torch store and attention, copy-on-write, the pool's
size, the scales' source, the engine's paths agreeing with each other, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from job_helpers import read_lines, tiny_args, write_jsonl
from pagedbatch.kernels.reference import (
    FP8,
    cascade_attention,
    dequantize,
    paged_attention,
    quantize,
    store_kv,
)
from safetensors.torch import load_file, save_file
from test_generate import random_prompts
from test_reference_attention import fill_pages
from tiny_models import ENGINE_PATHS

from pagedbatch import LLM, SamplingParams
from pagedbatch.cli.plan import pool_sizing
from pagedbatch.engine.kv_cache import KVCache, KVCacheSpec
from pagedbatch.engine.kv_scales import CHECKPOINT, HEADROOM, MEASURED
from pagedbatch.job.settings import resolve_settings
from pagedbatch.models.loader import load_tokenizer_and_config

NAN_BYTE = 0x7F  # float8 e4m3fn NaN: what an fp8 slot nobody wrote may hold


def _fp8_pages(lengths, block_size, kv_heads, head_dim, num_blocks, gen):
    """`fill_pages`'s sequences stored again in an fp8 cache (unwritten slots NaN) with
    random per-head scales; and a float32 cache holding exactly the values it reads back."""
    k32, v32, tables, keys, values = fill_pages(
        lengths, block_size, kv_heads, head_dim, num_blocks, gen
    )
    shape = k32.shape
    k8 = torch.full(shape, NAN_BYTE, dtype=torch.uint8).view(FP8)
    v8 = k8.clone()
    k_scale, v_scale = (torch.rand(kv_heads, generator=gen) / 50 for _ in range(2))
    for table, k, v in zip(tables.tolist(), keys, values):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(k.shape[0])])  # fmt: skip
        store_kv(k, v, k8, v8, slots, k_scale=k_scale, v_scale=v_scale)
        k_back = dequantize(quantize(k, k_scale), k_scale, torch.float32)
        v_back = dequantize(quantize(v, v_scale), v_scale, torch.float32)
        store_kv(k_back, v_back, k32, v32, slots)
    return (k8, v8, k_scale, v_scale), (k32, v32), tables


def test_fp8_store_rounds_to_e4m3_within_its_precision_and_saturates():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, generator=gen) * torch.tensor([0.01, 1.0, 30.0])[:, None]
    scale = x.abs().amax(dim=(0, 2)) * HEADROOM / 448
    back = dequantize(quantize(x, scale), scale, torch.float32)
    normal = x.abs() >= scale[:, None] * 2**-6  # e4m3's normal range, in x's units
    relative = ((back - x).abs() / x.abs())[normal]
    assert 0 < relative.max() <= 2**-4  # 3 mantissa bits: half a step is 1/16
    big = torch.full((1, 3, 16), 1e6)
    assert torch.equal(dequantize(quantize(big, scale), scale, torch.float32)[0, :, 0], scale * 448)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_fp8_paged_attention_is_attention_over_the_values_it_stored(block_size, heads, kv_heads):
    gen = torch.Generator().manual_seed(block_size + heads)
    lengths = [1, block_size - 1, block_size + 1, 3 * block_size + 2, 40]
    query_lens = [1, block_size - 1, 1, 2, 1]
    fp8, (k32, v32), tables = _fp8_pages(lengths, block_size, kv_heads, 16, 64, gen)
    k8, v8, k_scale, v_scale = fp8
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    query = torch.randn(starts[-1], heads, 16, generator=gen)
    args = (tables, lengths, starts, 16**-0.5)
    out = paged_attention(query, k8, v8, *args, k_scale=k_scale, v_scale=v_scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out, paged_attention(query, k32, v32, *args), rtol=1e-6, atol=1e-6)
    tables[2, :1] = tables[3, :1]  # sequences 2 and 3 now share their first block
    groups = [([2, 3], tables[3, :1].long())]
    plain = paged_attention(query, k8, v8, *args, k_scale=k_scale, v_scale=v_scale)
    cascaded = cascade_attention(query, k8, v8, *args, groups, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(cascaded, plain, rtol=1e-5, atol=1e-5)


def test_copy_on_write_copies_fp8_blocks_byte_for_byte():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=FP8)
    cache = KVCache(spec, 6, torch.device("cpu"))
    assert cache.quantized and spec.bytes_per_token == 2 * 2 * 2 * 8
    for layer in cache.k + cache.v:
        layer.view(torch.uint8).copy_(torch.randint(0, 126, layer.shape, dtype=torch.uint8))
    before = [t.view(torch.uint8).clone() for t in cache.k + cache.v]
    cache.copy_blocks(torch.tensor([1, 3]), torch.tensor([4, 0]))
    for old, new in zip(before, cache.k + cache.v):
        raw = new.view(torch.uint8)
        assert torch.equal(raw[4], old[1]) and torch.equal(raw[0], old[3])
        assert torch.equal(raw[[1, 2, 3, 5]], old[[1, 2, 3, 5]])


def test_fp8_holds_twice_bf16s_blocks_and_four_times_fp32s(tiny_model_dirs):
    name = str(tiny_model_dirs["llama"])
    config = load_tokenizer_and_config(name)[1]
    blocks, per_token = {}, {}
    for kv in ("fp32", "bf16", "fp8"):
        engine = resolve_settings({"model": name, "device": "cpu", "kv_memory": "8MiB",
                                   "kv_dtype": kv}).engine  # fmt: skip
        llm = LLM(config=engine)
        blocks[kv] = llm.stats().num_blocks
        per_token[kv] = llm.memory_report()["kv_bytes_per_token"]
        sizing = pool_sizing(engine, config)
        assert (sizing.num_blocks, sizing.kv_bytes_per_token) == (blocks[kv], per_token[kv])
        assert llm.kv_cache.nbytes <= 8 * 2**20
    assert blocks["fp8"] >= 1.9 * blocks["bf16"] and blocks["fp8"] >= 3.8 * blocks["fp32"]
    assert per_token == {"fp32": 512, "bf16": 256, "fp8": 128}  # 2 layers x 2 heads x 16 x 2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_engine_path_gives_the_same_fp8_tokens(arch, tiny_model_dirs):
    """Prefix sharing, cascade, forks (copy-on-write) and chunked prefill read the very
    values a plain run stores: with fixed scales, the same tokens and scores."""
    prompts = random_prompts(448, count=6, seed=3)
    shared = [prompts[0][:40] + p[:20] for p in prompts]  # a common prefix of 40 tokens
    params = SamplingParams(max_tokens=12, logprobs=0)
    results = {}
    for path, options in ENGINE_PATHS.items():
        llm = LLM(tiny_model_dirs[arch], device="cpu", kv_dtype="fp8", num_blocks=128,
                  max_batch_tokens=48, **options)  # fmt: skip
        assert llm.kv_cache.scales_source == MEASURED
        outs = llm.generate(shared, params)
        two = llm.generate(shared[:2], SamplingParams(max_tokens=12, n=2))
        choices = llm.generate(shared, SamplingParams(choices=("the fox", "a dog", "yes")))
        results[path] = (
            [o.completions[0].token_ids for o in outs],
            [[c.token_ids for c in o.completions] for o in two],
            [c.logprob for o in choices for c in o.choices],
        )
        assert all(len({c for c in o}) == 1 for o in results[path][1])  # greedy forks agree
        llm.engine.check_integrity()
    first = next(iter(results.values()))
    for path, (tokens, forks, scores) in results.items():
        assert (tokens, forks) == first[:2], path
        torch.testing.assert_close(scores, first[2], rtol=1e-5, atol=1e-4, msg=path)


def test_measured_scales_are_the_same_on_every_load(tiny_model_dirs):
    a = LLM(tiny_model_dirs["mistral"], device="cpu", kv_dtype="fp8", num_blocks=64)
    b = LLM(tiny_model_dirs["mistral"], device="cpu", kv_dtype="fp8", num_blocks=8)
    assert torch.equal(a.kv_cache.k_scale, b.kv_cache.k_scale)
    assert torch.equal(a.kv_cache.v_scale, b.kv_cache.v_scale)
    assert (a.kv_cache.k_scale > 0).all() and a.kv_cache.k_scale.shape == (2, 2)
    report = a.memory_report()
    assert (report["kv_dtype"], report["kv_scales"]) == ("float8_e4m3fn", MEASURED)


def test_a_checkpoints_kv_scales_are_used(tiny_model_dirs, tmp_path):
    import shutil

    target = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "with-scales")
    weights = load_file(target / "model.safetensors")
    k = {0: torch.tensor(0.05), 1: torch.tensor([0.07, 0.03])}  # a number, or one per head
    for layer in (0, 1):
        weights[f"model.layers.{layer}.self_attn.k_scale"] = k[layer]
        weights[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.02 * (layer + 1))
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(target, device="cpu", kv_dtype="fp8", num_blocks=32)
    assert llm.kv_cache.scales_source == CHECKPOINT
    assert torch.equal(llm.kv_cache.k_scale, torch.tensor([[0.05, 0.05], [0.07, 0.03]]))
    assert torch.equal(llm.kv_cache.v_scale, torch.tensor([[0.02, 0.02], [0.04, 0.04]]))
    assert llm.generate(["The quick brown fox"], SamplingParams(max_tokens=4))[0].text


@pytest.mark.parametrize("kv", ["bf16", "fp16"])
def test_a_16_bit_cache_under_a_float32_model(kv, tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen2"], device="cpu", kv_dtype=kv, num_blocks=64)
    assert llm.kv_cache.k[0].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[kv]
    assert not llm.kv_cache.quantized and llm.memory_report()["kv_scales"] is None
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=6))
    assert len(out[0].completions[0].token_ids) == 6


def test_cli_fp8_run_plan_and_bad_combinations(forked, tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox"}])
    out = tmp_path / "out.jsonl"
    code, err = forked.run(["run", src, "-o", out, *tiny_args(model, "--kv-dtype", "fp8"),
                            "--memory-report"], tmp_path)  # fmt: skip
    assert code == 0, err
    assert f"KV cache: float8_e4m3fn, a scale per layer and KV head: {MEASURED}." in err
    assert len(read_lines(out)) == 1
    report = json.loads((tmp_path / "out.memory.json").read_text())
    assert (report["kv_dtype"], report["kv_bytes_per_token"]) == ("float8_e4m3fn", 128)
    code, text = forked.run(["plan", src, "-m", model, "--device", "cpu", "--num-blocks", "64",
                             "--kv-dtype", "fp8", "--no-estimate", "--json"], tmp_path)  # fmt: skip
    assert code == 0, text
    triton = tmp_path / "triton.toml"
    triton.write_text('attention = "triton"\n')  # plan has no --attention of its own
    for flags, says in (
        (["--kv-dtype", "fp9"], "kv_dtype must be auto or one of fp32, bf16, fp16, fp8"),
        (["--kv-dtype", "fp16", "--config", triton], "a float16 KV cache runs with "
                                                     "--attention torch"),
    ):  # fmt: skip
        for command in (["run", src, "-o", out, "--overwrite", *tiny_args(model, *flags)],
                        ["plan", src, "-m", model, "--device", "cpu", *flags]):  # fmt: skip
            code, err = forked.run(command, tmp_path)
            text = err.strip()
            assert code == 2 and text.startswith("error: ") and "\n" not in text, err
            assert says in text, text


def test_bench_kv_agreement_reports_fp8_against_the_model_dtype(tmp_path, tiny_model_dirs):
    from typer.testing import CliRunner

    from pagedbatch.cli.app import app

    rows = [{"prompt": f"story number {i} " * 3} for i in range(4)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["bench", str(src), "--kv-agreement", "-m", str(tiny_model_dirs["llama"]),
            "--device", "cpu", "--max-tokens", "6", "--threads", "1", "--choices", "yes,no",
            "--json"]  # fmt: skip
    same = json.loads(CliRunner().invoke(app, [*args, "--kv-dtype", "fp32"]).stdout)
    dtypes = (same["kv_dtype"], same["reference_kv_dtype"], same["tokens"])
    assert dtypes == ("float32", "float32", 24)
    assert same["identical_records"] == same["choice_agreement"] == 1.0
    assert same["mean_abs_logprob_diff"] == same["choice_mean_abs_logprob_diff"] == 0.0
    fp8 = json.loads(CliRunner().invoke(app, args).stdout)
    assert fp8["kv_dtype"] == "float8_e4m3fn" and fp8["records"] == 4
    assert fp8["mean_abs_logprob_diff"] > 0 and fp8["choice_mean_abs_logprob_diff"] > 0
    assert 0 <= fp8["token_agreement"] <= 1 and 0 <= fp8["choice_agreement"] <= 1


def test_fp8_on_triton_is_refused_below_compute_capability_8_9_only(monkeypatch):
    """The kernels convert to and from e4m3, which sm_80 cannot compile
    (tests/test_kernel_compile.py); no GPU here, so the device's answers are stood in for."""
    pytest.importorskip("triton")
    from pagedbatch.engine.attention import kv_dtype_problem

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    problem = kv_dtype_problem("triton", FP8, bf16, cuda)
    assert problem is not None and "\n" not in problem
    assert "compute capability 8.9" in problem and "A100 has 8.0" in problem
    assert "pass --attention torch" in problem
    assert kv_dtype_problem("torch", FP8, bf16, cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert kv_dtype_problem("triton", FP8, bf16, cuda) is None
    assert kv_dtype_problem("triton", FP8, torch.float32, torch.device("cpu")) is None
    other = kv_dtype_problem("triton", torch.float16, bf16, cuda)
    assert other is not None and "a float16 KV cache runs with --attention torch" in other
