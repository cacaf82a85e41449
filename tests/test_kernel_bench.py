"""The decode kernel benchmark's verdict and table, from crafted results (measuring needs
CUDA: scripts/gpu_checks.sh runs it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pagedbatch.kernels.bench import Result, goal_verdict

from pagedbatch.cli.kernel_bench import HEADER, goal_line, row

GB = 10**9


def result(batch: int, context: int, kv_gb: float, triton_ms: float, **kw: object) -> Result:
    fields = {"shape": "llama-3.2-1b", "splits": 1, "torch_ms": 4 * triton_ms, "max_error": 1e-3}
    return Result(**{**fields, **kw}, batch=batch, context=context, triton_ms=triton_ms,
                  kv_bytes=int(kv_gb * GB))  # fmt: skip


def test_the_goal_is_judged_on_the_slowest_large_case_only():
    copy_bw = 1000 * GB  # bytes per second
    results = [
        result(8, 4096, 1.0, 10.0),  # 100 GB/s, but batch < 64: not judged
        result(64, 128, 1.0, 10.0),  # context < 1024: not judged
        result(64, 1024, 0.8, 1.0),  # 800 GB/s: 80%
        result(256, 4096, 3.0, 5.0),  # 600 GB/s: 60%, the worst judged
        result(256, 4096, 1.5, 5.0, kv_dtype="fp8"),  # 30%: an fp8 cache is not judged
    ]
    verdict = goal_verdict(results, copy_bw)
    assert verdict is not None and verdict.worst is results[3]
    assert verdict.fraction == pytest.approx(0.6) and not verdict.met
    assert goal_line(verdict).endswith("NOT met; worst 60% at llama-3.2-1b batch 256 context 4096")
    met = goal_verdict(results[:3], copy_bw)
    assert met is not None and met.met and met.worst is results[2]
    assert goal_verdict(results[:2], copy_bw) is None
    assert goal_line(None) == "goal: no case with batch >= 64 and context >= 1024 was run"


def test_a_row_has_the_header_s_columns():
    line = row(result(64, 1024, 0.8, 1.0), 1000 * GB)
    assert len(line) == len(HEADER)
    assert line.split() == ["llama-3.2-1b", "auto", "64", "1024", "1", "1000.0", "800", "80%",
                            "4000.0", "200", "20%", "4.0x", "1.0e-03"]  # fmt: skip
    out_of_memory = row(result(64, 1024, 0.8, 1.0, torch_ms=None, max_error=None), 1000 * GB)
    assert out_of_memory.split()[-3:] == ["out", "of", "memory"]  # no speedup, no error
    assert len(out_of_memory) == len(HEADER)


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on a GPU")
def test_without_cuda_it_says_where_the_kernels_are_checked():
    done = subprocess.run(
        [sys.executable, "-m", "pagedbatch.cli.kernel_bench"], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "needs a CUDA GPU" in done.stderr and "tests/test_kernels.py" in done.stderr
