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

from circuits import positions as pos
from circuits.errors import CircuitsError
from circuits.files import json_safe, write_text
from circuits.graph import Channel, Graph

SCHEMA = "circuits.circuit"
SCHEMA_VERSION = 1


class CircuitFileError(CircuitsError, ValueError):
    """A circuit file that cannot be read, or does not fit the model's graph."""


@dataclass(frozen=True, eq=False)
class Circuit:
    """mask and scores are [S, R], or [P, S, R] when `positions` names P token positions.
    neurons ([S, d] bool) keeps only some output dimensions of each sender (MIB neuron grain)."""

    graph: Graph
    mask: torch.Tensor                      # [S, R] bool
    scores: torch.Tensor | None = None      # [S, R] float32, higher = more important
    provenance: dict = field(default_factory=dict)
    positions: tuple[str, ...] | None = None
    neurons: torch.Tensor | None = None          # [S, d] bool: output dimensions kept
    neuron_scores: torch.Tensor | None = None    # [S, d] float32

    @property
    def n_edges(self) -> int:
        return int((self.mask & self.graph.allowed).sum())

    @property
    def plain_mask(self) -> torch.Tensor:
        """[S, R]: the edges kept at any position."""
        return self.mask if self.positions is None else pos.summed(self.mask.bool())

    def edge_names(self) -> list[str]:
        if self.positions is not None:
            return pos.edge_names(self.graph, self.positions, self.mask)
        return self.graph.edge_names(self.mask)

    def node_names(self) -> list[str]:
        nodes = self.graph.node_mask(self.plain_mask)
        return [n for n, keep in zip(self.graph.nodes, nodes.tolist()) if keep]


def position_summed(circuit: Circuit) -> Circuit:
    """The plain view of a position-aware circuit: an edge is kept if it is kept at any position,
    its score is the sum over positions (the plain EAP's score, for attribution scores)."""
    if circuit.positions is None:
        return circuit
    scores = None if circuit.scores is None else pos.summed(circuit.scores)
    provenance = {**circuit.provenance, "summed_over_positions": list(circuit.positions)}
    return Circuit(circuit.graph, circuit.plain_mask, scores, provenance, None, circuit.neurons,
                   circuit.neuron_scores)


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
    count = mask.reshape(-1, g.n_receivers).sum(0)   # [R] edges into each receiver (every position)
    if mask.dim() == 3:                         # position-aware [P, S, R]: a component at any position
        weight, mask = weight.sum(0), mask.any(0)
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
    for r, n in enumerate(count.tolist()):
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
            "d_model": a.d_model, "n_edges": graph.n_edges}


def to_dict(circuit: Circuit) -> dict:
    g = circuit.graph
    if circuit.positions is None:
        rows, cols = torch.nonzero(g.allowed, as_tuple=True)
        mask = circuit.mask[rows, cols].tolist()
        scores = circuit.scores[rows, cols].tolist() if circuit.scores is not None else [None] * len(mask)
        names = [g.edge_name(int(s), int(r)) for s, r in zip(rows.tolist(), cols.tolist())]
    else:
        P = len(circuit.positions)
        ps, rows, cols = torch.nonzero(g.allowed.expand(P, -1, -1), as_tuple=True)
        mask = circuit.mask[ps, rows, cols].tolist()
        scores = circuit.scores[ps, rows, cols].tolist() if circuit.scores is not None else [None] * len(mask)
        names = [pos.edge_name(g, circuit.positions, p, s, r)
                 for p, s, r in zip(ps.tolist(), rows.tolist(), cols.tolist())]
    edges = {name: {"score": sc, "in_graph": bool(m)} for name, sc, m in zip(names, scores, mask)}
    out = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "graph": arch_summary(g),
           "provenance": circuit.provenance, "n_edges_in_graph": circuit.n_edges,
           "nodes": circuit.node_names(), "edges": edges}
    if circuit.positions is not None:
        out["positions"] = list(circuit.positions)
    if circuit.neurons is not None:
        out["neurons"] = {name: [int(x) for x in row.tolist()] for name, row in zip(g.senders, circuit.neurons)}
    if circuit.neuron_scores is not None:
        out["neuron_scores"] = {name: row.tolist() for name, row in zip(g.senders, circuit.neuron_scores)}
    return out


