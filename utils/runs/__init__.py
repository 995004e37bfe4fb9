"""The run contract between scripts: ``runs/<model>/`` matrices and meta.json (written and
checked), the competition metrics, and top-k search."""
