"""When a sequence is done: EOS, a stop string, or its length limit."""

from __future__ import annotations

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
        """'stop' on EOS or a stop string (recording where the text ends), 'length' at the limit."""
        if not seq.params.ignore_eos and seq.token_ids[-1] in self.eos_token_ids:
            return "stop"
        if seq.params.stop:
            text = self.decode(seq.output_ids)
            hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
            if hits:
                seq.stop_text_end = min(hits)
                return "stop"
        if seq.num_tokens >= seq.max_len:
            return "length"
        return None

    def text(self, seq: Sequence) -> str:
        """The sequence's output text, cut before the stop string that ended it."""
        text = self.decode(seq.output_ids)
        return text if seq.stop_text_end is None else text[: seq.stop_text_end]
