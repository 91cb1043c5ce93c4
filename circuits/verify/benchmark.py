"""Methods side by side on held-out examples, MIB circuit-track style.

The task's examples are split (seeded) into a discovery set and a test set. Every method scores
the edges on the discovery set only; its circuits are then judged on the test set by the MIB
curves (`checks.mib_scores`: CPR by signed score, CMD by |score|). Also: the time each method
took, and the edge Jaccard between methods' circuits at 5% of the edges (chosen by |score|).

Methods that take a gradient at one end (`direction`) are also run the other way round, unless
the list fixes the direction, so the report can say which direction gives the better curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from circuits import evaluation, select
from circuits.methods.ensemble import combine_scores, member_names
from circuits.methods.registry import get
from circuits.model.loader import Model
from circuits.patching import Ablation
from circuits.tasks.task import Task, TaskError, split
from circuits.verify import checks

JACCARD_PERCENT = 5.0
SCHEMA = "circuits.benchmark"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One method (with its parameters) to run; label names it in the report."""

    label: str
    method: str
    params: dict = field(default_factory=dict)


@dataclass
class Row:
    entry: Entry
    seconds: float
    mib: checks.MIBScores
    circuit: torch.Tensor            # [S, R] bool: the |score| circuit at JACCARD_PERCENT, pruned
    scores: torch.Tensor             # [S, R] float32, found on the discovery set


def _label(name: str, params: dict) -> str:
    return name + "".join(f":{k}={v}" for k, v in params.items())


def entries(specs: list[tuple[str, dict]], both_directions: bool = True) -> list[Entry]:
    """Entries for parsed specs; methods with a direction also get the other one (when the
    spec leaves it open), labelled name:direction=denoising."""
    out = []
    for name, params in specs:
        out.append(Entry(_label(name, params), name, dict(params)))
        if both_directions and "direction" in get(name).defaults and "direction" not in params:
            other = {**params, "direction": "denoising" if get(name).defaults["direction"] == "noising" else "noising"}
            out.append(Entry(_label(name, other), name, other))
    labels = [e.label for e in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the method list names {min(x for x in labels if labels.count(x) > 1)} twice")
    return out


def _score(entry: Entry, setup: evaluation.Setup, done: dict, progress: bool) -> tuple[torch.Tensor, float]:
    """(scores, seconds). An ensemble whose members were all scored here with their defaults is
    combined from those scores; its time is then the members' times plus the combining."""
    spec = get(entry.method)
    params = {**spec.defaults, **entry.params}
    if entry.method == "ensemble":
        members = member_names(params["members"])
        if all(m in done for m in members):
            t0 = time.perf_counter()
            combined = combine_scores(setup.graph, [done[m][0] for m in members], params["combine"])
            return combined, time.perf_counter() - t0 + sum(done[m][1] for m in members)
    t0 = time.perf_counter()
    scores = spec.score(setup, progress=progress, **params)
    return scores.float().cpu(), time.perf_counter() - t0


def run(model: Model, task: Task, specs: list[tuple[str, dict]], *, ablation: Ablation = Ablation.RESAMPLE,
        test_fraction: float = 0.5, seed: int = 0, batch_size: int | None = None,
        both_directions: bool = True, progress: bool = False) -> dict:
    """The benchmark report (JSON-ready, with the tensors kept under "rows" objects for plotting)."""
    todo = entries(specs, both_directions)
    discovery, test = split(task, test_fraction, seed)
    setup_d = evaluation.prepare(model, discovery, ablation, batch_size=batch_size)
    setup_t = evaluation.prepare(model, test, ablation, batch_size=batch_size)
    for part, s in (("discovery", setup_d), ("test", setup_t)):
        if not s.has_behaviour():
            raise TaskError(f"the {part} set shows no behaviour: ablating every edge leaves the metric "
                            f"as it is clean, so faithfulness is undefined there")
    g = model.graph
    n5 = int(JACCARD_PERCENT / 100 * g.n_edges)
    rows: list[Row] = []
    done: dict[str, tuple[torch.Tensor, float]] = {}
    for entry in todo:
        scores, seconds = _score(entry, setup_d, done, progress)
        if not entry.params:
            done[entry.method] = (scores, seconds)
        mib = checks.mib_scores(setup_t, scores)
        circuit = select.prune(g, select.top_n(g, scores, n5))
        rows.append(Row(entry, seconds, mib, circuit, scores))
    return report(model, task, ablation, discovery, test, seed, test_fraction, rows)


def _direction_verdicts(rows: list[Row]) -> list[dict]:
    """For each method run both ways with otherwise equal parameters: which curve is better."""
    verdicts = []
    by_label = {r.entry.label: r for r in rows}
    for r in rows:
        if r.entry.params.get("direction", get(r.entry.method).defaults.get("direction")) != "noising":
            continue
        rest = {k: v for k, v in r.entry.params.items() if k != "direction"}
        other = by_label.get(_label(r.entry.method, {**rest, "direction": "denoising"}))
        if other is None:
            continue
        n, d = r.mib, other.mib
        if n.cpr >= d.cpr and n.cmd <= d.cmd:
            better = "noising"
        elif d.cpr >= n.cpr and d.cmd <= n.cmd:
            better = "denoising"
        else:
            better = "mixed"
        verdicts.append({"method": _label(r.entry.method, rest), "better": better,
                         "noising": {"CPR": n.cpr, "CMD": n.cmd}, "denoising": {"CPR": d.cpr, "CMD": d.cmd}})
    return verdicts


def report(model: Model, task: Task, ablation: Ablation, discovery: Task, test: Task, seed: int,
           test_fraction: float, rows: list[Row]) -> dict:
    g = model.graph
    labels = [r.entry.label for r in rows]
    # two empty circuits (small graphs: 5% of the edges may prune to nothing) have no overlap to measure
    jac = [[None if not (a.circuit | b.circuit).any() else checks.jaccard(a.circuit, b.circuit) for b in rows]
           for a in rows]
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "model": model.spec, "task": task.name, "metric": task.metric.value, "ablation": ablation.value,
        "edges": g.n_edges,
        "split": {"seed": seed, "test_fraction": test_fraction, "discovery": len(discovery), "test": len(test)},
        "pairing": "CPR on circuits chosen by signed score, CMD on circuits chosen by |score| (MIB)",
        "methods": [{"label": r.entry.label, "method": r.entry.method,
                     "parameters": {**get(r.entry.method).defaults, **r.entry.params},
                     "seconds": r.seconds, **r.mib.as_dict()} for r in rows],
        "jaccard_at_5_percent": {"percent": JACCARD_PERCENT, "labels": labels, "matrix": jac,
                                 "edges": [int(r.circuit.sum()) for r in rows]},
        "direction": _direction_verdicts(rows),
    }


