"""A circuit: a graph, an edge mask, optional edge scores, and how it was made.

The project's own file format is versioned JSON (`SCHEMA_VERSION`); it records the model spec,
task, method, parameters, seed and package version so any figure can be reproduced from the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuits.errors import CircuitsError
from circuits.graph import Channel, Graph

SCHEMA = "circuits.circuit"
SCHEMA_VERSION = 1


class CircuitFileError(CircuitsError, ValueError):
    """A circuit file that cannot be read, or does not fit the model's graph."""


@dataclass(frozen=True, eq=False)
class Circuit:
    graph: Graph
    mask: torch.Tensor                      # [S, R] bool
    scores: torch.Tensor | None = None      # [S, R] float32, higher = more important
    provenance: dict = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int((self.mask & self.graph.allowed).sum())

    def edge_names(self) -> list[str]:
        return self.graph.edge_names(self.mask)

    def node_names(self) -> list[str]:
        nodes = self.graph.node_mask(self.mask)
        return [n for n, keep in zip(self.graph.nodes, nodes.tolist()) if keep]


def kv_group_label(graph: Graph, layer: int, group: int) -> str:
    """`a23.kv1 (h3,h4,h5)`: a KV group under GQA names the query heads that share it."""
    per = graph.arch.n_heads // graph.arch.n_kv_heads
    return f"a{layer}.kv{group} (" + ",".join(f"h{h}" for h in range(group * per, (group + 1) * per)) + ")"


def components(circuit: Circuit, top: int = 8) -> dict:
    """What a circuit is made of, by kind, and its strongest components.

    heads: heads that send an edge or receive one into q (into k/v too without GQA); kv_groups
    (GQA only): KV groups whose k/v inputs receive an edge — shared by the group's query heads, so
    not counted as a find of each head; mlps; edges by receiver kind; top: the `top` components by
    summed |score| of the circuit's edges into and out of them (by edge count without scores).
    """
    g = circuit.graph
    mask = circuit.mask.bool() & g.allowed
    weight = (circuit.scores.abs().float() if circuit.scores is not None else torch.ones(mask.shape)) * mask
    out_w = weight.sum(1)                       # [S]
    in_w = weight.sum(0)                        # [R]
    grouped = g.arch.grouped
    score: dict[str, float] = {}
    heads, groups, mlps = set(), {}, set()
    for s in torch.nonzero(mask.any(1)).flatten().tolist():
        name = g.senders[s]
        if name != "input":
            score[name] = score.get(name, 0.0) + float(out_w[s])
    for r in torch.nonzero(mask.any(0)).flatten().tolist():
        rec = g.receivers[r]
        if rec.channel is Channel.LOGITS:
            continue
        name = rec.node
        if grouped and rec.channel in (Channel.K, Channel.V):
            name = kv_group_label(g, rec.layer, rec.index)
            groups[name] = [g.senders[n] for n in g.receiver_nodes(r)]
        score[name] = score.get(name, 0.0) + float(in_w[r])
    for name in score:
        if name.startswith("m"):
            mlps.add(name)
        elif name not in groups:
            heads.add(name)
    by_receiver = {ch.value: 0 for ch in Channel}
    for r, n in enumerate(mask.sum(0).tolist()):
        by_receiver[g.receivers[r].channel.value] += n
    by_receiver = {k: v for k, v in by_receiver.items() if v}
    ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    order = lambda names: sorted(names, key=lambda n: g.nodes.index(n) if n in g.nodes else 0)
    return {"heads": order(heads), "kv_groups": {k: groups[k] for k in sorted(groups, key=_layer_key)},
            "mlps": order(mlps), "edges_by_receiver": by_receiver,
            "top": [{"component": k, "score": v} for k, v in ranked[:top]]}


def _layer_key(label: str) -> tuple[int, int]:
    layer, rest = label[1:].split(" ")[0].split(".")
    return int(layer), int(rest.lstrip("hkv"))


def arch_summary(graph: Graph) -> dict:
    a = graph.arch
    return {"family": a.family, "n_layers": a.n_layers, "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads, "has_mlp": a.has_mlp, "parallel": a.parallel,
            "n_edges": graph.n_edges}


