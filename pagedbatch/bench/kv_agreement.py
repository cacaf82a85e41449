"""How far a KV cache dtype (fp8) moves a model's outputs from its own dtype's cache.

The same records run twice on the same weights, greedy: once with the KV cache in the
model's dtype (the reference), once in the dtype under test. Compared per record: the
greedy tokens (identical, or up to where they first differ), the first word of the text
(the label of a labelling job), the log-probabilities of the tokens both chose in the same
context (before the first difference), and with `choices` the best label and the choices'
log-probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pagedbatch.engine.config import EngineConfig
from pagedbatch.llm import LLM
from pagedbatch.outputs import RequestOutput
from pagedbatch.requests.records import Record
from pagedbatch.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVAgreement:
    """The dtype under test against the reference, over `records` records."""

    model: str
    kv_dtype: str
    reference_kv_dtype: str
    records: int
    tokens: int  # greedy tokens of the reference
    identical_records: float  # records whose greedy tokens are all the same
    token_agreement: float  # tokens before each record's first difference / `tokens`
    first_word_agreement: float  # records whose text has the same first word (the label)
    mean_abs_logprob_diff: float  # over the tokens before the first difference
    max_abs_logprob_diff: float
    choice_agreement: float | None = None  # records with the same best choice
    choice_mean_abs_logprob_diff: float | None = None  # over every choice's logprob
    seconds: float = 0.0  # both runs, loading included

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_kv_agreement(
    records: Sequence[Record],
    engine: EngineConfig,
    kv_dtype: str,
    max_tokens: int,
    choices: tuple[str, ...] | None = None,
) -> KVAgreement:
    """Run `records` greedy (and scored against `choices`) with the KV cache in the
    model's dtype and in `kv_dtype`, on `engine`'s model and device; compare."""
    started = time.perf_counter()
    generate = SamplingParams(max_tokens=max_tokens, logprobs=0)
    score = SamplingParams(choices=choices) if choices else None
    runs, dtypes = [], []
    for dtype in ("auto", kv_dtype):
        llm = LLM(config=engine.replace(kv_dtype=dtype))
        dtypes.append(str(llm.kv_cache.spec.dtype).removeprefix("torch."))
        runs.append(
            (llm.generate(records, generate), llm.generate(records, score) if score else None)
        )
        del llm
    (ref, ref_scored), (test, test_scored) = runs
    same, diffs, compared, identical, words = 0, [], 0, 0, 0
    for a, b in zip(ref, test, strict=True):
        if a.error is not None or b.error is not None:  # (too long for the model)
            identical += a.error == b.error
            words += a.error == b.error
            continue
        x, y = a.completions[0], b.completions[0]
        n = _common_prefix(x.token_ids, y.token_ids)
        same += n
        compared += len(x.token_ids)
        identical += x.token_ids == y.token_ids
        words += _first_word(x.text) == _first_word(y.text)
        diffs += [abs(p.logprob - q.logprob) for p, q in zip(x.logprobs[:n], y.logprobs[:n])]
    result = KVAgreement(
        model=engine.model, kv_dtype=dtypes[1], reference_kv_dtype=dtypes[0],
        records=len(records), tokens=compared, identical_records=identical / len(records),
        token_agreement=same / max(compared, 1), first_word_agreement=words / len(records),
        mean_abs_logprob_diff=math.fsum(diffs) / max(len(diffs), 1),
        max_abs_logprob_diff=max(diffs, default=0.0),
    )  # fmt: skip
    if ref_scored is not None and test_scored is not None:
        result = _with_choices(result, ref_scored, test_scored)
    seconds = time.perf_counter() - started
    return KVAgreement(**{**asdict(result), "seconds": seconds})


def _with_choices(
    result: KVAgreement, ref: list[RequestOutput], test: list[RequestOutput]
) -> KVAgreement:
    labels = sum(a.label == b.label for a, b in zip(ref, test, strict=True))
    diffs = [
        abs(p.logprob - q.logprob)
        for a, b in zip(ref, test)
        for p, q in zip(a.choices or (), b.choices or (), strict=True)
    ]
    return KVAgreement(**{
        **asdict(result), "choice_agreement": labels / len(ref),
        "choice_mean_abs_logprob_diff": math.fsum(diffs) / max(len(diffs), 1),
    })  # fmt: skip


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,:;!?\"'") if words else ""
