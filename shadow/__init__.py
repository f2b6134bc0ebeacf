"""shadow: contextual sparsity for OPT and Llama-family language models: ShadowLLM (arXiv 2406.16635), its
DejaVu-style, static and oracle placements, and the training-free TEAL and CATS, measured on one scale."""

__version__ = "0.1.0"
