"""Embedding benchmarks: throughput of the kit's embedding path against a plain loop and the FLOP bound."""
