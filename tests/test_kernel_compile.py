"""Every Triton launch a GPU run makes compiles for sm_90 and sm_80, checked without a GPU.

The interpreter that runs the kernels on CPU (tests/test_kernels.py) is Python: it enters
a branch only when the value at hand says so, and has no registers. The compiler builds
every branch on a runtime value (an int assigned in a kernel is one: `start = 0`), turns
int arguments equal to 1 into constants, and may spill registers to local memory. So here
Triton's CUDA backend compiles each launch for real (ptxas ships with the wheel): a stub
driver stands for the GPU, the wrappers are called with CPU tensors in the engine's
layouts and call order (`PagedAttention._triton`), and `kernel[grid](...)` compiles
instead of launching (`kernel.run(..., grid=grid, warmup=True)`). Each distinct
specialisation compiles once (Triton's cache, keyed by its signature, constants and
options), and is reported with the first launch that needed it.

The launches: store; decode with one and several splits, with and without cascade (its
prefix kernel and the merge); extend with and without cascade; bfloat16, float16 and
float32; head dims 64 and 128; GQA 1, 3, 4; one KV head; block tables 1, 16 and 20
blocks wide (Triton specialises on 1 and on multiples of 16). Every pair of 16-bit dtype,
head dim and GQA ratio is covered, not every combination, and float32 at both head dims:
about 100 specialisations per architecture, 40 s of one core each. And an fp8 KV cache
under bfloat16, float16 and float32 queries (about 36 more): on sm_90 they compile like
the rest; on sm_80 they cannot (no float8 e4m3 conversion below compute capability 8.9),
every fp8 launch fails there, quickly, and only those: why `triton_common.fp8_problem`
refuses it.

One child process per architecture compiles (the stub driver is process-wide, and under
TRITON_INTERPRET=1 the kernels cannot be compiled in-process). By hand:

    python tests/test_kernel_compile.py 90 80     # the table: registers, shared memory, spills
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
import torch

triton = pytest.importorskip("triton")

if TYPE_CHECKING:
    from pagedbatch.engine.cascade import CascadePlan

ARCHS = (90, 80)  # H100 / H200, A100
FP8_ARCH = 89  # the first with float8 e4m3 conversion (triton_common.fp8_problem)
# Bytes of spill stores a kernel may have, in any dtype: ptxas may trade a word for
# occupancy (decode, head dim 128, GQA 1: 4 bytes at 96 registers rather than 118).
SPILL_BUDGET = 16
TIMEOUT = 600  # seconds per architecture (about 45 on an idle core before fp8's ~15)


class Compiled(NamedTuple):
    """One distinct specialisation of a kernel, compiled for `arch`."""

    arch: int
    kernel: str
    launch: str  # the first launch that compiled it
    regs: int | None
    smem: int | None  # bytes of shared memory (Triton's allocation)
    spills: int | None  # bytes of spill stores (ptxas -v)
    seconds: float
    error: str | None = None


class Shape(NamedTuple):
    """A model's attention shape and a step's block-table width."""

    dtype: torch.dtype
    head_dim: int
    group: int  # query heads per KV head
    num_kv_heads: int
    width: int  # blocks per table row: the longest context needs exactly these
    splits: int  # decode splits when there are several (num_splits_for on a GPU: 2..64)
    fp8: bool = False  # the KV cache in float8 e4m3 (with its scales), else in `dtype`

    @property
    def label(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        return (
            f"{dtype[self.dtype]} d{self.head_dim} gqa{self.group} kv{self.num_kv_heads} "
            f"w{self.width}{' fp8-kv' if self.fp8 else ''}"
        )


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SHAPES = (  # every pair of (16-bit dtype, head dim, GQA); widths 20, 16 and 1 among them
    Shape(BF16, 64, 4, 8, 20, 8),  # Llama-3.2-1B
    Shape(BF16, 128, 1, 4, 16, 64),
    Shape(FP16, 64, 1, 4, 16, 16),
    Shape(FP16, 128, 3, 2, 20, 8),
    Shape(BF16, 64, 3, 3, 20, 8),  # SmolLM2-135M
    Shape(FP16, 128, 4, 8, 20, 8),
    Shape(BF16, 128, 4, 1, 1, 8),  # one KV head; every context within one block
    Shape(FP32, 64, 4, 8, 20, 8),
    Shape(FP32, 128, 1, 4, 16, 16),
    Shape(BF16, 64, 4, 8, 20, 8, fp8=True),
    Shape(FP16, 128, 1, 4, 16, 16, fp8=True),
    Shape(FP32, 128, 3, 2, 20, 8, fp8=True),
)
BLOCK_SIZE = 16  # the engine's default


class Step(NamedTuple):
    """One layer's inputs of an engine step, laid out as `ModelRunner` and
    `PagedAttention` make them: decoding and extending sequences in one ragged batch."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    scales: dict[str, torch.Tensor]  # an fp8 cache's k_scale and v_scale, else empty
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, width] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    cascade: CascadePlan | None


