"""Floating-point work: the machine's matmul peak and what a job's forwards cost."""

from __future__ import annotations

import time

import torch

# The shape of the peak: a large prefill's MLP up-projection on SmolLM2-135M's width.
PEAK_SHAPE = (4096, 576, 1536)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` [4096 x 576] @ [576 x 1536] matmuls on `device` in
    `dtype` (CPU time on CPU: a busy machine disturbs it less), on torch's current
    threads."""
    m, k, n = PEAK_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = clock()
        torch.nn.functional.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, clock() - started)
    return 2 * m * k * n / best


def forward_flops(model: torch.nn.Module, computed_tokens: int, head_rows: int) -> float:
    """The matmul work of forwards over `computed_tokens` tokens whose LM head ran on
    `head_rows` of them: 2 x every linear layer's weights per token (attention's own
    scores and sums left out)."""
    head = model.get_output_embeddings()
    body = sum(
        m.weight.numel() for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )  # fmt: skip
    return 2.0 * (body * computed_tokens + head.weight.numel() * head_rows)
