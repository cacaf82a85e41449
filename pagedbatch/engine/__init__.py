"""The engine: paged KV cache, radix prefix cache, scheduler, model execution, sampling.

Imports the shared types (`pagedbatch.outputs`, `pagedbatch.sampling_params`),
`pagedbatch.kernels` and `pagedbatch.models`; nothing of the job layer, benchmarks or CLI."""
