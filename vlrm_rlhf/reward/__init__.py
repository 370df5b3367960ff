"""Rewards: scoring samples with a VLRM (scorer, prefix caching, TRL reward functions)."""
