"""Next tokens from logits: greedy, temperature, top-k, top-p, per-sequence seeds."""

from __future__ import annotations

import torch

from pagedbatch.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` [num_seqs, vocab], with each sequence's params.

    Random rows draw from their own sequence's generator, so a seeded sequence samples
    the same tokens whatever else is in the batch.
    """
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        tokens[rows] = _sample_rows(logits[rows].float(), [seqs[i] for i in rows])
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    top_k = torch.tensor([s.params.top_k for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    probs = filter_top_k_top_p(logits / temperature[:, None], top_k, top_p).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race).
    noise = torch.stack(
        [torch.empty_like(probs[0]).exponential_(generator=s.generator) for s in seqs]
    )
    return (probs / noise).argmax(dim=-1)


def filter_top_k_top_p(
    logits: torch.Tensor,  # [n, vocab]
    top_k: torch.Tensor,  # [n] int, 0 = off
    top_p: torch.Tensor,  # [n] float, 1 = off
) -> torch.Tensor:
    """Logits with every token outside the top-k, then outside the top-p mass, set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below p (the first token always stays).
    outside_p = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
