"""Compare circuits: across methods and seeds on one model, or across models by relative depth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from circuits.circuit import Circuit
from circuits.io.render import to_dot

SHARED, ONLY_A, ONLY_B = "#9ae6b4", "#90cdf4", "#fbb6ce"


def circuit_paths(paths: list[str]) -> list[str]:
    """Paths with each directory (a sweep's output) replaced by the circuit files in it, sorted."""
    out = []
    for p in paths:
        if Path(p).is_dir():
            found = sorted(str(f) for f in Path(p).glob("*.json"))
            if not found:
                raise ValueError(f"{p}: a directory with no circuit files (*.json)")
            out += found
        else:
            out.append(p)
    return out


def same_shape(a: Circuit, b: Circuit) -> bool:
    x, y = a.graph.arch, b.graph.arch
    return (x.n_layers, x.n_heads, x.n_kv_heads, x.has_mlp, x.parallel) == \
           (y.n_layers, y.n_heads, y.n_kv_heads, y.has_mlp, y.parallel)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _components(c: Circuit) -> set[str]:
    return {n for n in c.node_names() if n not in ("input", "logits")}


def _layer(name: str) -> int:
    return int(name[1:]) if name.startswith("m") else int(name[1:].split(".")[0])


@dataclass(frozen=True)
class PairReport:
    a: str
    b: str
    comparable: str           # "edges" (same graph) or "relative-depth"
    figures: dict

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "comparable": self.comparable, **self.figures}


def compare_same_model(a: Circuit, b: Circuit, name_a: str = "A", name_b: str = "B") -> PairReport:
    ea, eb = set(a.edge_names()), set(b.edge_names())
    na, nb = _components(a), _components(b)
    per_layer = {}
    for layer in range(a.graph.arch.n_layers):
        la = {n for n in na if _layer(n) == layer}
        lb = {n for n in nb if _layer(n) == layer}
        if la | lb:
            per_layer[layer] = {"jaccard": _jaccard(la, lb), "shared": sorted(la & lb),
                                "only_a": sorted(la - lb), "only_b": sorted(lb - la)}
    return PairReport(name_a, name_b, "edges", {
        "edges": [len(ea), len(eb)], "edge_jaccard": _jaccard(ea, eb), "shared_edges": len(ea & eb),
        "nodes": [len(na), len(nb)], "node_jaccard": _jaccard(na, nb),
        "shared_components": sorted(na & nb), "only_a": sorted(na - nb), "only_b": sorted(nb - na),
        "per_layer": per_layer})


def _depth_overlap(layer: int, n_layers: int, b: int, bins: int) -> float:
    """How much of relative-depth bin b that layer covers; layer l spans [l, l+1) / n_layers."""
    return max(0.0, min((layer + 1) / n_layers, (b + 1) / bins) - max(layer / n_layers, b / bins))


def _depth_profile(c: Circuit, bins: int) -> dict[str, list[float | None]]:
    """Share (0..1) of the model's heads, and of its MLPs, that the circuit uses per depth bin.

    A bin counts each layer's components in proportion to the overlap, so every bin is covered
    even when bins outnumber layers. None where the model has no component of that kind (an
    attention-only model's MLPs)."""
    n_layers = c.graph.arch.n_layers
    used = _components(c)
    totals = {"heads": [0.0] * bins, "mlps": [0.0] * bins}
    hits = {"heads": [0.0] * bins, "mlps": [0.0] * bins}
    for n in c.graph.nodes:
        if n in ("input", "logits"):
            continue
        kind = "mlps" if n.startswith("m") else "heads"
        for b in range(bins):
            w = _depth_overlap(_layer(n), n_layers, b, bins)
            totals[kind][b] += w
            hits[kind][b] += w if n in used else 0.0
    return {k: [h / t if t else None for h, t in zip(hits[k], totals[k])] for k in totals}


def _profile_distance(pa: dict, pb: dict) -> float | None:
    """Mean |share A − share B| over the bins and kinds both models have."""
    gaps = [abs(x - y) for k in ("heads", "mlps") for x, y in zip(pa[k], pb[k])
            if x is not None and y is not None]
    return sum(gaps) / len(gaps) if gaps else None


