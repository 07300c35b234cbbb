"""Benchmarks: what the gateway costs, beside a direct call, bare Flask and LiteLLM.

Not tests: ``make bench`` (full) or ``make bench-smoke`` (about a minute, CI);
see bench/README.md.
"""