def make_step(shape: Shape) -> Step:
    """Six sequences: three decoding, three extending; two of each share a prefix (when
    the table is wide enough for one: a whole block before their new tokens)."""
    from pagedbatch.engine.cascade import CascadeGroup, make_plan

    bs, width = BLOCK_SIZE, shape.width
    most = width * bs  # the longest context fills the last block of the table
    # (context after the step, new tokens)
    seqs = [(most, 1), (most - 3, 1), (most - 9, 1), (most - 1, 7), (most - 4, 17), (bs, 5)]
    if width == 1:
        seqs = [(bs, 1), (9, 1), (3, 1), (bs - 1, 7), (12, 12), (6, 5)]
    tables = torch.arange(len(seqs) * width, dtype=torch.int32).reshape(len(seqs), width)
    groups = []
    if width > 1:
        shared = width // 2
        tables[1, :shared] = tables[0, :shared]
        tables[4, :shared] = tables[3, :shared]
        groups = [CascadeGroup((0, 1), shared), CascadeGroup((3, 4), shared)]
    query_lens = [n for _, n in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_tokens, num_heads = starts[-1], shape.num_kv_heads * shape.group
    kv_shape = (len(seqs) * width, bs, shape.num_kv_heads, shape.head_dim)
    plan = make_plan(groups, tables.numpy(), bs, starts, torch.device("cpu"))
    kv_dtype = torch.float8_e4m3fn if shape.fp8 else shape.dtype
    scales = {}
    if shape.fp8:  # a layer's rows of KVCache.k_scale / v_scale
        scales = {n: torch.ones(3, shape.num_kv_heads)[1] for n in ("k_scale", "v_scale")}
    return Step(
        query=torch.empty(num_tokens, num_heads, shape.head_dim, dtype=shape.dtype),
        key=torch.empty(num_tokens, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype),
        k_cache=torch.empty(kv_shape, dtype=kv_dtype),
        v_cache=torch.empty(kv_shape, dtype=kv_dtype),
        scales=scales,
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64),
        block_tables=tables,
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(query_lens),
        cascade=plan,
    )


def run_launches(shape: Shape, compiler: Compiler) -> None:
    """The launches of one layer of the step, as `PagedAttention._triton` makes them, with
    and without its cascade plan and with one and several decode splits."""
    from pagedbatch.kernels.decode_attention import SplitWorkspace, decode_attention
    from pagedbatch.kernels.prefill_attention import prefill_attention
    from pagedbatch.kernels.store import store_kv

    step = make_step(shape)
    args = (step.query, step.k_cache, step.v_cache, step.block_tables, step.context_lens,
            step.query_start_loc, shape.head_dim**-0.5)  # fmt: skip
    compiler.launch = f"{shape.label}: store"
    store_kv(step.key, step.key, step.k_cache, step.v_cache, step.slot_mapping, **step.scales)
    workspace = SplitWorkspace(step.query.device)
    plans = [None] if step.cascade is None else [None, step.cascade]
    for plan in plans:
        with_plan = ", cascade" if plan else ""
        for splits in (1, shape.splits):
            compiler.launch = f"{shape.label}: decode, {splits} split(s){with_plan}"
            decode_attention(*args, 4096, num_splits=splits, out=torch.empty_like(step.query),
                             workspace=workspace, cascade=plan and plan.decode_part,
                             **step.scales)  # fmt: skip
        compiler.launch = f"{shape.label}: extend{with_plan}"
        prefill_attention(*args, step.max_query_len, min_query_len=2,
                          out=torch.empty_like(step.query),
                          cascade=plan and plan.extend_part, **step.scales)  # fmt: skip


class CompileOnlyDriver:
    """Triton's active driver while compiling for `arch` without a GPU: it reports the
    target; nothing launches, so nothing else is asked of it."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


class Compiler:
    """`kernel[grid](...)` while installed: compile (warmup), record each new
    specialisation under `launch`, launch nothing."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.launch = ""
        self.compiled: dict[str, Compiled] = {}  # by kernel hash (errors: by kernel and launch)

    def __call__(self, kernel, grid):
        def compile_(*args, **kwargs) -> None:
            log = io.StringIO()  # ptxas -v, printed by Triton with dump_ptxas_log
            started = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 (every compile error is a finding)
                error = _summary(e)
                key = f"{kernel.fn.__name__} {self.launch}"
                self.compiled[key] = Compiled(self.arch, kernel.fn.__name__, self.launch,
                                              None, None, None, 0.0, error)  # fmt: skip
                return
            if compiled.hash not in self.compiled:
                report = log.getvalue()
                self.compiled[compiled.hash] = Compiled(
                    self.arch, kernel.fn.__name__, self.launch,
                    regs=_number(r"Used (\d+) registers", report),
                    smem=compiled.metadata.shared,
                    spills=_number(r"(\d+) bytes spill stores", report),
                    seconds=time.perf_counter() - started,
                )  # fmt: skip

        return compile_