def to_dict(circuit: Circuit) -> dict:
    g = circuit.graph
    rows, cols = torch.nonzero(g.allowed, as_tuple=True)
    mask = circuit.mask[rows, cols].tolist()
    scores = circuit.scores[rows, cols].tolist() if circuit.scores is not None else [None] * len(mask)
    edges = {g.edge_name(int(s), int(r)): {"score": sc, "in_graph": bool(m)}
             for s, r, sc, m in zip(rows.tolist(), cols.tolist(), scores, mask)}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "graph": arch_summary(g),
            "provenance": circuit.provenance, "n_edges_in_graph": circuit.n_edges,
            "nodes": circuit.node_names(), "edges": edges}


def from_dict(data: dict, graph: Graph, source: str = "circuit") -> Circuit:
    if data.get("schema") != SCHEMA:
        raise CircuitFileError(f"{source}: not a circuits file (schema {data.get('schema')!r})")
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise CircuitFileError(f"{source}: schema version {data['schema_version']} is newer than this "
                               f"package reads ({SCHEMA_VERSION}); upgrade circuits")
    summary = arch_summary(graph)
    theirs = data.get("graph", {})
    for key in ("n_layers", "n_heads", "n_kv_heads", "has_mlp", "parallel"):
        if key in theirs and theirs[key] != summary[key]:
            raise CircuitFileError(f"{source}: made for a model with {key}={theirs[key]}, "
                                   f"this model has {summary[key]}")
    mask, scores = edges_from_dict(data.get("edges", {}), graph, source)
    return Circuit(graph, mask, scores, dict(data.get("provenance", {})))


def edges_from_dict(edges: dict, graph: Graph, source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """{edge name: {"score", "in_graph"}} → (mask, scores or None when no edge has a score)."""
    mask = graph.empty_mask()
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    has_scores = False
    for name, edge in edges.items():
        try:
            s, r = graph.edge(name)
        except KeyError as err:
            raise CircuitFileError(f"{source}: {err.args[0]}") from None
        if not isinstance(edge, dict):
            raise CircuitFileError(f"{source}: edge {name!r} should be an object with score and in_graph, "
                                   f"got {edge!r:.60}")
        mask[s, r] = bool(edge.get("in_graph", False))
        if edge.get("score") is not None:
            try:
                scores[s, r] = float(edge["score"])
            except (TypeError, ValueError):
                raise CircuitFileError(f"{source}: edge {name!r} has score {edge['score']!r:.60}, "
                                       f"not a number") from None
            has_scores = True
    return mask, scores if has_scores else None


def save(circuit: Circuit, path: str | Path) -> None:
    """Write atomically: a failed write never leaves a half file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(circuit), indent=1, allow_nan=True))
    tmp.replace(path)


def graph_from_summary(summary: dict) -> Graph:
    """The graph a circuit file was made on, rebuilt from its summary (no model needed)."""
    from circuits import graph as graph_mod
    from circuits.model.adapters import Arch, Norm, Positional
    try:
        arch = Arch(family=summary.get("family", "unknown"), n_layers=int(summary["n_layers"]),
                    n_heads=int(summary["n_heads"]), n_kv_heads=int(summary.get("n_kv_heads", summary["n_heads"])),
                    d_model=0, d_head=0, d_mlp=0 if not summary.get("has_mlp", True) else 1, d_vocab=0, n_ctx=0,
                    norm=Norm.NONE, norm_eps=0.0, positional=Positional.NONE,
                    parallel=bool(summary.get("parallel", False)), attn_only=not summary.get("has_mlp", True))
    except (KeyError, TypeError, ValueError):
        raise CircuitFileError("the circuit file's graph summary is incomplete") from None
    return graph_mod.build(arch)


def load(path: str | Path, graph: Graph | None = None) -> Circuit:
    """Read a circuits JSON file; without a graph, the file's own graph summary is used."""
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"{path}: no such circuit file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CircuitFileError(f"{path}: binary content, not a circuits JSON file (an MIB .pt file? "
                               f"`circuits import --format mib` reads it)") from None
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise CircuitFileError(f"{path}: not a circuits file (a JSON {type(data).__name__}, not an object)")
    if graph is None:
        if data.get("schema") != SCHEMA:
            raise CircuitFileError(f"{path}: not a circuits file (schema {data.get('schema')!r})")
        graph = graph_from_summary(data.get("graph", {}))
    return from_dict(data, graph, str(path))


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
