"""Faithfulness curves of a benchmark report in one figure: SVG written directly (no plotting
library needed), PNG through matplotlib when it is installed.

Two panels share the x axis (percent of edges, log scale, MIB's sizes): circuits chosen by signed
score (whose area is CPR) and by |score| (whose distance from f = 1 is CMD).
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]
PANELS = (("by_signed_score", "circuits by signed score (CPR)"), ("by_abs_score", "circuits by |score| (CMD)"))


def _y_range(rep: dict) -> tuple[float, float]:
    ys = [p["faithfulness"] for m in rep["methods"] for key, _ in PANELS for p in m[key]["points"]
          if p["faithfulness"] == p["faithfulness"]]
    lo, hi = min(ys + [0.0]), max(ys + [1.0])
    pad = 0.05 * (hi - lo or 1)
    return lo - pad, hi + pad


def curves_svg(rep: dict, width: int = 980, height: int = 420) -> str:
    lo, hi = _y_range(rep)
    margin_l, margin_r, margin_t, margin_b, gap = 55, 10, 40, 45, 40
    legend_w = 230
    panel_w = (width - margin_l - margin_r - legend_w - gap) / 2
    panel_h = height - margin_t - margin_b
    x_lo, x_hi = math.log10(0.1), math.log10(100)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">'),
           f'<rect width="{width}" height="{height}" fill="white"/>',
           (f'<text x="{margin_l}" y="18" font-size="13">{escape(rep["model"])} / {escape(rep["task"])}: '
            f'faithfulness on {rep["split"]["test"]} held-out examples ({escape(rep["ablation"])} ablation)</text>')]
    for k, (key, title) in enumerate(PANELS):
        x0 = margin_l + k * (panel_w + gap)

        def px(pct, x0=x0):
            return x0 + (math.log10(pct) - x_lo) / (x_hi - x_lo) * panel_w

        def py(f):
            return margin_t + (hi - f) / (hi - lo) * panel_h
        out.append(f'<text x="{x0}" y="{margin_t - 8}">{escape(title)}</text>')
        out.append(f'<rect x="{x0}" y="{margin_t}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#444"/>')
        for f in (0.0, 1.0):
            if lo <= f <= hi:
                out.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{py(f):.1f}" y2="{py(f):.1f}" '
                           f'stroke="#999" stroke-dasharray="4 3"/>')
                out.append(f'<text x="{x0 - 6}" y="{py(f) + 4:.1f}" text-anchor="end">{f:g}</text>')
        for pct in (0.1, 1, 10, 100):
            out.append(f'<text x="{px(pct):.1f}" y="{margin_t + panel_h + 15}" text-anchor="middle">{pct:g}%</text>')
        out.append(f'<text x="{x0 + panel_w / 2}" y="{height - 8}" text-anchor="middle">edges in the circuit</text>')
        for i, m in enumerate(rep["methods"]):
            pts = [(px(p["percent"]), py(p["faithfulness"])) for p in m[key]["points"]
                   if p["faithfulness"] == p["faithfulness"]]
            colour = COLOURS[i % len(COLOURS)]
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
    lx = width - legend_w + 5
    for i, m in enumerate(rep["methods"]):
        y = margin_t + 10 + 16 * i
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 24}" y="{y + 4}">{escape(m["label"])} '
                   f'(CPR {m["CPR"]:.2f}, CMD {m["CMD"]:.2f})</text>')
    out.append("</svg>")
    return "\n".join(out)


def save_curves(rep: dict, path: str | Path) -> Path:
    """Write the figure: .svg always works; .png needs matplotlib."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        path.write_text(curves_svg(rep))
        return path
    if suffix != ".png":
        raise ValueError(f"{path}: the plot is written as .svg or .png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"{path}: PNG plots need matplotlib (pip install matplotlib); .svg needs nothing") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (key, title) in zip(axes, PANELS):
        for m in rep["methods"]:
            pts = m[key]["points"]
            ax.plot([p["percent"] for p in pts], [p["faithfulness"] for p in pts], marker="o", ms=3,
                    label=f'{m["label"]} (CPR {m["CPR"]:.2f}, CMD {m["CMD"]:.2f})')
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("% of edges")
    axes[0].set_ylabel("faithfulness")
    axes[1].legend(fontsize=7)
    fig.suptitle(f'{rep["model"]} / {rep["task"]} ({rep["split"]["test"]} held-out examples)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
