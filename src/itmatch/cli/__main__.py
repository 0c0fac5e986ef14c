"""`python -m itmatch.cli ...` runs the CLI, as `python -m itmatch ...` does."""

from itmatch.cli import entry

entry()