def compare_across_models(a: Circuit, b: Circuit, name_a: str = "A", name_b: str = "B",
                          bins: int = 4) -> PairReport:
    pa, pb = _depth_profile(a, bins), _depth_profile(b, bins)
    note = ("the models differ in depth or width, so individual heads and edges have no counterpart; "
            "compared: the share of each model's heads and of its MLPs that the circuit uses, per "
            "relative-depth bin (layer l spans depths l/n_layers to (l+1)/n_layers)")
    return PairReport(name_a, name_b, "relative-depth", {
        "note": note, "bins": bins,
        "bin_edges": [round(i / bins, 3) for i in range(bins + 1)],
        "depth_profile_a": pa, "depth_profile_b": pb, "profile_distance": _profile_distance(pa, pb),
        "components": [len(_components(a)), len(_components(b))],
        "edge_fraction": [a.n_edges / a.graph.n_edges, b.n_edges / b.graph.n_edges]})


def role_profile(c: Circuit, labels: dict[str, str | None]) -> dict[str, dict]:
    """Per head role (`circuits.verify.roles` labels; "unlabelled" for none): the circuit's heads
    with it and their mean relative depth ((layer + 0.5) / n_layers)."""
    n_layers = c.graph.arch.n_layers
    groups: dict[str, list[str]] = {}
    for head in sorted(n for n in _components(c) if not n.startswith("m")):
        groups.setdefault(labels.get(head) or "unlabelled", []).append(head)
    return {role: {"heads": heads, "count": len(heads),
                   "mean_depth": round(sum((_layer(h) + 0.5) / n_layers for h in heads) / len(heads), 3)}
            for role, heads in groups.items()}


def role_alignment(a: Circuit, b: Circuit, labels_a: dict, labels_b: dict) -> dict[str, dict]:
    """Which roles each circuit's heads carry, side by side: {role: {"a": profile, "b": profile}}."""
    pa, pb = role_profile(a, labels_a), role_profile(b, labels_b)
    order = sorted(set(pa) | set(pb), key=lambda r: (r == "unlabelled", r))
    return {role: {"a": pa.get(role), "b": pb.get(role)} for role in order}


def compare(a: Circuit, b: Circuit, name_a: str = "A", name_b: str = "B",
            labels_a: dict | None = None, labels_b: dict | None = None) -> PairReport:
    """Same graph: edge/node overlap (per position too for two position-aware circuits);
    otherwise alignment by relative depth. With head-role labels for both
    (`circuits.verify.roles.label_heads`), also the roles each circuit uses, and where."""
    positions = shared_positions(a, b) if same_shape(a, b) else None
    if positions is not None and "note" in positions:
        a, b = plain_view(a), plain_view(b)             # one grain for both: edges at any position
    report = (compare_same_model(a, b, name_a, name_b) if same_shape(a, b)
              else compare_across_models(plain_view(a), plain_view(b), name_a, name_b))
    if positions is not None:
        report.figures["positions"] = positions
    if labels_a is not None and labels_b is not None:
        report.figures["roles"] = role_alignment(a, b, labels_a, labels_b)
    return report


def _role_side(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['count']} at depth {p['mean_depth']:.2f}"


def role_lines(r: PairReport, shown: int = 4) -> list[str]:
    if "roles" not in r.figures:
        return []
    lines = [f"  head roles ({r.a} / {r.b}: heads in the circuit with that role, mean relative depth):"]
    for role, sides in r.figures["roles"].items():
        names = lambda p: "" if not p else " (" + ", ".join(p["heads"][:shown]) + (", ..." if p["count"] > shown else "") + ")"
        lines.append(f"    {role:<16}{_role_side(sides['a'])}{names(sides['a'])} / {_role_side(sides['b'])}{names(sides['b'])}")
    return lines


def plain_view(c: Circuit) -> Circuit:
    """A position-aware circuit as a plain one: its edges at any position, scores summed."""
    if c.positions is None:
        return c
    scores = None if c.scores is None else c.scores.sum(0)
    return Circuit(c.graph, c.plain_mask, scores, c.provenance, None, c.neurons, c.neuron_scores)