def table(rep: dict) -> str:
    """The report as terminal text: the MIB table, curves, directions, Jaccard at 5%."""
    s = rep["split"]
    lines = [(f"{rep['model']} / {rep['task']}: {rep['edges']} edges, {rep['metric']}, {rep['ablation']} ablation; "
              f"discovery {s['discovery']} examples, test {s['test']} (split seed {s['seed']})"),
             f"held-out MIB figures: {rep['pairing']}", ""]
    width = max(len(m["label"]) for m in rep["methods"])
    lines.append(f"{'method':<{width}}   CPR ↑    CMD ↓   | by |score|: CPR   by signed: CMD |  time s")
    for m in rep["methods"]:
        lines.append(f"{m['label']:<{width}}  {m['CPR']:6.3f}  {m['CMD']:6.3f}   |        {m['by_abs_score']['CPR']:6.3f}"
                     f"          {m['by_signed_score']['CMD']:6.3f} | {m['seconds']:7.2f}")
    lines.append("")
    percents = [p["percent"] for p in rep["methods"][0]["by_signed_score"]["points"]]
    lines.append(f"{'f by signed score':<{width}}  " + " ".join(f"{p:>6g}%" for p in percents))
    for m in rep["methods"]:
        lines.append(f"{m['label']:<{width}}  " + " ".join(f"{p['faithfulness']:7.3f}" for p in m["by_signed_score"]["points"]))
    lines.append(f"{'f by |score|':<{width}}  " + " ".join(f"{p:>6g}%" for p in percents))
    for m in rep["methods"]:
        lines.append(f"{m['label']:<{width}}  " + " ".join(f"{p['faithfulness']:7.3f}" for p in m["by_abs_score"]["points"]))
    if rep["direction"]:
        lines.append("")
        for d in rep["direction"]:
            verdict = (f"{d['better']} is better" if d["better"] != "mixed" else
                       f"mixed (higher CPR: {'noising' if d['noising']['CPR'] > d['denoising']['CPR'] else 'denoising'}, "
                       f"lower CMD: {'noising' if d['noising']['CMD'] < d['denoising']['CMD'] else 'denoising'})")
            lines.append(f"direction for {d['method']}: {verdict} "
                         f"(noising CPR {d['noising']['CPR']:.3f} CMD {d['noising']['CMD']:.3f}; "
                         f"denoising CPR {d['denoising']['CPR']:.3f} CMD {d['denoising']['CMD']:.3f})")
    jac = rep["jaccard_at_5_percent"]
    lines.append("")
    lines.append(f"edge Jaccard of the circuits at {jac['percent']:g}% of edges (by |score|, pruned; edges after "
                 f"pruning in brackets; - : both empty):")
    short = [str(i + 1) for i in range(len(jac["labels"]))]
    lines.append(f"{'':<{width + 11}}" + " ".join(f"{x:>5}" for x in short))
    for i, (label, row, n) in enumerate(zip(jac["labels"], jac["matrix"], jac["edges"])):
        lines.append(f"{i + 1:>2}. {label:<{width}} ({n:>4})" + " ".join("    -" if x is None else f"{x:5.2f}" for x in row))
    return "\n".join(lines)
