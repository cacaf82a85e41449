"""Next tokens from logits: greedy, temperature, top-k, top-p, per-sequence seeds.

All rows are sampled by one set of tensor ops. The randomness is counter-based: the noise
of vocab entry `v` when a sequence with seed `s` samples its token at position `t` is a
hash of `(s, t, v)` alone, so a seeded sequence draws the same tokens alone, in any
batch, in any row, and again after a preemption (which samples the same positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pagedbatch.engine.sequence import Sequence
from pagedbatch.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedbatch.engine.token_masks import StepMask

# The logits' per-row changes before sampling (engine/logits_processor.py).
Processor = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]

_U64 = (1 << 64) - 1


def int64_bits(value: int) -> int:
    """The low 64 bits of `value` as a two's-complement int64."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


# SplitMix64's constants (Steele, Lea, Flood 2014), as int64 for torch.
_GOLDEN = int64_bits(0x9E3779B97F4A7C15)
_MIX1 = int64_bits(0xBF58476D1CE4E5B9)
_MIX2 = int64_bits(0x94D049BB133111EB)
_UNIFORM_BITS = 23  # (k + 1/2) / 2^23 for a 23-bit k is exact in float32 and never 0 or 1


class RowParams(NamedTuple):
    """A step's sampling params, a row per logits row, on the logits' device."""

    packed: torch.Tensor  # [n, 6] int64: seed, position of the token sampled, top-k, then
    # temperature, top-p and min-p as float64 bits (greedy rows: temperature 0)
    sort_width: int | None  # how many of the largest logits the filters sort (None: none)
    min_p: bool = False  # some row has a min-p


