"""Measuring the sparse model: perplexity (here), downstream tasks and latency."""
