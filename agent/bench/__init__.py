"""Benchmarks: ``reverie bench <name>``. Each prints a table, writes JSON, and measures its
baseline in the same run (docs/benchmarks.md lists every figure with its command)."""
