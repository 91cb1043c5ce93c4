"""A sweep's results: summary.csv and summary.md (one row per job), the edge-Jaccard matrix of
all its circuits (jaccard.csv, jaccard.svg) and faithfulness curves per task
(faithfulness-<task>.svg). Figures are SVG written here (no plotting dependency); with
matplotlib installed, PNG copies are drawn too."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path

from circuits import files as files_mod
from circuits.sweep.grid import SELECTION_KEYS, Job

COLUMNS = ("model", "task", "method", "seed", "ablation", "selection", "edges", "total_edges", "faithfulness",
           "CPR", "CMD", "seconds", "status", "error", "file")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22")


def task_label(settings: dict) -> str:
    return Path(settings["task"]).stem if settings.get("task_sha256") else settings["task"]


def selection_label(s: dict) -> str:
    for k in SELECTION_KEYS + ("tau",):
        if k in s:
            return f"{k}={s[k]:g}"
    return ""


def rows(out: Path, jobs: list[Job], failed: dict[str, str]) -> list[dict]:
    """One row per job of the grid: done (its file), failed (the error) or not run."""
    table = []
    for job in jobs:
        s = job.settings
        row = {"model": s["model"], "task": task_label(s), "method": s["method"], "seed": s["seed"],
               "ablation": s["ablation"], "selection": selection_label(s), "file": job.name}
        path = out / job.name
        data = _read(path)
        record = (data or {}).get("provenance", {}).get("sweep", {})
        if data is not None and record.get("key") == job.key:
            curve = record.get("curve") or {}
            row.update(edges=data.get("n_edges_in_graph"), total_edges=data.get("graph", {}).get("n_edges"),
                       faithfulness=data["provenance"].get("faithfulness"), CPR=curve.get("CPR"),
                       CMD=curve.get("CMD"), seconds=record.get("job_seconds"), status="done", error="")
            row["_curve"] = curve.get("points")
            row["_edges"] = frozenset(n for n, e in data.get("edges", {}).items()
                                      if isinstance(e, dict) and e.get("in_graph") is True)
            row["_shape"] = graph_shape(data.get("graph") or {})
        else:
            error = failed.get(job.key, "")
            row.update(status="failed" if error else "not run", error=error)
        table.append(row)
    return table


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write(out: Path, jobs: list[Job], failed: dict[str, str]) -> list[str]:
    """Write every summary file; returns their names."""
    table = rows(out, jobs, failed)
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for r in table:
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    files_mod.write_text(out / "summary.csv", f.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table:
        md.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in COLUMNS) + " |")
    done = sum(r["status"] == "done" for r in table)
    head = (f"# Sweep summary\n\n{len(table)} jobs: {done} done, "
            f"{sum(r['status'] == 'failed' for r in table)} failed, "
            f"{sum(r['status'] == 'not run' for r in table)} not run.\n\n")
    files_mod.write_text(out / "summary.md", head + "\n".join(md) + "\n")
    files = ["summary.csv", "summary.md"]
    finished = [(r, j) for r, j in zip(table, jobs) if r["status"] == "done"]
    if finished:
        files += jaccard_figure(out, finished)
        files += curve_figures(out, [r for r, _ in finished])
    return files


# ---- Jaccard matrix --------------------------------------------------------------------------

def short_label(r: dict) -> str:
    return f"{r['model']} {r['task']} {r['method']} s{r['seed']}" + (
        f" {r['ablation']}" if r["ablation"] != "resample" else "") + (f" {r['selection']}" if r["selection"] else "")


def graph_shape(summary: dict) -> tuple:
    """What makes two circuit files' graphs the same (as `circuits compare` decides it)."""
    return (summary.get("n_layers"), summary.get("n_heads"), summary.get("n_kv_heads", summary.get("n_heads")),
            summary.get("has_mlp", True), summary.get("parallel", False))


def jaccard_matrix(finished) -> tuple[list[str], list[list[float | None]]]:
    """Edge Jaccard of every pair of finished circuits (their edges in the graph, read from the
    files as `rows` parsed them); None across different graphs."""
    n = len(finished)
    m: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i, (a, _) in enumerate(finished):
        for k in range(i, n):
            b = finished[k][0]
            if i == k:
                m[i][k] = 1.0
            elif a["_shape"] == b["_shape"]:
                union = len(a["_edges"] | b["_edges"])
                m[i][k] = m[k][i] = len(a["_edges"] & b["_edges"]) / union if union else 1.0
    return [short_label(r) for r, _ in finished], m


