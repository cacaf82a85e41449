"""Structured output in the engine: each constraint compiled once, a matcher per sequence.

`Grammars` compiles each distinct constraint once (keyed by its canonical text:
constraint.py) for one model's tokenizer; a constrained sequence gets its own
`ConstraintMatcher` when it is built (each sample of a record its own, all at the start
state its parent's is in: nothing is accepted before the prompt is done). A preempted
sequence keeps its matcher as it keeps its tokens: recomputing them samples nothing, so
the matcher is never advanced twice. The step's mask is token_masks.py's.

A matcher has `ended` when its grammar allows nothing more: it accepted a stop (EOS)
token, or its text is complete and only a stop token could follow (the sequence ends
there, without spending a step on that token).
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from pagedbatch.constraint import Constraint, build_grammar, library_message


class Grammars:
    """The compiled grammars of one model's tokenizer, each constraint compiled once.

    `vocab_size` is the model's (the logits' width), which may differ from the
    tokenizer's; `stop_token_ids` are the tokens that end a sequence (its EOS tokens).
    The tokenizer's xgrammar description is built at the first compile. Thread-safe:
    records are checked (compiled) in a worker thread while the engine steps.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(t for t in stop_token_ids if 0 <= t < vocab_size)
        self.words = -(-vocab_size // 32)  # int32 words of a bitmask row
        self._compiler: Any = None
        self._compiled: dict[Constraint, Any] = {}
        self._lock = threading.Lock()
        self._ends: _EndCheck | None = None

    def compile(self, constraint: Constraint) -> Any:
        """The xgrammar CompiledGrammar of `constraint` (compiled on first use); raises
        ValueError naming the problem when it cannot be compiled."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is None:
                try:
                    grammar = build_grammar(constraint.kind, constraint.text)
                    compiled = self._compiler_for_tokenizer().compile_grammar(grammar)
                except (RuntimeError, ValueError) as e:
                    raise ValueError(
                        f"the {constraint.kind} constraint cannot be compiled: {library_message(e)}"
                    ) from None
                self._compiled[constraint] = compiled
            return compiled

    def matcher(self, constraint: Constraint) -> ConstraintMatcher:
        """A matcher at the start of `constraint`'s grammar, for one sequence."""
        import xgrammar

        compiled = self.compile(constraint)
        if self._ends is None:
            self._ends = _EndCheck(self.words, self.stop_token_ids)
        return ConstraintMatcher(xgrammar.GrammarMatcher(compiled), self._ends)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    @property
    def memory_bytes(self) -> int:
        """Host memory of the compiled grammars (their token mask caches mostly)."""
        with self._lock:
            return sum(c.memory_size_bytes for c in self._compiled.values())

    def _compiler_for_tokenizer(self) -> Any:
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer,
                vocab_size=self.vocab_size,
                stop_token_ids=self.stop_token_ids or None,
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


class _EndCheck:
    """Tells whether a bitmask row allows stop tokens only (a grammar's end)."""

    def __init__(self, words: int, stop_token_ids: list[int]) -> None:
        self.scratch = torch.zeros((1, words), dtype=torch.int32)  # xgrammar fills it
        others = np.full(words, 0xFFFFFFFF, dtype=np.uint32)
        for t in stop_token_ids:
            others[t >> 5] &= ~np.uint32(1 << (t & 31))
        self.others = torch.from_numpy(others.view(np.int32))  # [words] every bit but stops

    def only_stops(self, matcher: Any) -> bool:
        matcher.fill_next_token_bitmask(self.scratch, 0)
        return not bool((self.scratch[0] & self.others).any())


class ConstraintMatcher:
    """Where one sequence's output stands in its constraint's grammar."""

    __slots__ = ("_matcher", "_ends", "ended")

    def __init__(self, matcher: Any, ends: _EndCheck) -> None:
        self._matcher = matcher
        self._ends = ends
        self.ended = False  # the grammar allows nothing more: the sequence stops

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (host, int32)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance over the token sampled (which the mask allowed)."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the constraint's grammar refused token {token} it allowed")
        m = self._matcher
        self.ended = m.is_terminated() or (m.is_completed() and self._ends.only_stops(m))

    @property
    def words(self) -> int:
        """int32 words of its bitmask row."""
        return self._ends.scratch.shape[1]

    @property
    def complete(self) -> bool:
        """The output so far is a whole match of the grammar."""
        return self._matcher.is_terminated() or self._matcher.is_completed()
