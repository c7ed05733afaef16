"""Deterministic local data: a synthetic skills suite and Python standard-library code and prose."""
