"""The ensemble's report: a rich table of every scored option, its markdown twin, and a PNG of
the validation score over the weight simplex (two or three models)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from rich.table import Table

from utils.atomic import atomic_write_bytes
from utils.ensemble.plan import Option
from utils.ensemble.weight_search import SearchResult

log = logging.getLogger(__name__)

COLUMNS = ("option", "weights", "val mean", "val spread", "val", "test", "chosen")


def _cells(o: Option) -> list[str]:
    test = "-" if o.test_score is None else f"{o.test_score:.2f}"
    return [o.label, o.weights, f"{o.val_mean:.2f}", f"±{o.val_std:.2f}", f"{o.val_score:.2f}", test, "*" if o.chosen else ""]


def options_table(title: str, rows: list[Option], names: list[str] | None = None) -> Table:
    """Validation bootstrap mean and spread (std), plain validation and test score of each option."""
    caption = "weights in the order " + " / ".join(names) if names else None
    table = Table(title=title, caption=caption)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("option", "weights") else "right", no_wrap=col != "option")
    for o in rows:
        table.add_row(*_cells(o), style="bold green" if o.chosen else None)
    return table


def options_markdown(rows: list[Option], names: list[str] | None = None) -> str:
    """The same table as GitHub markdown."""
    lines = ([f"Weights in the order {' / '.join(names)}.", ""] if names else []) + ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(o)) + " |" for o in rows]
    return "\n".join(lines) + "\n"


def plot_simplex(result: SearchResult, names: list[str], path: str | Path, title: str) -> Path | None:
    """Validation score (bootstrap mean) over the weight simplex: a curve for 2 models, a triangle for 3.

    Returns:
        the written path, or None for other model counts.
    """
    n = len(names)
    if n not in (2, 3):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5) if n == 3 else (6, 4))
    w, mean, std = result.candidates, result.cand_mean, result.cand_std
    if n == 2:
        order = np.argsort(w[:, 0])
        x = w[order, 0]
        ax.plot(x, mean[order], marker="o", ms=3)
        ax.fill_between(x, mean[order] - std[order], mean[order] + std[order], alpha=0.25, label="bootstrap ±1 std")
        ax.axvline(result.weights[0], color="k", ls="--", lw=1, label=f"chosen {result.weights[0]:.2f}")
        ax.set_xlabel(f"weight of {names[0]} (rest: {names[1]})")
        ax.set_ylabel("validation score (bootstrap mean)")
        ax.legend()
    else:
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
        xy = w.astype(np.float64) @ corners
        sc = ax.tricontourf(xy[:, 0], xy[:, 1], mean, levels=20, cmap="viridis") if len(w) >= 6 else ax.scatter(xy[:, 0], xy[:, 1], c=mean)
        fig.colorbar(sc, ax=ax, label="validation score (bootstrap mean)")
        chosen = np.asarray(result.weights) @ corners
        ax.plot(*chosen, marker="*", color="red", ms=14, label="chosen")
        for (cx, cy), name in zip(corners, names):
            ax.annotate(name, (cx, cy), ha="center", va="bottom" if cy > 0 else "top", fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.legend(loc="upper right")
    ax.set_title(title, fontsize=10, pad=16 if n == 3 else 6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
