"""Compare circuits: across methods and seeds on one model, or across models by relative depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuits.circuit import Circuit
from circuits.render import to_dot

SHARED, ONLY_A, ONLY_B = "#9ae6b4", "#90cdf4", "#fbb6ce"


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


def _depth_profile(c: Circuit, bins: int) -> dict[str, list[float]]:
    """Fraction of each kind of component in the circuit per relative-depth bin."""
    a = c.graph.arch
    heads, mlps = [0.0] * bins, [0.0] * bins
    for n in _components(c):
        rel = (_layer(n) + 0.5) / a.n_layers
        b = min(bins - 1, int(rel * bins))
        if n.startswith("m"):
            mlps[b] += 1 / a.n_layers
        else:
            heads[b] += 1 / (a.n_layers * a.n_heads)
    return {"heads": [h * bins for h in heads], "mlps": [m * bins for m in mlps]}


def compare_across_models(a: Circuit, b: Circuit, name_a: str = "A", name_b: str = "B",
                          bins: int = 4) -> PairReport:
    pa, pb = _depth_profile(a, bins), _depth_profile(b, bins)
    dist = sum(abs(x - y) for k in ("heads", "mlps") for x, y in zip(pa[k], pb[k])) / (2 * bins)
    note = ("the models differ in depth or width, so individual heads and edges have no counterpart; "
            "compared: the share of heads and MLPs used in each relative-depth bin (layer+0.5)/n_layers")
    return PairReport(name_a, name_b, "relative-depth", {
        "note": note, "bins": bins,
        "bin_edges": [round(i / bins, 3) for i in range(bins + 1)],
        "depth_profile_a": pa, "depth_profile_b": pb, "profile_distance": dist,
        "components": [len(_components(a)), len(_components(b))],
        "edge_fraction": [a.n_edges / a.graph.n_edges, b.n_edges / b.graph.n_edges]})


def compare(a: Circuit, b: Circuit, name_a: str = "A", name_b: str = "B") -> PairReport:
    if same_shape(a, b):
        return compare_same_model(a, b, name_a, name_b)
    return compare_across_models(a, b, name_a, name_b)


def diff_dot(a: Circuit, b: Circuit, title: str | None = None) -> str:
    """DOT of the union of two same-shape circuits, coloured shared / only A / only B."""
    if not same_shape(a, b):
        raise ValueError("a diff drawing needs two circuits on the same graph")
    union = Circuit(a.graph, a.mask | b.mask, None, {})
    na, nb = set(a.node_names()), set(b.node_names())
    node_colours = {n: SHARED if (n in na and n in nb) else ONLY_A if n in na else ONLY_B
                    for n in na | nb}
    ea, eb = set(a.edge_names()), set(b.edge_names())
    edge_colours = {e: "#2f855a" if (e in ea and e in eb) else "#2b6cb0" if e in ea else "#b83280"
                    for e in ea | eb}
    return to_dot(union, title=title, node_colours=node_colours, edge_colours=edge_colours)


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
        return "\n".join(lines)
    lines = [f"{r.a} vs {r.b}: different models, aligned by relative depth", f"  {f['note']}"]
    for i in range(f["bins"]):
        lines.append(f"  depth {f['bin_edges'][i]:.2f}-{f['bin_edges'][i + 1]:.2f}: heads "
                     f"{f['depth_profile_a']['heads'][i]:.2f} / {f['depth_profile_b']['heads'][i]:.2f}, MLPs "
                     f"{f['depth_profile_a']['mlps'][i]:.2f} / {f['depth_profile_b']['mlps'][i]:.2f}")
    lines.append(f"  profile distance {f['profile_distance']:.3f} (0 = same use of depth)")
    return "\n".join(lines)


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
