"""`python -m itmatch ...` (and `torchrun -m itmatch train ...`) runs the CLI."""

from itmatch.cli import entry

entry()
