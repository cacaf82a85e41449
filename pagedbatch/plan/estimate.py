"""A job's time from its token counts and measured rates (plain arithmetic, no model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pagedbatch.plan.rates import PROBE, Rates


@dataclass(frozen=True)
class Estimate:
    """How long generating a job takes at `rates`, as a range: `seconds` takes every record
    to generate its max_tokens (the most it can), `low_seconds` every sample to stop after
    one token (the least); a job that scores choices generates nothing, and the two are
    equal. Loading the model is not included (`load_seconds`, when the probe measured it,
    says how long). `basis` says in words what the figures rest on."""

    seconds: float  # prefill_seconds + decode_seconds: the upper end
    prefill_seconds: float  # prefill_tokens / rates.prefill_tok_s
    decode_seconds: float  # output_tokens / rates.decode_tok_s
    prefill_tokens: int  # prompt tokens left to compute after sharing
    output_tokens: int  # every record's max_tokens (x its samples), within the context
    running_seqs: int  # the most sequences the job runs at once
    rates: Rates
    load_seconds: float | None = None
    low_seconds: float = 0.0  # prefill, and one output token a sample: the lower end
    basis: str = ""
    probe_seconds: float | None = None  # the probe's own time, load included

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate_time(
    prefill_tokens: int,
    output_tokens: int,
    rates: Rates,
    *,
    running_seqs: int,
    load_seconds: float | None = None,
    samples: int = 0,
) -> Estimate:
    """Prefill at `rates.prefill_tok_s`, then every output token at `rates.decode_tok_s`
    (which was measured at `rates.decode_seqs` sequences per step, not `running_seqs`);
    the low end decodes one token for each of the `samples` that generate."""
    prefill = prefill_tokens / rates.prefill_tok_s
    decode = output_tokens / rates.decode_tok_s
    least = min(samples, output_tokens) / rates.decode_tok_s
    return Estimate(
        seconds=prefill + decode,
        prefill_seconds=prefill,
        decode_seconds=decode,
        prefill_tokens=prefill_tokens,
        output_tokens=output_tokens,
        running_seqs=running_seqs,
        rates=rates,
        load_seconds=load_seconds,
        low_seconds=prefill + least,
        basis=_basis(rates, running_seqs, output_tokens),
    )


def _basis(rates: Rates, running_seqs: int, output_tokens: int) -> str:
    where = (
        "a probe of this model just now"
        if rates.source == PROBE
        else f"the last run of this model, device, dtype and thread count ({rates.measured_at})"
    )
    text = f"rates from {where}: prefill {rates.prefill_tok_s:,.0f} tok/s"
    if output_tokens:
        text += (
            f", decode {rates.decode_tok_s:,.0f} tok/s at {rates.decode_seqs:,.0f} sequences "
            f"a step (this job runs up to {running_seqs:,}); the range is every output of "
            "one token to every output at max_tokens"
        )
    else:
        text += "; the job scores choices: no outputs"
    return text + "; loading the model not included"
