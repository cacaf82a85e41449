"""The text of a sequence's output, decoded a few tokens at a time as it grows."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decode shows for the bytes of an unfinished character


class IncrementalDetokenizer:
    """Decodes only the newest tokens of a growing list each step (like vLLM's and TGI's).

    `token_ids[prefix_offset:read_offset]` are the tokens whose text was read last; they
    are decoded again with the new tokens as context, so that a decoder that joins bytes
    across tokens or drops a leading space gives the same characters as a whole decode.
    The new tokens' text is read (and the offsets move on) once it is complete: it does
    not end in U+FFFD. Only the last `keep` characters of the text read are kept.

    The text read plus the text added equals the whole decode for a decoder whose text
    only grows as tokens are appended (byte-level BPE; SentencePiece, which drops the
    leading space of the text). Text that a later token changes (spaces cleaned up
    before punctuation) is seen only when it lies in the window.
    """

    def __init__(self, decode: Callable[[list[int]], str], start: int, keep: int) -> None:
        self.decode = decode
        self.keep = keep
        self.prefix_offset = start
        self.read_offset = start
        self.read_tail = ""  # the last `keep` characters of the text read so far

    def update(self, token_ids: list[int]) -> str | None:
        """The text added since the last read, after up to `keep` characters of read text.

        The text added may end in an unfinished character (U+FFFD); it is returned again,
        completed, by the next call. None when the decode of the window does not extend
        the text read (a decoder that cleans up spaces across tokens): `resync` after a
        whole decode then.
        """
        read_text = self.decode(token_ids[self.prefix_offset : self.read_offset])
        text = self.decode(token_ids[self.prefix_offset :])
        if not text.startswith(read_text):
            return None
        new = text[len(read_text) :]
        window = self.read_tail + new
        if new and not new.endswith(REPLACEMENT):
            self.read_tail = window[max(0, len(window) - self.keep) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return window

    def resync(self, token_ids: list[int], text: str) -> None:
        """Read all of `token_ids`, whose output decodes whole to `text` (after `update`
        returned None); the last token is the context of the next window."""
        if text.endswith(REPLACEMENT):
            return  # read it later, once complete
        self.read_tail = text[max(0, len(text) - self.keep) :]
        self.prefix_offset, self.read_offset = len(token_ids) - 1, len(token_ids)
