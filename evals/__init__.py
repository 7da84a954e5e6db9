"""Evaluation: perplexity, KL divergence and reports. Knows models and token streams, not methods."""
