"""Benchmark tooling: the contenders, transformers baselines, synthetic workloads and the
decode probe. Imports anything below the CLI."""
