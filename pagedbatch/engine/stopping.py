"""When a sequence is done: EOS, a stop string, or its length limit; and its texts."""

from __future__ import annotations

import numpy as np

from pagedbatch.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from pagedbatch.engine.reasoning import ThinkTokens, advance, answer_start
from pagedbatch.engine.sequence import Sequence
from pagedbatch.outputs import FinishReason


class StopChecker:
    """Decides after each sampled token whether a sequence has finished.

    With `think` (a thinking model's think tokens), it follows each sequence's thinking
    (engine/reasoning.py): stop strings are searched in the answer only, and `text` is the
    answer, `reasoning` the thinking.
    """

    def __init__(
        self, tokenizer, eos_token_ids: frozenset[int], think: ThinkTokens | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.think = think

    def may_stop(
        self, tokens: list[int], num_tokens: np.ndarray, max_len: np.ndarray,
        ignore_eos: np.ndarray | None, has_stop: np.ndarray | None,
    ) -> list[int] | None:  # fmt: skip
        """The indices of the sequences that `check` could stop once `tokens` are appended
        (one entry per sequence: the token, its length with it, its params; `ignore_eos`
        None: every one ignores EOS; `has_stop` None: none has stop strings, stop token ids
        or a constraint): the length limit, an EOS it heeds, stop strings to search. The
        others cannot stop this step, so only these need `check`. A thinking model's
        sequences are all checked (`check` follows their thinking): None."""
        if self.think is not None:
            return None
        maybe = np.flatnonzero(num_tokens >= max_len).tolist()
        if has_stop is not None:
            maybe += np.flatnonzero(has_stop).tolist()
        if ignore_eos is not None:
            eos = self.eos_token_ids
            maybe += [i for i, t in enumerate(tokens) if t in eos and not ignore_eos[i]]
        return sorted(set(maybe))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check(self, seq: Sequence) -> FinishReason | None:
        """'stop' on EOS, a stop token id, a stop string (recording where the text ends; not
        before min_tokens) or the end of the output's grammar (even with ignore_eos),
        'length' at the limit."""
        if self.think is not None and seq.matcher is None:  # a constrained output: not split
            advance(seq, self.think)
        if seq.matcher is not None and seq.matcher.ended:
            return "stop"
        params, token = seq.params, seq.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        early = seq.num_output_tokens < params.min_tokens  # stop strings wait for min_tokens
        if params.stop and not early and self._stop_string_end(seq) is not None:
            return "stop"
        if seq.num_tokens >= seq.max_len:
            return "length"
        return None

    def _stop_string_end(self, seq: Sequence) -> int | None:
        """Where the output text ends if it now holds a stop string (kept in the sequence).

        Only the newly decoded text, after the last (longest stop - 1) characters before
        it, is searched each step. On a hit, the whole output is decoded once to find the
        earliest stop string in it, as the text that `text` cuts is that decode.
        """
        stops, start = seq.params.stop, answer_start(seq)
        if start is None:  # thinking: stop strings end the answer
            return None
        if seq.detokenizer is None:
            keep = max(len(s) for s in stops) - 1
            seq.detokenizer = IncrementalDetokenizer(self.decode, start, keep)
        window = seq.detokenizer.update(seq.token_ids)
        if window is not None and not any(s in window for s in stops):
            return None
        text = self.decode(seq.token_ids[start:])
        if window is None:
            seq.detokenizer.resync(seq.token_ids, text)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if not hits:
            return None
        seq.stop_text_end = min(hits)
        return seq.stop_text_end

    def text(self, seq: Sequence) -> str:
        """The sequence's output text (after a thinking, the answer's, without its leading
        whitespace), cut before the stop string that ended it.

        Output cut by the length limit may end inside a character (a byte-level token
        holding only its first bytes): the decode shows U+FFFD for those bytes, and they
        are left out of the text (the token ids keep them).
        """
        start = answer_start(seq)
        if start is None:  # it never ended its thinking
            return ""
        text = self.decode(seq.token_ids[start:])
        if seq.stop_text_end is not None:
            text = text[: seq.stop_text_end]
        elif seq.finish_reason == "length":
            text = text.rstrip(REPLACEMENT)
        return text if seq.think_start is None else text.lstrip()

    def reasoning(self, seq: Sequence) -> str | None:
        """The text of the sequence's thinking, stripped (None when it did not think)."""
        if seq.think_start is None:
            return None
        end = seq.num_tokens if seq.think_end is None else seq.think_end
        text = self.decode(seq.token_ids[seq.think_start : end])
        if seq.think_end is None and seq.finish_reason == "length":
            text = text.rstrip(REPLACEMENT)
        return text.strip()

    def reasoning_tokens(self, seq: Sequence) -> int:
        """The output tokens before the answer: the thinking with its marks."""
        start = answer_start(seq)
        return seq.num_output_tokens if start is None else start - seq.num_prompt_tokens
