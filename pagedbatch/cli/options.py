"""The options several commands share (`run`, `plan`, `bench`), each declared once here:
one name, one help text, one panel, whichever command shows it. A command imports this
module as `shared` and declares `threads: shared.Threads = None`."""

from __future__ import annotations

from typing import Annotated

import typer

from pagedbatch.cli.common import Int, Str, opt
from pagedbatch.job.settings import RunSettings
from pagedbatch.models.random_presets import RANDOM_PRESETS

DEFAULT = RunSettings()  # shown in --help

INPUT_PANEL, OUTPUT_PANEL, MODEL_PANEL, MEMORY_PANEL, SAMPLING_PANEL, RAY_PANEL = (
    "Input",
    "Output",
    "Model",
    "KV cache and batching",
    "Sampling",
    "Ray cluster",
)
STRUCTURED_PANEL = "Structured output"
_ENGINE = DEFAULT.engine

# fmt: off
Input = Annotated[str, typer.Argument(help="JSONL file (plain or OpenAI batch), local data file (json, csv, parquet), dataset saved with save_to_disk, or a Hugging Face dataset name.", show_default=False)]
Config = Annotated[Str, opt(MODEL_PANEL, "Preset name from configs/ (cpu, gpu, tiny) or a TOML file; flags given here win.")]

Split = Annotated[Str, opt(INPUT_PANEL, "Dataset split. [default: train, or the only one]")]
PromptField = Annotated[Str, opt(INPUT_PANEL, f"Field holding the prompt text. [default: {DEFAULT.prompt_field}]")]
MessagesField = Annotated[Str, opt(INPUT_PANEL, f"Field holding chat messages. [default: {DEFAULT.messages_field}]")]
IdField = Annotated[Str, opt(INPUT_PANEL, f"Field holding the record id (missing: line number, or row index). [default: {DEFAULT.id_field}]")]
Template = Annotated[Str, opt(INPUT_PANEL, 'Build each prompt from the record\'s fields, e.g. "Classify the review: {text}".')]
System = Annotated[Str, opt(INPUT_PANEL, "System message put before each prompt (implies --chat).")]
Chat = Annotated[bool | None, opt(INPUT_PANEL, "Render plain prompts through the model's chat template too. [default: no-chat]", "--chat/--no-chat")]

Model = Annotated[Str, opt(MODEL_PANEL, f"Local model directory, .gguf file, hub id, the alias smollm2-135m (embedded), or a random-weight preset ({', '.join(RANDOM_PRESETS)}). [default: {_ENGINE.model}]", "--model", "-m")]
Device = Annotated[Str, opt(MODEL_PANEL, f"auto, cpu or cuda. [default: {_ENGINE.device}]")]
Dtype = Annotated[Str, opt(MODEL_PANEL, "Weights and KV dtype: auto (bfloat16 on CUDA and on CPUs with native bfloat16 matmul, AMX or AVX512-BF16; else float32), float32, bfloat16 or float16. [default: auto]")]
Quantize = Annotated[Str, opt(MODEL_PANEL, "Quantize the weights at load with torchao (pip install \"pagedbatch[quantize]\"): int8 (weight-only, per-row scales; runs on CPU too), int4 (weight-only, groups of 128; CUDA, compute capability 8.0+, --dtype bfloat16) or fp8 (weights and activations; CUDA, compute capability 8.9+). A checkpoint quantized already (GPTQ, AWQ, compressed-tensors, bitsandbytes, ...) loads through its own quantizer without it. [default: none]")]
MaxModelLen = Annotated[Int, opt(MODEL_PANEL, "Cap on prompt + output tokens. [default: the model's context]")]
CacheDir = Annotated[Str, opt(MODEL_PANEL, "Where converted models and the rates of the last runs (for plan) are kept. [default: $PAGEDBATCH_CACHE or ~/.cache/pagedbatch]")]
Threads = Annotated[Int, opt(MODEL_PANEL, "CPU threads torch computes with; threads sharing a core with another process stall each other. [default: on CPU, the CPUs this process may use less those other processes keep busy at start, at least 1; torch's own on CUDA or when OMP_NUM_THREADS is set]")]
TensorParallel = Annotated[Int, opt(MODEL_PANEL, "Shard the model over N processes of this machine (ranks r on cuda:r, or N processes on CPU over gloo): attention heads, KV heads and MLP split by the architecture's transformers plan; rank 0 schedules and samples. Torch attention, no CUDA graphs. With --ray, each replica is N GPUs (or CPUs) of one node. [default: 1]", "--tensor-parallel")]
CudaGraphs = Annotated[bool | None, opt(MODEL_PANEL, "Replay decode-only steps from CUDA graphs captured at load (needs triton attention); prefill and mixed steps run eagerly. [default: on with CUDA and triton attention; if the capture fails, off with a warning]", "--cuda-graphs/--no-cuda-graphs")]

