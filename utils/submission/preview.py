"""An HTML page of the top-10 lists: each query photo followed by its gallery images."""

from __future__ import annotations

import html
from pathlib import Path

from utils.atomic import atomic_write_bytes
from utils.data.layout import load_layout


def write_preview(path: Path, lists: dict[str, list[str]], data: Path, n: int) -> Path:
    """Write the first ``n`` queries' lists to ``path``; correct answers in green (with a ground truth)."""
    q_dir, g_dir = (data / "test" / "query").resolve(), (data / "test" / "gallery").resolve()
    truth = load_layout(data).ground_truth or {}
    rows = []
    for q, names in list(lists.items())[:n]:
        right = set(truth.get(q, []))
        cells = "".join(
            f'<td class="{"hit" if g in right else ""}"><img src="{html.escape((g_dir / g).as_uri())}"><br>{i + 1}. {html.escape(g)}</td>'
            for i, g in enumerate(names)
        )
        rows.append(f'<tr><th><img src="{html.escape((q_dir / q).as_uri())}"><br>{html.escape(q)}</th>{cells}</tr>')
    page = (
        "<!doctype html><meta charset=utf-8><title>top-10 preview</title><style>"
        "img{height:96px}td,th{font:11px sans-serif;padding:3px;text-align:center}"
        "th{background:#eef}.hit{background:#9e9}</style>"
        f"<p>First {len(rows)} queries; green = correct (when the data has a ground truth).</p>"
        f"<table>{''.join(rows)}</table>"
    )
    return atomic_write_bytes(path, page.encode())
