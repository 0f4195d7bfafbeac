"""`python -m nmm` is the `nmm` command."""

from nmm.cli import app

app()
