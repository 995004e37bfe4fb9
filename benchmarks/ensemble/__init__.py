"""Ensemble benchmarks: fusion and re-ranking on real runs, the weight search's memory."""
