"""The `pagedbatch` command: run, plan, bench, the progress display and the memory report.
The only package that prints; heavy imports happen inside the commands."""
