"""When a sequence is done: EOS, a stop string, or its length limit."""

from __future__ import annotations

from pagedbatch.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from pagedbatch.engine.sequence import Sequence
from pagedbatch.outputs import FinishReason


class StopChecker:
    """Decides after each sampled token whether a sequence has finished."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check(self, seq: Sequence) -> FinishReason | None:
        """'stop' on EOS, a stop string (recording where the text ends) or the end of the
        output's grammar (even with ignore_eos), 'length' at the limit."""
        if seq.matcher is not None and seq.matcher.ended:
            return "stop"
        if not seq.params.ignore_eos and seq.token_ids[-1] in self.eos_token_ids:
            return "stop"
        if seq.params.stop and self._stop_string_end(seq) is not None:
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
        stops = seq.params.stop
        if seq.detokenizer is None:
            keep = max(len(s) for s in stops) - 1
            seq.detokenizer = IncrementalDetokenizer(self.decode, seq.num_prompt_tokens, keep)
        window = seq.detokenizer.update(seq.token_ids)
        if window is not None and not any(s in window for s in stops):
            return None
        text = self.decode(seq.output_ids)
        if window is None:
            seq.detokenizer.resync(seq.token_ids, text)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if not hits:
            return None
        seq.stop_text_end = min(hits)
        return seq.stop_text_end

    def text(self, seq: Sequence) -> str:
        """The sequence's output text, cut before the stop string that ended it.

        Output cut by the length limit may end inside a character (a byte-level token
        holding only its first bytes): the decode shows U+FFFD for those bytes, and they
        are left out of the text (the token ids keep them).
        """
        text = self.decode(seq.output_ids)
        if seq.stop_text_end is not None:
            return text[: seq.stop_text_end]
        if seq.finish_reason == "length":
            return text.rstrip(REPLACEMENT)
        return text
