"""Quality against size: perplexity and KL divergence of each run against its bits per weight and
its file size, the Pareto front (no other run both smaller and better) marked; and a
self-contained HTML page with the report's table and the plot. matplotlib is an optional extra
(``pip install 'compress[plot]'``)."""
from __future__ import annotations

import base64
import html
from pathlib import Path


class PlotError(Exception):
    pass


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (x and y both no larger, one smaller), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot(rows: list[dict], out: Path, title: str = "") -> Path:
    """Draw ``rows`` (each with ``label`` and ``ppl``; ``kld``, ``bits_per_weight``, ``size_bytes``
    where known) to the PNG ``out``: one panel per (quality, size) pair that some row has, every run
    a point, the Pareto front's runs joined and named."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib (pip install 'compress[plot]')") from None
    xs = [(k, lab) for k, lab in (("bits_per_weight", "bits per weight"), ("size_bytes", "file size (MiB)"))
          if any(r.get(k) for r in rows)]
    ys = [(k, lab) for k, lab in (("ppl", "perplexity"), ("kld", "KL divergence to the base"))
          if any(r.get(k) is not None for r in rows)]
    if not xs or not ys:
        raise PlotError("nothing to plot: no run records its bits per weight or its file size")
    fig, axes = plt.subplots(len(ys), len(xs), figsize=(6.2 * len(xs), 4.2 * len(ys)), squeeze=False)
    for a, (yk, ylab) in enumerate(ys):
        for b, (xk, xlab) in enumerate(xs):
            ax = axes[a][b]
            pts = [r for r in rows if r.get(xk) and r.get(yk) is not None and r[yk] > 0]
            scale = (lambda v: v / 2 ** 20) if xk == "size_bytes" else (lambda v: v)
            xy = [(scale(r[xk]), r[yk]) for r in pts]
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=18, color="tab:blue", zorder=3)
            front = pareto(xy)
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red", lw=1.2, zorder=2,
                    label="Pareto front")
            for i in front:                 # only the front is named: the rest are what it beats
                ax.annotate(pts[i]["label"], xy[i], fontsize=6, xytext=(4, 2), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel(xlab)
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def html_page(markdown_table: str, png: Path | None, title: str) -> str:
    """One self-contained page: the table (from the report's Markdown rows) and the plot inline."""
    lines = [l for l in markdown_table.strip().splitlines() if l.startswith("|")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    head, body = (cells[0], cells[2:]) if len(cells) >= 2 else ([], [])
    t = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    t += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    t.append("</table>")
    img = ""
    if png is not None:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        img = f'<p><img alt="quality against size" src="data:image/png;base64,{data}"></p>'
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+3){text-align:left}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n{''.join(t)}\n{img}\n</body></html>\n")
