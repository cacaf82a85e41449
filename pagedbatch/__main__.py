"""`python -m pagedbatch` is the `pagedbatch` command."""

from pagedbatch.cli.app import app

app(prog_name="pagedbatch")