def from_dict(data: dict, graph: Graph, source: str = "circuit", text: str | None = None) -> Circuit:
    """A circuit from a parsed circuits file; `text` (the file's text) lets errors name the line."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise CircuitFileError(f"{source}: not a circuits file (schema {schema!r})")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise CircuitFileError(f"{source}: schema version {data['schema_version']} is newer than this "
                               f"package reads ({SCHEMA_VERSION}); upgrade circuits")
    validate(data, source, text)
    summary = arch_summary(graph)
    theirs = data.get("graph", {})
    for key in ("n_layers", "n_heads", "n_kv_heads", "has_mlp", "parallel"):
        if key in theirs and theirs[key] != summary[key]:
            raise CircuitFileError(f"{source}: made for a model with {key}={theirs[key]}, "
                                   f"this model has {summary[key]}")
    names = data.get("positions")
    names = None if names is None else tuple(names)
    mask, scores = edges_from_dict(data["edges"], graph, source, text, names)
    neurons = _neuron_table(data.get("neurons"), graph, source, "neurons")
    neuron_scores = _neuron_table(data.get("neuron_scores"), graph, source, "neuron_scores")
    return Circuit(graph, mask, scores, dict(data.get("provenance", {})), names,
                   None if neurons is None else neurons.bool(), neuron_scores)


def _neuron_table(table, graph: Graph, source: str, key: str) -> torch.Tensor | None:
    """{sender: [d values]} → [S, d] float, every sender present (null: NaN, as `save` writes it)."""
    if table is None:
        return None
    d = graph.arch.d_model
    if not isinstance(table, dict) or set(table) != set(graph.senders):
        raise CircuitFileError(f"{source}: '{key}' should map every sender ({graph.senders[0]}, …) to "
                               f"{d} values")
    rows = []
    for name in graph.senders:
        row = table[name]
        if not isinstance(row, list) or len(row) != d or \
                not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in row):
            raise CircuitFileError(f"{source}: '{key}' of {name} should be {d} numbers")
        rows.append([math.nan if x is None else x for x in row])
    return torch.tensor(rows, dtype=torch.float32)


# The file format, declared once: `validate` checks a file against it before anything is read.
FILE_SCHEMA = {
    "type": "object",
    "required": ["schema", "schema_version", "edges"],
    "properties": {
        "schema": {"const": SCHEMA},
        "schema_version": {"type": "integer", "minimum": 1},
        "graph": {"type": "object", "properties": {
            "family": {"type": "string"}, "n_layers": {"type": "integer", "minimum": 0},
            "n_heads": {"type": "integer", "minimum": 1}, "n_kv_heads": {"type": "integer", "minimum": 1},
            "has_mlp": {"type": "boolean"}, "parallel": {"type": "boolean"},
            "d_model": {"type": "integer", "minimum": 0}, "n_edges": {"type": "integer", "minimum": 0}}},
        "provenance": {"type": "object"},
        "n_edges_in_graph": {"type": "integer", "minimum": 0},
        "nodes": {"type": "array", "items": {"type": "string"}},
        "edges": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["in_graph"], "additionalProperties": False,
            "properties": {"score": {"type": ["number", "null"]}, "in_graph": {"type": "boolean"}}}},
        # position grain: the names of the positions (edges are then named s@p->r@p)
        "positions": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        # neuron grain: {sender: [d_model values]}, 1 = output dimension kept
        "neurons": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}}},
        "neuron_scores": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": ["number", "null"]}}},
    },
}


class NonFinite(str):
    """NaN/Infinity as parsed from a file: not a JSON number, so the schema refuses it."""


def _key(path) -> str:
    """edges["a0.h0->m0"].score"""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier():
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out


def line_of(text: str | None, path) -> int | None:
    """The line of the field at `path` (its keys found in order), or None."""
    if not text:
        return None
    at, found = 0, None
    for part in path:
        if isinstance(part, str):
            hit = text.find(json.dumps(part) + ":", at)
            if hit < 0:
                break
            at = found = hit
    return None if found is None else text.count("\n", 0, found) + 1


def validate(data, source: str, text: str | None = None, schema: dict = FILE_SCHEMA) -> None:
    """Check parsed JSON against a declared schema; the first error as one line naming the file,
    the field and (when the text is given) the line."""
    import jsonschema
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return
    path = list(error.absolute_path)
    field = _key(path) or "the top level"
    line = line_of(text, path)
    where = f"{source}, line {line}" if line else source
    if isinstance(error.instance, NonFinite):
        message = f"{error.instance} is not a finite number"
    elif error.validator == "required":
        message = error.message.replace("is a required property", "is missing")
        if path:
            message = f"{message} in {field}"
        raise CircuitFileError(f"{where}: {message}")
    elif error.validator == "additionalProperties":
        message = error.message
    else:
        message = error.message if len(error.message) < 120 else error.message[:117] + "..."
    raise CircuitFileError(f"{where}: field {field}: {message}")


def edges_from_dict(edges: dict, graph: Graph, source: str, text: str | None = None,
                    positions: tuple[str, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """{edge name: {"score", "in_graph"}} → (mask, scores or None when no edge has a score);
    [P, S, R] with position names (edges named `s@p->r@p`)."""
    shape = (graph.n_senders, graph.n_receivers) if positions is None else \
        (len(positions), graph.n_senders, graph.n_receivers)
    mask = torch.zeros(shape, dtype=torch.bool)
    scores = torch.zeros(shape)
    has_scores = False
    locate = graph.edge if positions is None else (lambda name: pos.edge(graph, positions, name))
    for name, edge in edges.items():
        try:
            at = locate(name)                            # (s, r) or (p, s, r)
        except KeyError as err:
            line = line_of(text, [name])
            where = f"{source}, line {line}" if line else source
            raise CircuitFileError(f"{where}: {err.args[0]}") from None
        if not isinstance(edge, dict):
            raise CircuitFileError(f"{source}: edge {name!r} should be an object with score and in_graph, "
                                   f"got {edge!r:.60}")
        in_graph = edge.get("in_graph", False)
        if not isinstance(in_graph, bool):
            raise CircuitFileError(f"{source}: edge {name!r} has in_graph {in_graph!r:.20}, not true or false")
        mask[at] = in_graph
        if edge.get("score") is not None:
            value = edge["score"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CircuitFileError(f"{source}: edge {name!r} has score {value!r:.60}, "
                                       f"not a finite number")
            scores[at] = float(value)
            has_scores = True
    return mask, scores if has_scores else None


def dumps(circuit: Circuit) -> tuple[str, list[str]]:
    """The circuit file's text, and the fields whose non-finite numbers (an undefined
    faithfulness, a NaN score) are written as null."""
    replaced: list[str] = []
    data = json_safe(to_dict(circuit), replaced=replaced)
    return json.dumps(data, indent=1, allow_nan=False), replaced


def save(circuit: Circuit, path: str | Path) -> list[str]:
    """Write atomically (the old file stays intact on any failure); returns the fields written as
    null (see dumps)."""
    text, replaced = dumps(circuit)
    write_text(path, text)
    return replaced


def graph_from_summary(summary: dict) -> Graph:
    """The graph a circuit file was made on, rebuilt from its summary (no model needed)."""
    from circuits import graph as graph_mod
    from circuits.model.adapters import Arch, Norm, Positional
    try:
        arch = Arch(family=summary.get("family", "unknown"), n_layers=int(summary["n_layers"]),
                    n_heads=int(summary["n_heads"]), n_kv_heads=int(summary.get("n_kv_heads", summary["n_heads"])),
                    d_model=int(summary.get("d_model", 0)), d_head=0, d_mlp=0 if not summary.get("has_mlp", True) else 1, d_vocab=0, n_ctx=0,
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
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, parse_constant=NonFinite)
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
    return from_dict(data, graph, str(path), text)


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