def sample_tokens(
    logits: torch.Tensor, seqs: list[Sequence], mask: StepMask | None = None,
    processor: Processor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One token per row of `logits` [num_seqs, vocab], with each sequence's params:
    [num_seqs] int64 on the device of `logits`, without a host sync (the per-row params go
    up in one asynchronous copy, none when all are greedy).

    With a `mask` (the constrained rows' allowed tokens), the tokens it does not allow are
    set to -inf in `logits` first, in place (logprobs see them so). The `processor` then
    changes the rows whose params ask for it (penalties, logit bias, ...) on a copy; those
    changes keep a masked token at -inf. (The engine's step does the same through
    `StepSampler`, with the params kept per row.)"""
    if mask is not None:
        mask.apply(logits)
    if processor is not None:
        logits = processor(logits, seqs)
    randoms = [s.params for s in seqs if not s.params.greedy]
    if not randoms:
        return sample_rows(logits, None)
    width = sort_width(randoms, logits.shape[-1])
    min_p = any(p.min_p > 0 for p in randoms)
    return sample_rows(logits, RowParams(upload(pack(seqs), logits.device), width, min_p))


def sample_rows(logits: torch.Tensor, params: RowParams | None) -> torch.Tensor:
    """`sample_tokens` with the rows' params given (None: every row is greedy)."""
    greedy = logits.argmax(dim=-1)  # [n]
    if params is None:
        return greedy
    packed = params.packed
    seed, position, top_k = packed[:, 0], packed[:, 1], packed[:, 2]
    temperature, top_p, min_p = packed[:, 3:].view(torch.float64).float().unbind(dim=-1)
    random = temperature > 0
    scaled = logits.float() / torch.where(random, temperature, 1.0)[:, None]
    if params.sort_width is not None:  # sorting the vocab costs most
        scaled = filter_top_k_top_p(scaled, top_k, top_p, params.sort_width)
    if params.min_p:
        scaled = filter_min_p(scaled, min_p)
    # Gumbel-max: argmax(logits / T + G) with G = -log(-log U) draws from softmax(logits / T);
    # it is the exponential race argmax(p / E) with E = -log U, taken in logs.
    noisy = uniform_noise(seed, position, logits.shape[-1]).log_().neg_().log_().neg_()
    noisy += scaled
    return torch.where(random, noisy.argmax(dim=-1), greedy)


def top_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the log-probability of its sampled token under the model (log-softmax of
    the logits, before temperature and filters; a constrained row's after its mask) [n]
    float32, and the `width` most likely
    tokens' [n, width] float32 with their ids [n, width] int64, most likely first; on the
    device (the engine reads them back with the tokens)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    values, ids = logprobs.topk(width, dim=-1)
    return chosen, values, ids


# A token's log-probability and its most likely alternatives: [(token id, logprob)].
LogprobEntry = tuple[float, list[tuple[int, float]]]


def logprob_entries(
    chosen: np.ndarray, values: np.ndarray, ids: np.ndarray, widths: np.ndarray
) -> list[tuple[int, LogprobEntry]]:
    """`top_logprobs`' results on the host ([n], then [n, w] flattened twice) as an entry
    per row that asks (`widths[i] >= 0` alternatives): (row, entry)."""
    values, ids = values.reshape(len(widths), -1), ids.reshape(len(widths), -1)
    entries = []
    for i in np.flatnonzero(widths >= 0).tolist():
        k = int(widths[i])
        # A constrained row's masked tokens (-inf) are no alternatives.
        alternatives = [
            (t, v) for t, v in zip(ids[i, :k].tolist(), values[i, :k].tolist()) if v > -math.inf
        ]
        entries.append((i, (float(chosen[i]), alternatives)))
    return entries


def sort_width(params: list[SamplingParams], vocab_size: int) -> int:
    """How many of the largest logits the filters of `params` need sorted: the largest
    top-k when every row has one, else the whole vocab."""
    if all(p.top_k > 0 for p in params):
        return min(vocab_size, max(p.top_k for p in params))
    return vocab_size


def pack(seqs: list[Sequence]) -> np.ndarray:
    """Per-row params on the host [n, 6] int64 (`RowParams.packed`) from the sequences
    themselves (the engine keeps them per row: engine/sampling_slots.py)."""
    ints = np.array(
        [(int64_bits(s.seed), s.num_tokens, s.params.top_k) for s in seqs], dtype=np.int64
    ).reshape(-1, 3)
    floats = np.array(
        [(s.params.temperature, s.params.top_p, s.params.min_p) for s in seqs], dtype=np.float64
    ).reshape(-1, 3)
    return np.concatenate([ints, floats.view(np.int64)], axis=1)


def upload(host: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without a host sync (pinned memory, asynchronous copy)."""
    if isinstance(host, np.ndarray):
        host = torch.from_numpy(host)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) noise [n, vocab_size] float32: entry (i, v) is a hash of (seed[i], position[i], v).

    Row i is SplitMix64's stream from the key mix64(mix64(seed + golden) + position):
    entry v is mix64(key + v * golden), of which the top 23 bits are used.
    """
    key = _mix64(_mix64(seed + _GOLDEN) + position)  # [n]
    steps = torch.arange(vocab_size, device=seed.device) * _GOLDEN  # [vocab]
    z = key[:, None] + steps[None, :]  # [n, vocab]
    scratch = torch.empty_like(z)  # in place from here: no [n, vocab] temporaries
    for shift, factor in ((30, _MIX1), (27, _MIX2)):
        z ^= _shift_right(z, shift, out=scratch)
        z *= factor
    # mix64's last step, z ^ (z >>> 31), leaves the top 33 bits as they are: skipped.
    bits = _shift_right(z, 64 - _UNIFORM_BITS, out=scratch)
    return bits.float().add_(0.5).mul_(2.0**-_UNIFORM_BITS)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer, a bijection of int64 (torch's int64 arithmetic wraps)."""
    for shift, factor in ((30, _MIX1), (27, _MIX2)):
        z = (z ^ _shift_right(z, shift)) * factor
    return z ^ _shift_right(z, 31)


def _shift_right(z: torch.Tensor, shift: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The logical shift z >>> shift (torch's >> on int64 copies the sign bit in)."""
    shifted = torch.bitwise_right_shift(z, shift, out=out)
    return shifted.bitwise_and_((1 << (64 - shift)) - 1)


def filter_top_k_top_p(
    logits: torch.Tensor,  # [n, vocab]
    top_k: torch.Tensor,  # [n] int, 0 = off
    top_p: torch.Tensor,  # [n] float, 1 = off
    width: int | None = None,
) -> torch.Tensor:
    """Logits with every token outside the top-k, then outside the top-p mass, set to -inf.

    With `width`, only the `width` largest logits of a row are sorted and the rest set to
    -inf: right for rows whose top-k is at most `width`.
    """
    vocab_size = logits.shape[-1]
    if width is None or width >= vocab_size:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
    else:
        sorted_logits, order = logits.topk(width, dim=-1)  # [n, width], largest first
    ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab_size)
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below p (the first token always stays).
    outside_p = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] with every token whose probability is below `min_p` [n] (0 = off)
    times the row's top probability set to -inf (the top token always stays)."""
    probs = logits.softmax(dim=-1)
    below = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(below, float("-inf"))