def shared_positions(a: Circuit, b: Circuit) -> dict | None:
    """Which token positions two position-aware circuits share: the positions where each has
    edges, and per position the edges of each, shared edges and their Jaccard. None for two plain
    circuits; a note when only one is position-aware or their positions differ."""
    if a.positions is None and b.positions is None:
        return None
    if a.positions != b.positions:
        which = "only one circuit is" if a.positions is None or b.positions is None else \
            "the circuits name different positions; they are"
        return {"note": f"{which} position-aware: compared position-summed (edges at any position)"}
    allowed = a.graph.allowed
    per = {}
    for p, name in enumerate(a.positions):
        ea, eb = a.mask[p] & allowed, b.mask[p] & allowed
        na, nb, both = int(ea.sum()), int(eb.sum()), int((ea & eb).sum())
        if na or nb:
            per[name] = {"edges": [na, nb], "shared": both, "jaccard": both / (na + nb - both)}
    return {"shared": [p for p, r in per.items() if r["edges"][0] and r["edges"][1]],
            "only_a": [p for p, r in per.items() if not r["edges"][1]],
            "only_b": [p for p, r in per.items() if not r["edges"][0]], "per_position": per}


def diff_dot(a: Circuit, b: Circuit, title: str | None = None) -> str:
    """DOT of the union of two same-shape circuits, coloured shared / only A / only B."""
    if not same_shape(a, b):
        raise ValueError("a diff drawing needs two circuits on the same graph")
    a, b = plain_view(a), plain_view(b)
    union = Circuit(a.graph, a.mask | b.mask, None, {})
    na, nb = set(a.node_names()), set(b.node_names())
    node_colours = {n: SHARED if (n in na and n in nb) else ONLY_A if n in na else ONLY_B
                    for n in na | nb}
    ea, eb = set(a.edge_names()), set(b.edge_names())
    edge_colours = {e: "#2f855a" if (e in ea and e in eb) else "#2b6cb0" if e in ea else "#b83280"
                    for e in ea | eb}
    return to_dot(union, title=title, node_colours=node_colours, edge_colours=edge_colours)


def _share(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(r: PairReport) -> str:
    f = r.figures
    if r.comparable == "edges":
        lines = [f"{r.a} vs {r.b}: same graph",
                 f"  edges {f['edges'][0]} / {f['edges'][1]}, shared {f['shared_edges']}, edge Jaccard {f['edge_jaccard']:.3f}",
                 f"  components {f['nodes'][0]} / {f['nodes'][1]}, node Jaccard {f['node_jaccard']:.3f}",
                 f"  shared: {', '.join(f['shared_components']) or '-'}",
                 f"  only {r.a}: {', '.join(f['only_a']) or '-'}",
                 f"  only {r.b}: {', '.join(f['only_b']) or '-'}"]
        for layer, row in f["per_layer"].items():
            lines.append(f"  layer {layer}: Jaccard {row['jaccard']:.2f}")
        lines += _position_lines(r)
        return "\n".join(lines + role_lines(r))
    lines = [f"{r.a} vs {r.b}: different models, aligned by relative depth", f"  {f['note']}"]
    for i in range(f["bins"]):
        pa, pb = f["depth_profile_a"], f["depth_profile_b"]
        lines.append(f"  depth {f['bin_edges'][i]:.2f}-{f['bin_edges'][i + 1]:.2f}: heads "
                     f"{_share(pa['heads'][i])} / {_share(pb['heads'][i])}, MLPs "
                     f"{_share(pa['mlps'][i])} / {_share(pb['mlps'][i])}")
    lines.append(f"  profile distance {_share(f['profile_distance'], 3)} (mean |difference| of the shares; 0 = same use of depth)")
    return "\n".join(lines + role_lines(r))


def edge_overlap_matrix(circuits: list[Circuit]) -> torch.Tensor:
    """Pairwise edge Jaccard of same-shape circuits, [n, n]."""
    n = len(circuits)
    out = torch.ones(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = circuits[i].mask & circuits[i].graph.allowed, circuits[j].mask & circuits[j].graph.allowed
            union = int((a | b).sum())
            out[i, j] = out[j, i] = int((a & b).sum()) / union if union else 1.0
    return out


def _position_lines(r: PairReport) -> list[str]:
    pos = r.figures.get("positions")
    if pos is None:
        return []
    if "note" in pos:
        return [f"  positions: {pos['note']}"]
    lines = [(f"  positions shared: {', '.join(pos['shared']) or '-'}; only {r.a}: {', '.join(pos['only_a']) or '-'}; "
              f"only {r.b}: {', '.join(pos['only_b']) or '-'}")]
    for name, row in pos["per_position"].items():
        lines.append(f"  position {name}: edges {row['edges'][0]} / {row['edges'][1]}, shared {row['shared']}, "
                     f"Jaccard {row['jaccard']:.2f}")
    return lines
