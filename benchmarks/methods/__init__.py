"""Method benchmarks on PACS: every model script per domain pair, CLIP + ArcFace."""
