"""`python -m pagedbatch` is the `pagedbatch` command."""

from pagedbatch.cli import app

app(prog_name="pagedbatch")
