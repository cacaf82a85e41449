"""Requests as the library takes them: the public `Record`, prompts and templates, the
preparer that turns records into engine sequences, the prompt store and the read-ahead.

Imports the shared types, `pagedbatch.models` and `pagedbatch.engine`; `pagedbatch.llm`
sits on top of it."""
