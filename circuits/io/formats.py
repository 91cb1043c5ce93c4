"""Circuit files beyond the project's own JSON: the MIB/EAP-IG graph format (JSON and .pt),
networkx, GraphML and node-link JSON. Every format reads back to the same `Circuit`.

MIB layout (as the MIB circuit track and EAP-IG read it): `cfg` (n_layers, n_heads,
parallel_attn_mlp, d_model), `nodes` {name: {in_graph}}, `edges` {name: {score, in_graph}};
the .pt file holds the same as dense [n_forward, n_backward] tensors with `src_nodes` and
`dst_nodes` naming rows and columns — exactly this project's sender/receiver index.

Grouped-query attention: MIB names k and v inputs per query head (`a3.h4<k>`); this graph has one
k and one v receiver per KV group (`a3.kv1<k>`), read by all of the group's query heads. Export
writes each group edge once per query head of the group with the same score and in_graph (the
heads read one shared input); import reads a group edge as in the circuit when any of its heads'
edges is, with the mean of their scores. Export then import gives back the same circuit.

Neuron-level circuits carry `neurons_in_graph` and `neurons_scores` ([n_forward, d_model] in the
.pt file; per node `neurons` and `neurons_scores` lists in JSON), as EAP-IG writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from circuits.circuit import Circuit, CircuitFileError, edges_from_dict
from circuits.files import atomic_open, json_safe, write_text
from circuits.graph import Channel, Graph

# What each reader expects, for error messages about a file in another format.
MIB_EXPECTED = "an MIB circuit (JSON with cfg, nodes and edges, or the .pt file torch.save writes)"
GRAPHML_EXPECTED = "a GraphML circuit (as `circuits export --format graphml` writes)"
NODE_LINK_EXPECTED = "a node-link JSON circuit (as `circuits export --format node-link` writes)"


# ---- MIB / EAP-IG ----------------------------------------------------------------------------

def _check_mib_expressible(graph: Graph) -> None:
    a = graph.arch
    if a.attn_only:
        raise CircuitFileError("the MIB format assumes an MLP in every layer; this model is attention-only")


def mib_cfg(graph: Graph) -> dict:
    a = graph.arch
    return {"n_layers": a.n_layers, "n_heads": a.n_heads, "parallel_attn_mlp": a.parallel,
            "d_model": a.d_model}


def mib_receivers(graph: Graph) -> tuple[list[str], torch.Tensor]:
    """MIB's receiver names and, for each, the column of this graph it reads ([R_mib] long).
    The identity without GQA; under GQA every query head gets its own k and v name, all reading
    their KV group's column."""
    if not graph.arch.grouped:
        return [r.name for r in graph.receivers], torch.arange(graph.n_receivers)
    per = graph.arch.n_heads // graph.arch.n_kv_heads
    names, cols = [], []
    for r, rec in enumerate(graph.receivers):       # per layer: q of each head, k of each, v of each
        if rec.channel in (Channel.K, Channel.V):
            for h in range(rec.index * per, (rec.index + 1) * per):
                names.append(f"a{rec.layer}.h{h}<{rec.channel.value}>")
                cols.append(r)
        else:
            names.append(rec.name)
            cols.append(r)
    return names, torch.tensor(cols)


def _group_mib_edges(edges: dict, graph: Graph, source: str) -> dict:
    """MIB edges named per query head → this graph's names: under GQA each KV group's edge is in
    the circuit when any head's copy is, with the mean of their scores."""
    if not graph.arch.grouped:
        return edges
    per = graph.arch.n_heads // graph.arch.n_kv_heads
    grouped: dict[str, list] = {}
    out = {}
    for name, edge in edges.items():
        sender, _, receiver = name.partition("->")
        if receiver.endswith(("<k>", "<v>")) and ".h" in receiver:
            layer, rest = receiver[1:].split(".h")
            head, ch = rest[:-3], rest[-2]
            try:
                group = int(head) // per
            except ValueError:
                raise CircuitFileError(f"{source}: no edge named {name!r} in this graph") from None
            grouped.setdefault(f"{sender}->a{layer}.kv{group}<{ch}>", []).append(edge)
        else:
            out[name] = edge
    for name, copies in grouped.items():
        if not all(isinstance(e, dict) for e in copies):
            out[name] = next(e for e in copies if not isinstance(e, dict))   # edges_from_dict says why
            continue
        scores = [e.get("score") for e in copies if e.get("score") is not None]
        try:
            score = float(sum(float(x) for x in scores) / len(scores)) if scores else None
        except (TypeError, ValueError):
            score = next(x for x in scores if not isinstance(x, (int, float)))
        out[name] = {"score": score, "in_graph": any(bool(e.get("in_graph", False)) for e in copies)}
    return out


