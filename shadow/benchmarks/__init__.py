"""Side-by-side benchmarks that print tables of ratios: ``python -m shadow.benchmarks.<name>``."""
