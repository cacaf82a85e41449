"""Reading input: JSONL, OpenAI batch files, tables and datasets into records, indexed
by id with a digest per record (so a record read again can be proven the same).

Imports `pagedbatch.requests` (the `Record`) and the shared types."""