def jaccard_figure(out: Path, finished) -> list[str]:
    labels, m = jaccard_matrix(finished)
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow([""] + [j.name for _, j in finished])
    for (_, j), row in zip(finished, m):
        w.writerow([j.name] + ["" if v is None else f"{v:.4f}" for v in row])
    files_mod.write_text(out / "jaccard.csv", f.getvalue())
    files_mod.write_text(out / "jaccard.svg", heatmap_svg(labels, m, "edge Jaccard of the sweep's circuits"))
    files = ["jaccard.csv", "jaccard.svg"]
    if _matplotlib():
        files.append(_png_heatmap(out / "jaccard.png", labels, m))
    return files


def _blue(v: float) -> str:
    t = max(0.0, min(1.0, v))
    r, g, b = (int(round(255 + (c - 255) * t)) for c in (8, 81, 156))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(labels: list[str], m, title: str) -> str:
    n, cell = len(labels), 22 if len(labels) <= 30 else 12
    pad = 8 + 6.2 * max(len(s) for s in labels)
    top = pad + 30
    w, h = pad + n * cell + 80, top + n * cell + 20
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" font-family="sans-serif" '
             f'font-size="10">', f'<text x="8" y="16" font-size="13">{e(title)}</text>']
    for i, label in enumerate(labels):
        y = top + i * cell + cell / 2 + 3
        parts.append(f'<text x="{pad - 4:.0f}" y="{y:.1f}" text-anchor="end">{e(label)}</text>')
        x = pad + i * cell + cell / 2 + 3
        parts.append(f'<text transform="translate({x:.1f},{top - 4:.0f}) rotate(-90)">{e(label)}</text>')
    for i in range(n):
        for k in range(n):
            v = m[i][k]
            x, y = pad + k * cell, top + i * cell
            fill = "#dddddd" if v is None else _blue(v)
            tip = "different graphs" if v is None else f"{v:.3f}"
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell}" height="{cell}" fill="{fill}" '
                         f'stroke="white"><title>{e(labels[i])} vs {e(labels[k])}: {tip}</title></rect>')
            if cell >= 20 and v is not None:
                colour = "white" if v > 0.6 else "black"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 3:.1f}" text-anchor="middle" '
                             f'font-size="8" fill="{colour}">{v:.2f}</text>')
    lx = pad + n * cell + 16
    for i in range(11):
        parts.append(f'<rect x="{lx}" y="{top + (10 - i) * 10:.0f}" width="12" height="10" fill="{_blue(i / 10)}"/>')
    parts += [f'<text x="{lx + 16}" y="{top + 8:.0f}">1</text>', f'<text x="{lx + 16}" y="{top + 108:.0f}">0</text>',
              f'<rect x="{lx}" y="{top + 120:.0f}" width="12" height="10" fill="#dddddd"/>',
              f'<text x="{lx + 16}" y="{top + 129:.0f}">n/a</text>', "</svg>"]
    return "\n".join(parts) + "\n"


# ---- faithfulness curves ---------------------------------------------------------------------

def curve_figures(out: Path, finished_rows: list[dict]) -> list[str]:
    """One figure per task: faithfulness against % of edges kept; a line per job with a curve
    (grid `curve = true`), a dot for each job's own circuit."""
    files = []
    for task in sorted({r["task"] for r in finished_rows}):
        rs = [r for r in finished_rows if r["task"] == task]
        name = f"faithfulness-{re.sub(r'[^A-Za-z0-9._-]+', '-', task)}.svg"
        files_mod.write_text(out / name, curve_svg(task, rs))
        files.append(name)
        if _matplotlib():
            files.append(_png_curves(out / name.replace(".svg", ".png"), task, rs))
    return files


