"""Counting (params, MACs), the memory guard, and per-stage rows."""
