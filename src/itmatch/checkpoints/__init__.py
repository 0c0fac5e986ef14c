"""Checkpoint formats: itmatch's own (native) and the originals' released files."""