def _series(rows_: list[dict]):
    """(legend label, colour, [(percent, f)] curve or None, (percent, f) of the circuit or None)."""
    groups = sorted({(r["model"], r["method"]) for r in rows_})
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    out = []
    for r in rows_:
        f = r.get("faithfulness")
        dot = (100 * r["edges"] / r["total_edges"], f) if r.get("total_edges") and _finite(f) else None
        curve = [(p["percent"], p["faithfulness"]) for p in r.get("_curve") or [] if _finite(p["faithfulness"])]
        out.append((f"{r['model']} {r['method']}", colour[(r["model"], r["method"])], curve or None, dot,
                    short_label(r)))
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def curve_svg(task: str, rows_: list[dict]) -> str:
    series = _series(rows_)
    xs = [p for s in series for p, _ in (s[2] or [])] + [s[3][0] for s in series if s[3]]
    ys = [f for s in series for _, f in (s[2] or [])] + [s[3][1] for s in series if s[3]]
    x_lo = min([x for x in xs if x > 0] + [0.1])
    lx_lo, lx_hi = math.log10(x_lo), 2.0
    y_lo, y_hi = min(ys + [0.0]), max(ys + [1.0])
    y_lo, y_hi = max(y_lo, -1.0), min(y_hi, 2.0)
    W, H, L, R, T, B = 720, 420, 60, 230, 30, 50
    pw, ph = W - L - R, H - T - B

    def px(p):
        return L + pw * (math.log10(max(p, x_lo)) - lx_lo) / max(lx_hi - lx_lo, 1e-9)

    def py(f):
        return T + ph * (1 - (min(max(f, y_lo), y_hi) - y_lo) / max(y_hi - y_lo, 1e-9))

    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
             f'<text x="{L}" y="18" font-size="13">faithfulness on {e(task)} (lines: top-k% of edges by score; '
             f'dots: each job\'s circuit)</text>',
             f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for f in (0.0, 0.5, 1.0):
        if y_lo <= f <= y_hi:
            parts.append(f'<line x1="{L}" x2="{L + pw}" y1="{py(f):.1f}" y2="{py(f):.1f}" stroke="#ddd"/>'
                         f'<text x="{L - 6}" y="{py(f) + 4:.1f}" text-anchor="end">{f:g}</text>')
    for p in (0.1, 1, 10, 100):
        if p >= x_lo:
            parts.append(f'<text x="{px(p):.1f}" y="{T + ph + 16}" text-anchor="middle">{p:g}%</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 10}" text-anchor="middle">edges kept (% of the graph, log scale)</text>')
    for label, colour, curve, dot, name in series:
        if curve:
            pts = " ".join(f"{px(p):.1f},{py(f):.1f}" for p, f in curve)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.3" '
                         f'opacity="0.8"><title>{e(name)}</title></polyline>')
        if dot:
            parts.append(f'<circle cx="{px(dot[0]):.1f}" cy="{py(dot[1]):.1f}" r="3.5" fill="{colour}">'
                         f'<title>{e(name)}: {dot[1]:.3f} at {dot[0]:.2f}%</title></circle>')
    seen = []
    for label, colour, *_ in series:
        if label not in seen:
            seen.append(label)
            y = T + 14 * len(seen)
            parts.append(f'<rect x="{L + pw + 12}" y="{y - 8}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{L + pw + 26}" y="{y + 1}">{e(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ---- PNG copies, when matplotlib is there ----------------------------------------------------

def _matplotlib() -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        return True
    except ImportError:
        return False


def _png_heatmap(path: Path, labels, m) -> str:
    import matplotlib.pyplot as plt
    import numpy as np
    data = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
    size = max(4.0, 0.3 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    cmap = plt.get_cmap("Blues").copy()
    cmap.set_bad("#dddddd")                     # pairs on different graphs, as in the SVG
    im = ax.imshow(data, vmin=0, vmax=1, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(im, ax=ax, label="edge Jaccard (grey: different graphs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _png_curves(path: Path, task: str, rows_: list[dict]) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = set()
    for label, colour, curve, dot, _ in _series(rows_):
        legend = label if label not in shown else None
        shown.add(label)
        if curve:
            ax.plot([p for p, _ in curve], [f for _, f in curve], color=colour, alpha=0.8, label=legend)
            legend = None
        if dot:
            ax.plot([dot[0]], [dot[1]], "o", color=colour, label=legend)
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of the graph)")
    ax.set_ylabel("faithfulness")
    ax.set_title(f"faithfulness on {task}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
