"""Planning a job before it runs: the prompts' sharing, the KV it needs, the time it
will take (from stored rates of earlier runs or a probe).

Imports `pagedbatch.inputs`, `pagedbatch.requests` and below."""