def _check_plain(circuit: Circuit) -> None:
    if circuit.positions is not None:
        raise CircuitFileError("the MIB format has no token positions: export the position-summed circuit "
                               "(circuits export --sum-positions), or keep the positions in circuits JSON "
                               "(--format json)")


def to_mib(circuit: Circuit) -> dict:
    g = circuit.graph
    _check_mib_expressible(g)
    _check_plain(circuit)
    nodes = g.node_mask(circuit.mask)
    nodes[0] = nodes[0] or bool(circuit.mask.any())
    names, cols = mib_receivers(g)
    scores = circuit.scores if circuit.scores is not None else torch.zeros(g.n_senders, g.n_receivers)
    edges = {}
    for name, r in zip(names, cols.tolist()):
        for s in range(int(g.n_inputs[r])):
            edges[f"{g.senders[s]}->{name}"] = {"score": float(scores[s, r]), "in_graph": bool(circuit.mask[s, r])}
    out = {"cfg": mib_cfg(g), "nodes": {n: {"in_graph": bool(k)} for n, k in zip(g.nodes, nodes.tolist())},
           "edges": edges}
    _neurons_to_mib_nodes(circuit, out["nodes"])
    return out


def _neurons_to_mib_nodes(circuit: Circuit, nodes: dict) -> None:
    """Per forward node `neurons` (1/0 per dimension) and `neurons_scores`, when the circuit has them."""
    for key, table in (("neurons", circuit.neurons), ("neurons_scores", circuit.neuron_scores)):
        if table is None:
            continue
        values = table.float().tolist()
        for name, row in zip(circuit.graph.senders, values):
            nodes[name][key] = row


def _neurons_from_mib_nodes(nodes: Any, graph: Graph, source: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(neurons_in_graph [S, d] bool, neurons_scores [S, d]) from MIB JSON nodes, None where absent."""
    if not isinstance(nodes, dict):
        return None, None
    out = []
    d = graph.arch.d_model
    for key in ("neurons", "neurons_scores"):
        present = [n for n in graph.senders if isinstance(nodes.get(n), dict) and key in nodes[n]]
        if not present:
            out.append(None)
            continue
        if len(present) != graph.n_senders:
            missing = next(n for n in graph.senders if n not in present)
            raise CircuitFileError(f"{source}: node {missing} has no {key!r}, but other nodes do")
        rows = [nodes[n][key] for n in graph.senders]
        if any(not isinstance(r, list) or len(r) != d for r in rows):
            raise CircuitFileError(f"{source}: every node's {key!r} should list {d} values (d_model)")
        try:
            out.append(torch.tensor(rows, dtype=torch.float32))
        except (TypeError, ValueError):
            raise CircuitFileError(f"{source}: {key!r} should hold numbers") from None
    neurons, scores = out
    return (None if neurons is None else neurons.bool()), scores


def _check_cfg(cfg: Any, graph: Graph, source: str) -> None:
    if not isinstance(cfg, dict):
        raise CircuitFileError(f"{source}: MIB cfg should be an object with n_layers, n_heads, …; got {cfg!r:.60}")
    mine = mib_cfg(graph)
    for key in ("n_layers", "n_heads", "parallel_attn_mlp"):
        if key in cfg and cfg[key] != mine[key]:
            raise CircuitFileError(f"{source}: MIB cfg has {key}={cfg[key]}, this model has {mine[key]}")


def from_mib(data: Any, graph: Graph, source: str = "MIB circuit") -> Circuit:
    _check_mib_expressible(graph)
    if not isinstance(data, dict):
        raise CircuitFileError(f"{source}: not an MIB circuit (a JSON {type(data).__name__}); expected {MIB_EXPECTED}")
    for key in ("cfg", "edges"):
        if key not in data:
            raise CircuitFileError(f"{source}: not an MIB circuit (missing {key!r}); expected {MIB_EXPECTED}")
    if not isinstance(data["edges"], dict):
        raise CircuitFileError(f"{source}: MIB 'edges' should map edge names to {{score, in_graph}}")
    _check_cfg(data["cfg"], graph, source)
    mask, scores = edges_from_dict(_group_mib_edges(data["edges"], graph, source), graph, source)
    neurons, neuron_scores = _neurons_from_mib_nodes(data.get("nodes"), graph, source)
    return Circuit(graph, mask, scores, {"imported_from": source, "format": "mib"},
                   neurons=neurons, neuron_scores=neuron_scores)


def save_mib_json(circuit: Circuit, path: str | Path) -> list[str]:
    """Atomic; non-finite scores are written as null (returned: the fields that were)."""
    replaced: list[str] = []
    write_text(path, json.dumps(json_safe(to_mib(circuit), replaced=replaced), allow_nan=False))
    return replaced


def save_mib_pt(circuit: Circuit, path: str | Path) -> None:
    """Dense tensors and plain containers only: loadable with torch.load(weights_only=True)."""
    g = circuit.graph
    _check_mib_expressible(g)
    _check_plain(circuit)
    scores = circuit.scores if circuit.scores is not None else torch.zeros(g.n_senders, g.n_receivers)
    nodes = g.node_mask(circuit.mask)[: g.n_senders]
    names, cols = mib_receivers(g)
    data = {"cfg": mib_cfg(g), "src_nodes": list(g.senders), "dst_nodes": names,
            "edges_scores": (scores.float() * g.allowed)[:, cols].contiguous(),
            "edges_in_graph": (circuit.mask & g.allowed)[:, cols].contiguous(),
            "nodes_in_graph": nodes.contiguous()}
    if circuit.neurons is not None:
        data["neurons_in_graph"] = circuit.neurons.bool().contiguous()
    if circuit.neuron_scores is not None:
        data["neurons_scores"] = circuit.neuron_scores.float().contiguous()
    with atomic_open(path, "wb") as f:
        torch.save(data, f)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"{path}: no such file")
    return path


def _first_line(err: Exception) -> str:
    """Parsers' messages can run to many lines; the CLI prints one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive; its legacy format is a raw pickle (PROTO opcode 0x80).
    Judged by content, not name: MIB files come named .pt, .pth, .mib-pt or anything else."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _read_json(path: Path, expected: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CircuitFileError(f"{path}: binary content, not JSON; expected {expected}") from None
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); "
                               f"expected {expected}") from None


