"""Records to prompt token ids: raw prompts, or chat messages through the chat template."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from pagedbatch.requests.records import Record


class PromptError(ValueError):
    """A record whose prompt cannot be rendered or tokenized (an invalid_record error)."""


class PromptBuilder:
    """Tokenizes records the way the model expects them.

    A `prompt` is tokenized as given (with the tokenizer's own special tokens, e.g. a
    BOS); `messages`, and plain prompts when `chat` is set, go through the model's chat
    template with the assistant turn opened, given `chat_template_kwargs` as template
    variables (a record's own `chat_template_kwargs` over them).
    """

    def __init__(
        self, tokenizer, chat: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a model whose tokenizer has a chat template")
        self.template_kwargs = dict(chat_template_kwargs or {})
        self._arguments = _own_arguments(tokenizer)
        problem = self._kwargs_problem(self.template_kwargs)
        if problem is not None:
            raise ValueError(problem)

    def token_ids(self, record: Record) -> list[int]:
        """One record's prompt token ids; raises PromptError (or the tokenizer's error)."""
        result = self.token_ids_batch([record])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def token_ids_batch(self, records: Sequence[Record]) -> list[list[int] | Exception]:
        """Each record's prompt token ids, or the error it raised (a PromptError for a
        record the chat template refuses); the texts are encoded in one batch."""
        out: list[list[int] | Exception] = [[] for _ in records]
        texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # by special tokens
        for i, record in enumerate(records):
            if record.prompt_token_ids is not None:
                out[i] = list(record.prompt_token_ids)
            elif record.messages is not None or self.chat:
                messages = record.messages or [{"role": "user", "content": record.prompt}]
                try:
                    kwargs = self._record_kwargs(record)
                    texts[False].append((i, self._chat_text(list(messages), kwargs)))
                except PromptError as e:
                    out[i] = e
            else:
                texts[True].append((i, record.prompt or ""))
        for special, items in texts.items():
            for (i, _), ids in zip(items, self._encode([t for _, t in items], special)):
                out[i] = ids
        return out

    def choice_ids(self, text: str) -> list[int]:
        """A choice's token ids: the text alone, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, texts: list[str], special: bool) -> list[list[int] | Exception]:
        """Token ids of `texts`, in one batch; when the batch fails, text by text, so that
        the error stays with the text that raised it."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        try:
            if backend is not None:
                encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
                return [e.ids for e in encode(texts, add_special_tokens=special)]
            return list(self.tokenizer(texts, add_special_tokens=special)["input_ids"])
        except Exception:
            if len(texts) == 1:
                return [_encode_one(self.tokenizer, texts[0], special)]
            return [_encode_one(self.tokenizer, t, special) for t in texts]

    def _record_kwargs(self, record: Record) -> dict[str, Any]:
        """The template variables of a record: the job's, its own over them."""
        if not record.chat_template_kwargs:
            return self.template_kwargs
        problem = self._kwargs_problem(record.chat_template_kwargs)
        if problem is not None:
            raise PromptError(problem)
        return {**self.template_kwargs, **record.chat_template_kwargs}

    def _kwargs_problem(self, kwargs: Mapping[str, Any]) -> str | None:
        """Why `kwargs` cannot be template variables: a name that is an argument of
        `apply_chat_template` itself (tokenize, add_generation_prompt, ...)."""
        taken = sorted(self._arguments.intersection(kwargs))
        if taken:
            return (
                f"chat_template_kwargs: {', '.join(map(repr, taken))} is an argument of "
                "apply_chat_template, not a template variable"
            )
        return None

    def _chat_text(self, messages: list[dict], kwargs: Mapping[str, Any]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError("has 'messages' but the model has no chat template")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as e:  # jinja raises for roles a template refuses
            raise PromptError(f"chat template failed: {e}") from None


def _own_arguments(tokenizer) -> frozenset[str]:
    """The named arguments of the tokenizer's `apply_chat_template`."""
    method = getattr(tokenizer, "apply_chat_template", None)
    if method is None:
        return frozenset()
    parameters = inspect.signature(method).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)


def _encode_one(tokenizer, text: str, special: bool) -> list[int] | Exception:
    try:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    except Exception as e:
        return e
