"""Circuit files beyond the project's own JSON: the MIB/EAP-IG graph format (JSON and .pt),
networkx, GraphML and node-link JSON. Every format reads back to the same `Circuit`.

MIB layout (as the MIB circuit track and EAP-IG read it): `cfg` (n_layers, n_heads,
parallel_attn_mlp, d_model), `nodes` {name: {in_graph}}, `edges` {name: {score, in_graph}};
the .pt file holds the same as dense [n_forward, n_backward] tensors with `src_nodes` and
`dst_nodes` naming rows and columns — exactly this project's sender/receiver index.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import torch

from circuits.circuit import Circuit, CircuitFileError, edges_from_dict
from circuits.graph import Channel, Graph


# ---- MIB / EAP-IG ----------------------------------------------------------------------------

def _check_mib_expressible(graph: Graph) -> None:
    a = graph.arch
    if a.grouped:
        raise CircuitFileError("the MIB format has no grouped-query (per-KV-head) receivers; "
                               "use the circuits JSON, networkx or GraphML export for this model")
    if a.attn_only:
        raise CircuitFileError("the MIB format assumes an MLP in every layer; this model is attention-only")


def mib_cfg(graph: Graph) -> dict:
    a = graph.arch
    return {"n_layers": a.n_layers, "n_heads": a.n_heads, "parallel_attn_mlp": a.parallel,
            "d_model": a.d_model}


def to_mib(circuit: Circuit) -> dict:
    g = circuit.graph
    _check_mib_expressible(g)
    nodes = g.node_mask(circuit.mask)
    nodes[0] = nodes[0] or bool(circuit.mask.any())
    rows, cols = torch.nonzero(g.allowed, as_tuple=True)
    scores = circuit.scores if circuit.scores is not None else torch.zeros(g.n_senders, g.n_receivers)
    edges = {g.edge_name(s, r): {"score": float(scores[s, r]), "in_graph": bool(circuit.mask[s, r])}
             for s, r in zip(rows.tolist(), cols.tolist())}
    return {"cfg": mib_cfg(g), "nodes": {n: {"in_graph": bool(k)} for n, k in zip(g.nodes, nodes.tolist())},
            "edges": edges}


def _check_cfg(cfg: dict, graph: Graph, source: str) -> None:
    mine = mib_cfg(graph)
    for key in ("n_layers", "n_heads", "parallel_attn_mlp"):
        if key in cfg and cfg[key] != mine[key]:
            raise CircuitFileError(f"{source}: MIB cfg has {key}={cfg[key]}, this model has {mine[key]}")


def from_mib(data: dict, graph: Graph, source: str = "MIB circuit") -> Circuit:
    _check_mib_expressible(graph)
    for key in ("cfg", "edges"):
        if key not in data:
            raise CircuitFileError(f"{source}: not an MIB circuit (missing {key!r})")
    _check_cfg(data["cfg"], graph, source)
    mask, scores = edges_from_dict(data["edges"], graph, source)
    return Circuit(graph, mask, scores, {"imported_from": source, "format": "mib"})


def save_mib_json(circuit: Circuit, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_mib(circuit)))


def save_mib_pt(circuit: Circuit, path: str | Path) -> None:
    """Dense tensors and plain containers only: loadable with torch.load(weights_only=True)."""
    g = circuit.graph
    _check_mib_expressible(g)
    scores = circuit.scores if circuit.scores is not None else torch.zeros(g.n_senders, g.n_receivers)
    nodes = g.node_mask(circuit.mask)[: g.n_senders]
    torch.save({"cfg": mib_cfg(g), "src_nodes": list(g.senders),
                "dst_nodes": [r.name for r in g.receivers],
                "edges_scores": (scores.float() * g.allowed).contiguous(),
                "edges_in_graph": (circuit.mask & g.allowed).contiguous(),
                "nodes_in_graph": nodes.contiguous()}, path)


def load_mib(path: str | Path, graph: Graph) -> Circuit:
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"{path}: no such file")
    if path.suffix == ".pt":
        try:
            d = torch.load(path, weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a bad file
            raise CircuitFileError(f"{path}: not a readable .pt circuit ({err})") from None
        missing = {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph"} - set(d)
        if missing:
            raise CircuitFileError(f"{path}: MIB .pt file lacks {', '.join(sorted(missing))}")
        _check_mib_expressible(graph)
        _check_cfg(d["cfg"], graph, str(path))
        if list(d["src_nodes"]) != list(graph.senders) or list(d["dst_nodes"]) != [r.name for r in graph.receivers]:
            raise CircuitFileError(f"{path}: node order differs from this model's graph")
        mask = d["edges_in_graph"].bool() & graph.allowed
        return Circuit(graph, mask, d["edges_scores"].float(), {"imported_from": str(path), "format": "mib-pt"})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{path}: not valid JSON ({err.msg})") from None
    return from_mib(data, graph, str(path))


# ---- networkx, GraphML, node-link ------------------------------------------------------------

def _owner(graph: Graph, r: int) -> tuple[str, str]:
    """(node name, channel key) of a receiver in the networkx view."""
    rec = graph.receivers[r]
    if rec.channel in (Channel.Q, Channel.K, Channel.V):
        return rec.name.split("<")[0], rec.channel.value
    return rec.name, "in"


def _node_attrs(name: str) -> dict:
    if name in ("input", "logits"):
        return {"kind": name, "layer": -1 if name == "input" else 10**6, "head": -1}
    if name.startswith("m"):
        return {"kind": "mlp", "layer": int(name[1:]), "head": -1}
    layer, rest = name[1:].split(".")
    kind = "kv_group" if rest.startswith("kv") else "head"
    return {"kind": kind, "layer": int(layer), "head": int(rest.lstrip("hkv"))}


def to_networkx(circuit: Circuit, only_circuit: bool = False) -> nx.DiGraph:
    """DiGraph of components; an edge u→v carries `score_<c>` and `in_graph_<c>` per channel c
    (q, k, v for heads; `in` for MLPs and logits). Under GQA, k/v edges end at `a{L}.kv{G}`."""
    g = circuit.graph
    G = nx.DiGraph(schema="circuits.networkx", schema_version=1, provenance=json.dumps(circuit.provenance),
                   n_layers=g.arch.n_layers, n_heads=g.arch.n_heads, n_kv_heads=g.arch.n_kv_heads)
    scores = circuit.scores
    rows, cols = torch.nonzero(g.allowed & (circuit.mask if only_circuit else g.allowed), as_tuple=True)
    for s, r in zip(rows.tolist(), cols.tolist()):
        u = g.senders[s]
        v, ch = _owner(g, r)
        for node in (u, v):
            if node not in G:
                G.add_node(node, **_node_attrs(node))
        attrs = G.get_edge_data(u, v) or {}
        attrs[f"in_graph_{ch}"] = bool(circuit.mask[s, r])
        if scores is not None:
            attrs[f"score_{ch}"] = float(scores[s, r])
        G.add_edge(u, v, **attrs)
    return G


def from_networkx(G: nx.DiGraph, graph: Graph) -> Circuit:
    mask = graph.empty_mask()
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    has_scores = False
    for u, v, attrs in G.edges(data=True):
        for key, value in attrs.items():
            if not key.startswith("in_graph_"):
                continue
            ch = key[len("in_graph_"):]
            name = f"{u}->{v}" if ch == "in" else f"{u}->{v}<{ch}>"
            try:
                s, r = graph.edge(name)
            except KeyError as err:
                raise CircuitFileError(f"networkx graph: {err.args[0]}") from None
            mask[s, r] = value in (True, "true", "True", 1)
            if f"score_{ch}" in attrs:
                scores[s, r] = float(attrs[f"score_{ch}"])
                has_scores = True
    prov = G.graph.get("provenance")
    return Circuit(graph, mask, scores if has_scores else None, json.loads(prov) if prov else {})


def save_graphml(circuit: Circuit, path: str | Path) -> None:
    nx.write_graphml(to_networkx(circuit), path)


def load_graphml(path: str | Path, graph: Graph) -> Circuit:
    return from_networkx(nx.read_graphml(path), graph)


def save_node_link(circuit: Circuit, path: str | Path) -> None:
    Path(path).write_text(json.dumps(nx.node_link_data(to_networkx(circuit), edges="links")))


def load_node_link(path: str | Path, graph: Graph) -> Circuit:
    data = json.loads(Path(path).read_text())
    return from_networkx(nx.node_link_graph(data, edges="links"), graph)