BlockSize = Annotated[Int, opt(MEMORY_PANEL, f"Tokens per KV block (power of two). [default: {_ENGINE.block_size}]")]
NumBlocks = Annotated[Int, opt(MEMORY_PANEL, "Number of KV blocks (instead of --kv-memory).")]
KvMemory = Annotated[Str, opt(MEMORY_PANEL, "KV cache size: bytes like 2GiB or 512MB, or a fraction like 0.5 of the memory free once the weights are loaded (as `pagedbatch plan` counts it). [default: 0.8 on CUDA; on CPU what the job could hold at once (as plan reports), at most 0.25 of available RAM up to 4GiB]")]
KvDtype = Annotated[Str, opt(MEMORY_PANEL, "The KV cache's dtype: auto (the model's), fp32, bf16, fp16 or fp8 (float8 e4m3 with a scale per layer and KV head: the checkpoint's k_scale/v_scale, else measured on a fixed text at load; half of bf16's bytes). fp8 runs on both attention backends (triton: CUDA compute capability 8.9+); another dtype than the model's with --attention torch only. [default: auto]", "--kv-dtype")]
MaxBatchTokens = Annotated[Int, opt(MEMORY_PANEL, f"Token budget of one step; longer prompts are prefilled in chunks. [default: {_ENGINE.max_batch_tokens}]")]
MaxNumSeqs = Annotated[Int, opt(MEMORY_PANEL, f"Most sequences running at once. [default: {_ENGINE.max_num_seqs}]")]
PrefixSharing = Annotated[bool | None, opt(MEMORY_PANEL, "Compute and store each shared prompt prefix once (radix cache), running records that share it together. [default: prefix-sharing]", "--prefix-sharing/--no-prefix-sharing")]

MaxTokens = Annotated[Int, opt(SAMPLING_PANEL, f"Most tokens generated per record (a record's max_tokens wins). [default: {DEFAULT.sampling.max_tokens}]")]
Choices = Annotated[Str, opt(SAMPLING_PANEL, 'Score these labels instead of generating: "positive,negative,neutral" (stripped), or a JSON list to keep spaces (\'[" yes", " no"]\'); a record\'s choices win. run writes the best label and every choice\'s logprob and probability; plan counts their tokens, and no outputs.', "--choices")]
ChoiceScore = Annotated[Str, opt(SAMPLING_PANEL, f"How choices are compared: sum (their log-probability) or mean (per token, which does not favour short choices). [default: {DEFAULT.sampling.choice_score}]", "--choice-score")]
JsonSchema = Annotated[Str, opt(STRUCTURED_PANEL, "Every output is JSON valid under this schema, inline ('{\"type\": \"object\", ...}') or a file; run's lines carry the parsed value as \"json\", plan counts the constrained records. One constraint flag at most; a record's own response_format, regex or grammar wins.", "--json-schema")]
JsonObject = Annotated[bool | None, opt(STRUCTURED_PANEL, "Every output is a JSON object (any); run's lines carry it parsed as \"json\".", "--json")]
Regex = Annotated[Str, opt(STRUCTURED_PANEL, "Every output matches this regular expression whole.", "--regex")]
Grammar = Annotated[Str, opt(STRUCTURED_PANEL, "Every output is derived by this grammar file (EBNF / GBNF as xgrammar reads it, with a root rule).", "--grammar")]
N = Annotated[Int, opt(SAMPLING_PANEL, f"Samples per record, 1 to 4096 (a record's n wins): the prompt is computed once, its pages shared. [default: {DEFAULT.sampling.n}]", "--n")]
# fmt: on
