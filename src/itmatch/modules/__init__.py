"""Shared building blocks (encoders, normalisation); no method names inside."""