def _summary(error: Exception) -> str:
    """A compile error in one line: where, the source line it points at, and the cause."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    carets = [i for i, line in enumerate(lines) if line.strip() == "^" and i > 0]
    source = f" {lines[carets[-1] - 1].strip()!r}" if carets else ""
    return f"{type(error).__name__} {lines[0]}{source}: {lines[-1]}"


def _number(pattern: str, text: str) -> int | None:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else None


def compile_all(arch: int) -> list[Compiled]:
    """Compile every launch of `SHAPES` for sm_`arch` in this process (which it changes
    for good: the stub driver stays active)."""
    from pagedbatch.kernels import triton_common
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import KernelInterface

    if triton_common.INTERPRETED:
        raise RuntimeError("compiling needs TRITON_INTERPRET unset")
    compiler = Compiler(arch)
    driver.set_active(CompileOnlyDriver(arch))
    KernelInterface.__getitem__ = lambda kernel, grid: compiler(kernel, grid)
    triton_common.launch_problem = lambda device: None  # CPU tensors: nothing launches
    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache  # compile afresh (ptxas reports), leave no cache behind
        for shape in SHAPES:
            run_launches(shape, compiler)
    return list(compiler.compiled.values())


def _fp8_below_89(r: Compiled) -> bool:
    """A kernel of an fp8 cache's launch compiled below sm_89 (the merge reads no cache)."""
    return "fp8-kv" in r.launch and r.arch < FP8_ARCH and r.kernel != "_decode_merge_kernel"


def launchable_kernels() -> set[str]:
    """The names of every kernel in pagedbatch.kernels (JIT functions named *_kernel)."""
    names = set()
    for path in (Path(__file__).parents[1] / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", path.read_text()))
    return names


def table(results: list[Compiled]) -> str:
    lines = [f"{'arch':<6}{'kernel':<24}{'regs':>5}{'smem':>8}{'spills':>7}{'s':>6}  launch"]
    for r in sorted(results, key=lambda r: (r.arch, r.kernel, r.launch)):
        if r.error:
            lines.append(f"sm_{r.arch:<3}{r.kernel:<24}  FAILS to compile  {r.launch}: {r.error}")
            continue
        lines.append(
            f"sm_{r.arch:<3}{r.kernel:<24}{r.regs:>5}{r.smem:>8}{r.spills:>7}{r.seconds:>6.1f}"
            f"  {r.launch}"
        )
    return "\n".join(lines)


def compile_in_children(archs: tuple[int, ...]) -> tuple[list[Compiled], dict[int, float]]:
    """Compile for each of `archs` in a child process of its own, all at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.perf_counter()
    children = {
        arch: subprocess.Popen(
            [sys.executable, __file__, "--json", str(arch)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in archs
    }
    results, seconds = [], {}
    try:
        for arch, child in children.items():
            out, err = child.communicate(timeout=TIMEOUT)
            seconds[arch] = time.perf_counter() - started
            assert child.returncode == 0, f"sm_{arch} compile run failed:\n{err[-4000:]}"
            results += [Compiled(*json.loads(line)) for line in out.splitlines()]
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
    return results, seconds


@pytest.fixture(scope="module")
def compiled() -> list[Compiled]:
    results, seconds = compile_in_children(ARCHS)
    print(f"\n{table(results)}")
    print(", ".join(f"sm_{a}: {len([r for r in results if r.arch == a])} kernels in {s:.0f} s"
                    for a, s in seconds.items()))  # fmt: skip
    return results


def test_every_launch_compiles_for_sm90_and_sm80(compiled: list[Compiled]):
    """All of them, but an fp8 cache's on sm_80: those fail, every one (the refusal)."""
    failed = [r for r in compiled if r.error and not _fp8_below_89(r)]
    assert not failed, "kernels that do not compile:\n" + table(failed)
    fp8_below = [r for r in compiled if _fp8_below_89(r)]
    assert fp8_below and all(r.error and "fp8e4nv" in r.error for r in fp8_below), (
        "fp8 launches below sm_89 should fail to compile:\n" + table(fp8_below)
    )
    fp8_above = {r.kernel for r in compiled if "fp8-kv" in r.launch and r.arch >= FP8_ARCH}
    assert fp8_above >= launchable_kernels() - {"_decode_merge_kernel"}, fp8_above
    unreported = [r.kernel for r in compiled if not r.error and None in (r.regs, r.spills)]
    assert not unreported, f"no ptxas -v report for {unreported}"
    for arch in ARCHS:
        names = {r.kernel for r in compiled if r.arch == arch}
        assert names == launchable_kernels(), f"sm_{arch}: launches compiled only {names}"


def test_no_kernel_spills_registers(compiled: list[Compiled]):
    """In every dtype: float32 too, on its 16 x 16 tiles (triton_common.FLOAT32_TILE), and
    with an fp8 cache (under float32 queries unpipelined: triton_common.pipeline_stages)."""
    spilling = [r for r in compiled if not r.error and r.spills > SPILL_BUDGET]
    assert not spilling, f"spills over {SPILL_BUDGET} bytes:\n" + table(spilling)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--json"]:  # a child of compile_in_children: one architecture
        torch.set_num_threads(1)
        for r in compile_all(int(sys.argv[2])):
            print(json.dumps(r))
    else:
        results, _ = compile_in_children(tuple(map(int, sys.argv[1:])) or ARCHS)
        print(table(results))
