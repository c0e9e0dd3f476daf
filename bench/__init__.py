"""Benchmarks of vitparity: `python -m bench --help`. Figures are printed and written as JSON, never asserted."""
