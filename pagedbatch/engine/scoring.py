"""Choice scoring: a request's candidate labels are scored after its prompt, not generated.

A request with choices becomes a family of sequences (`choice_family`): one per choice,
holding the prompt and the choice's tokens but the last, so that position
`first_scored_position + k` predicts choice token k. With prefix sharing a parent holding
the prompt comes first: it computes the prompt once, its last logits score every choice's
first token, and the choices fork from it (a one-token choice is then done).

These sequences never sample (`scheduler.samples`). Each step the model runner puts the
positions they score after the sampling rows of the LM head (`plan_scoring`, carried by
`Batch.scores`); the engine puts their log-probabilities in the sequences
(`score_values`, read back with the sampled tokens, then `record_scores`), forks the
parents' choices and ends the sequences `Scoring.ended` names.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.staging import Uploads
from pagedbatch.sampling_params import SamplingParams


def choice_family(
    seq_ids: Iterator[int], prompt: array[int], choices: list[list[int]],
    params: SamplingParams, request_id: str | int | None, share_prompt: bool,
) -> list[Sequence]:  # fmt: skip
    """The sequences that score each of `choices` (token ids, none empty) after `prompt`:
    the prompt's parent first when `share_prompt` (prefix sharing), the choices its forks;
    else one sequence per choice, each computing the prompt."""
    seqs = [
        _sequence(next(seq_ids), prompt + array("i", tokens[:-1]), params, request_id, tokens)
        for tokens in choices
    ]
    if not share_prompt:
        return seqs
    parent = _sequence(next(seq_ids), array("i", prompt), params, request_id)
    parent.scores_only, parent.forks = True, seqs
    return [parent, *seqs]


def _sequence(
    seq_id: int, tokens: array[int], params: SamplingParams, request_id: str | int | None,
    choice: list[int] | None = None,
) -> Sequence:  # fmt: skip
    """A sequence of `tokens` (taken, not copied) that never outgrows them: it scores
    `choice`, or its forks' first tokens, and never samples."""
    return Sequence(
        seq_id, tokens, len(tokens), params, len(tokens), seed=0, request_id=request_id,
        choice_ids=None if choice is None else tuple(choice),
        choice_logprobs=[None] * len(choice or ()),
    )  # fmt: skip


def choice_logprobs(family: list[Sequence]) -> list[tuple[float, int]]:
    """Each choice's summed log-probability and its number of tokens, in the order of the
    choices, once the family is done."""
    return [
        (math.fsum(seq.choice_logprobs), len(seq.choice_ids))
        for seq in family
        if seq.choice_ids is not None
    ]


@dataclass(frozen=True)
class Scoring:
    """The choice tokens one step scores, and the scoring sequences it ends.

    Logits row `first_row + target_rows[j]` gives the log-probability of token
    `targets[j]`, which belongs in `owners[j]` = (sequence, index into its
    choice_logprobs). `parents` compute the last token of their prompt in this step (their
    choices fork from them then); `ended` are done once the step is committed: the choices
    computed to their end, the parents, and their one-token choices.
    """

    first_row: int  # the logits rows before are the sampling rows, one per sampling sequence
    target_rows: torch.Tensor  # [num_targets] int64, on the device
    targets: torch.Tensor  # [num_targets] int64 token ids, on the device
    owners: list[tuple[Sequence, int]]
    parents: list[Sequence]
    ended: list[Sequence]


def plan_scoring(
    seqs: list[Sequence], counts: list[int], candidates: list[int], starts: np.ndarray,
    first_row: int, uploads: Uploads,
) -> tuple[list[int], Scoring] | None:  # fmt: skip
    """The flat token index of each position this step computes that scores a choice token
    (in order: the LM head's rows after the `first_row` sampling rows), and the step's
    Scoring; None when none does. `seqs` are the scheduled sequences and `counts` their new
    tokens; `candidates` index those that do not sample (scoring sequences among them);
    `starts[i]` is sequence i's first token index."""
    rows: list[int] = []
    target_rows: list[int] = []
    targets: list[int] = []
    owners: list[tuple[Sequence, int]] = []
    parents: list[Sequence] = []
    done: list[Sequence] = []
    for i in candidates:
        seq, n = seqs[i], counts[i]
        begin = seq.num_computed_tokens
        completes = begin + n == seq.num_tokens
        if seq.choice_ids is not None:
            first = seq.first_scored_position
            for position in range(max(begin, first), begin + n):
                target_rows.append(len(rows))
                rows.append(int(starts[i]) + position - begin)
                targets.append(seq.choice_ids[position - first])
                owners.append((seq, position - first))
            if completes:
                done.append(seq)
        elif seq.scores_only and completes:  # its last row: each first token
            target_rows += [len(rows)] * len(seq.forks)
            targets += [child.choice_ids[0] for child in seq.forks]
            owners += [(child, 0) for child in seq.forks]
            rows.append(int(starts[i + 1]) - 1)
            parents.append(seq)
    if not rows:
        return None
    pairs = uploads.put(np.array([target_rows, targets], dtype=np.int64))
    one_token = [c for parent in parents for c in parent.forks if len(c.choice_ids) == 1]
    ended = [*done, *parents, *one_token]
    return rows, Scoring(first_row, pairs[0], pairs[1], owners, parents, ended)


def score_values(scoring: Scoring, logits: torch.Tensor) -> torch.Tensor:
    """The log-probabilities of the step's scored tokens [num_targets] float32, on the
    device (read back with the sampled tokens). `logits`: [num_logits_rows, vocab], the
    step's LM head output."""
    logprobs = torch.log_softmax(logits[scoring.first_row :].float(), dim=-1)
    return logprobs[scoring.target_rows, scoring.targets]


def record_scores(scoring: Scoring, values: list[float]) -> None:
    """Put `score_values`, on the host, in their sequences."""
    for (seq, k), value in zip(scoring.owners, values, strict=True):
        seq.choice_logprobs[k] = value
