"""Records to prompt token ids: raw prompts, or chat messages through the chat template."""

from __future__ import annotations

from pagedbatch.job.records import Record


class PromptError(ValueError):
    """A record whose prompt cannot be rendered or tokenized (an invalid_record error)."""


class PromptBuilder:
    """Tokenizes records the way the model expects them.

    A `prompt` is tokenized as given (with the tokenizer's own special tokens, e.g. a
    BOS); `messages`, and plain prompts when `chat` is set, go through the model's chat
    template with the assistant turn opened.
    """

    def __init__(self, tokenizer, chat: bool = False) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a model whose tokenizer has a chat template")

    def token_ids(self, record: Record) -> list[int]:
        if record.prompt_token_ids is not None:
            return list(record.prompt_token_ids)
        if record.messages is not None:
            return self._chat(list(record.messages))
        if self.chat:
            return self._chat([{"role": "user", "content": record.prompt}])
        return list(self.tokenizer(record.prompt)["input_ids"])

    def _chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError("has 'messages' but the model has no chat template")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raises for roles a template refuses
            raise PromptError(f"chat template failed: {e}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
