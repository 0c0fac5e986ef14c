"""Datasets: readers for the real precomputed-feature layouts, the synthetic dataset, vocabulary, tokenizer."""
