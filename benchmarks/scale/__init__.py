"""Scale benchmarks: top-10 search, fusion over candidates and submit.py far past the competition's size."""
