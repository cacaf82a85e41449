"""`python -m pagedbatch` is the `pagedbatch` command."""

from pagedbatch.cli.main import main

main()
