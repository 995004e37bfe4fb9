"""Face benchmarks: ORL cross-domain faces, the hard stylised set, its draws, rotations and views."""
