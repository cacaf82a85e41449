"""The file job: one input file to one output file, exactly once per record: output
writing and scanning, the fingerprint, resume, the file guard, interrupts and the run
settings.

Imports `pagedbatch.plan` (to store run rates), `pagedbatch.inputs`, `pagedbatch.llm`
(the `Generator` it drives) and below."""
