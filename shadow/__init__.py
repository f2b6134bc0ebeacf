"""shadow: predictor-based contextual sparsity for OPT language models (ShadowLLM, arXiv 2406.16635)."""

__version__ = "0.1.0"
