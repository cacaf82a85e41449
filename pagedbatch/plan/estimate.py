"""A job's time from its token counts and measured rates (plain arithmetic, no model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pagedbatch.plan.rates import Rates


@dataclass(frozen=True)
class Estimate:
    """How long generating a job takes at `rates`: an upper bound, since every record is
    taken to generate its max_tokens (a record that stops at EOS takes less). Loading the
    model is not included (`load_seconds`, when the probe measured it, says how long)."""

    seconds: float  # prefill_seconds + decode_seconds
    prefill_seconds: float  # prefill_tokens / rates.prefill_tok_s
    decode_seconds: float  # output_tokens / rates.decode_tok_s
    prefill_tokens: int  # prompt tokens left to compute after sharing
    output_tokens: int  # every record's max_tokens (x its samples), within the context
    running_seqs: int  # the most sequences the job runs at once
    rates: Rates
    load_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate_time(
    prefill_tokens: int,
    output_tokens: int,
    rates: Rates,
    *,
    running_seqs: int,
    load_seconds: float | None = None,
) -> Estimate:
    """Prefill at `rates.prefill_tok_s`, then every output token at `rates.decode_tok_s`
    (which was measured at `rates.decode_seqs` sequences per step, not `running_seqs`)."""
    prefill = prefill_tokens / rates.prefill_tok_s
    decode = output_tokens / rates.decode_tok_s
    return Estimate(
        seconds=prefill + decode,
        prefill_seconds=prefill,
        decode_seconds=decode,
        prefill_tokens=prefill_tokens,
        output_tokens=output_tokens,
        running_seqs=running_seqs,
        rates=rates,
        load_seconds=load_seconds,
    )
