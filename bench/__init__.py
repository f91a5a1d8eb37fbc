"""Benchmarks (`python -m bench`): ratios measured within one run on this machine, written to RESULTS.md.
Uses engine's public functions; engine never imports bench (import-linter contract)."""