def _load_mib_pt(path: Path, graph: Graph) -> Circuit:
    try:
        d = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise CircuitFileError(f"{path}: not a readable torch file ({_first_line(err)}); "
                               f"expected {MIB_EXPECTED}") from None
    if not isinstance(d, dict):
        raise CircuitFileError(f"{path}: a torch file holding a {type(d).__name__}, not an MIB circuit dict")
    missing = {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph"} - set(d)
    if missing:
        raise CircuitFileError(f"{path}: MIB .pt file lacks {', '.join(sorted(missing))}")
    _check_mib_expressible(graph)
    _check_cfg(d["cfg"], graph, str(path))
    names, cols = mib_receivers(graph)
    if list(d["src_nodes"]) != list(graph.senders) or list(d["dst_nodes"]) != names:
        raise CircuitFileError(f"{path}: node order differs from this model's graph")
    shape = (graph.n_senders, len(names))
    for key in ("edges_scores", "edges_in_graph"):
        if not isinstance(d[key], torch.Tensor) or d[key].shape != shape:
            raise CircuitFileError(f"{path}: {key} should be a tensor of shape {shape}")
    # per-head columns back onto this graph's (KV-group) columns: any in the circuit, mean score
    count = torch.zeros(graph.n_receivers, dtype=torch.float64).index_add_(0, cols, torch.ones(len(cols), dtype=torch.float64))
    hits = torch.zeros(graph.allowed.shape, dtype=torch.float64).index_add_(1, cols, d["edges_in_graph"].double())
    total = torch.zeros(graph.allowed.shape, dtype=torch.float64).index_add_(1, cols, d["edges_scores"].double())
    mask = (hits > 0) & graph.allowed
    neuron_shape = (graph.n_senders, graph.arch.d_model)
    for key in ("neurons_in_graph", "neurons_scores"):
        if d.get(key) is not None and (not isinstance(d[key], torch.Tensor) or tuple(d[key].shape) != neuron_shape):
            raise CircuitFileError(f"{path}: {key} should be a tensor of shape {neuron_shape} (senders × d_model)")
    neurons = None if d.get("neurons_in_graph") is None else d["neurons_in_graph"].bool()
    neuron_scores = None if d.get("neurons_scores") is None else d["neurons_scores"].float()
    return Circuit(graph, mask, (total / count).float(), {"imported_from": str(path), "format": "mib-pt"},
                   neurons=neurons, neuron_scores=neuron_scores)


def load_mib(path: str | Path, graph: Graph) -> Circuit:
    """An MIB circuit file, torch .pt or JSON, told apart by content whatever its name."""
    path = _existing(path)
    if _is_torch_file(path):
        return _load_mib_pt(path, graph)
    return from_mib(_read_json(path, MIB_EXPECTED), graph, str(path))


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


def _check_shape(G: nx.Graph, graph: Graph, source: str) -> None:
    """The layer/head counts a circuits export records must match the model's."""
    a = graph.arch
    for key, mine in (("n_layers", a.n_layers), ("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads)):
        theirs = G.graph.get(key)
        if theirs is not None and int(theirs) != mine:
            raise CircuitFileError(f"{source}: made for a model with {key}={theirs}, this model has {mine}")


def _score(value: Any, name: str, source: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CircuitFileError(f"{source}: edge {name!r} has score {value!r}, not a number") from None
    if not math.isfinite(number):
        raise CircuitFileError(f"{source}: edge {name!r} has score {value!r}, not a finite number")
    return number


_TRUTH = {True: True, False: False, "true": True, "false": False, "True": True, "False": False}


def _in_graph(value: Any, name: str, source: str) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, (bool, str)) and value in _TRUTH:
        return _TRUTH[value]
    raise CircuitFileError(f"{source}: edge {name!r} has in_graph {value!r:.20}, not true or false")


def from_networkx(G: nx.Graph, graph: Graph, source: str = "networkx graph") -> Circuit:
    _check_shape(G, graph, source)
    mask = graph.empty_mask()
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    has_scores = found = False
    for u, v, attrs in G.edges(data=True):
        for key, value in attrs.items():
            if not key.startswith("in_graph_"):
                continue
            found = True
            ch = key[len("in_graph_"):]
            name = f"{u}->{v}" if ch == "in" else f"{u}->{v}<{ch}>"
            try:
                s, r = graph.edge(name)
            except KeyError as err:
                raise CircuitFileError(f"{source}: {err.args[0]}") from None
            mask[s, r] = _in_graph(value, name, source)
            if f"score_{ch}" in attrs:
                scores[s, r] = _score(attrs[f"score_{ch}"], name, source)
                has_scores = True
    # Any other graph parses too, as an empty circuit; a circuit graph marks every edge it lists.
    if G.number_of_edges() and not found:
        raise CircuitFileError(f"{source}: a graph whose edges carry no in_graph_<channel> attributes, "
                               f"not a circuit (as `circuits export` writes it)")
    return Circuit(graph, mask, scores if has_scores else None, _provenance(G, source))


def _provenance(G: nx.Graph, source: str) -> dict:
    prov = G.graph.get("provenance")
    try:
        return json.loads(prov) if prov else {}
    except (TypeError, json.JSONDecodeError):
        raise CircuitFileError(f"{source}: the graph's provenance attribute is not JSON") from None


def save_graphml(circuit: Circuit, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        nx.write_graphml(to_networkx(circuit), f)


def load_graphml(path: str | Path, graph: Graph) -> Circuit:
    path = _existing(path)
    try:
        G = nx.read_graphml(path)
    except Exception as err:  # XML ParseError, NetworkXError, and KeyError/ValueError on odd attributes
        raise CircuitFileError(f"{path}: not GraphML ({_first_line(err)}); expected {GRAPHML_EXPECTED}") from None
    return from_networkx(G, graph, str(path))


def save_node_link(circuit: Circuit, path: str | Path) -> list[str]:
    replaced: list[str] = []
    data = json_safe(nx.node_link_data(to_networkx(circuit), edges="links"), replaced=replaced)
    write_text(path, json.dumps(data, allow_nan=False))
    return replaced


def load_node_link(path: str | Path, graph: Graph) -> Circuit:
    path = _existing(path)
    data = _read_json(path, NODE_LINK_EXPECTED)
    if not (isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)):
        raise CircuitFileError(f"{path}: not node-link data (no 'nodes' and 'links' lists); "
                               f"expected {NODE_LINK_EXPECTED}")
    try:
        G = nx.node_link_graph(data, edges="links")
    except (KeyError, TypeError, AttributeError, nx.NetworkXError) as err:  # a node or link lacks id/source/target
        raise CircuitFileError(f"{path}: malformed node-link data ({type(err).__name__} {_first_line(err)}); "
                               f"expected {NODE_LINK_EXPECTED}") from None
    return from_networkx(G, graph, str(path))
