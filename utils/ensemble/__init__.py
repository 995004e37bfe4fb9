"""Ensembling: fusions, re-ranking, the validation weight search, the chosen plan and its report."""
