"""The job layer: reading input into records, prompts and templates, output writing and
scanning, fingerprints, resume, interrupts, run settings and the job plan.

Imports the shared types, `pagedbatch.models` and `pagedbatch.engine` (its config)."""
