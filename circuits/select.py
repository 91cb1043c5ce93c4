"""Selection and pruning: pure functions from scores or masks to new [S, R] bool masks.

None of them modifies its inputs; every result is restricted to the graph's edges. top_n,
threshold and prune also take position-aware [P, S, R] scores and masks.
"""

from __future__ import annotations

import torch

from circuits.graph import Graph


def _rank_values(graph: Graph, scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    values = scores.abs() if absolute else scores
    return torch.where(graph.allowed, values.float(), torch.tensor(float("-inf")))


def threshold(graph: Graph, scores: torch.Tensor, tau: float, absolute: bool = True) -> torch.Tensor:
    """Edges whose (|)score(|) is at least tau."""
    return (_rank_values(graph, scores, absolute) >= tau) & graph.allowed


def top_n(graph: Graph, scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """The n edges with the highest (|)score(|); ties broken by edge order, deterministically."""
    if n < 0:
        raise ValueError("n must be non-negative")
    values = _rank_values(graph, scores, absolute).flatten()
    n = min(n, graph.n_edges * (scores.numel() // graph.allowed.numel()))
    order = torch.sort(values, descending=True, stable=True).indices[:n]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(scores) & graph.allowed


def _node_of_receivers(graph: Graph) -> list[list[int]]:
    return [graph.receiver_nodes(r) for r in range(graph.n_receivers)]


def greedy(graph: Graph, scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """Grow a circuit from the logits: repeatedly add the best edge into a node already in it.

    A sender joins the circuit when one of its outgoing edges is added; its receivers then become
    candidates. Stops at n edges or when nothing connected is left.
    """
    if scores.dim() != 2:
        raise ValueError("greedy selection grows a plain [S, R] circuit; use --top-n or --threshold "
                         "at position grain")
    values = _rank_values(graph, scores, absolute)
    recv_nodes = _node_of_receivers(graph)
    in_circuit = torch.zeros(len(graph.nodes), dtype=torch.bool)
    in_circuit[-1] = True                                      # the logits
    mask = torch.zeros_like(graph.allowed)
    frontier = torch.tensor([any(in_circuit[x] for x in nodes) for nodes in recv_nodes])
    for _ in range(min(n, graph.n_edges)):
        candidates = torch.where(frontier[None, :] & ~mask, values, torch.tensor(float("-inf")))
        best = int(torch.argmax(candidates))
        if candidates.flatten()[best] == float("-inf"):
            break
        s, r = divmod(best, graph.n_receivers)
        mask[s, r] = True
        if not in_circuit[s]:
            in_circuit[s] = True
            frontier |= torch.tensor([s in nodes for nodes in recv_nodes])
    return mask


def prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges off every input→logits path, to a fixed point.

    A sender is live from the input if it is the input or any receiver of its node has an edge
    from a live sender; a node reaches the logits if it sends an edge into a receiver whose node
    reaches the logits. Kept: edges from live senders into receivers whose nodes reach the logits.
    A [P, S, R] mask keeps the position-edges whose edge survives pruning the edges kept at any
    position (attention joins positions, so a path may change position at any head).
    """
    if mask.dim() == 3:
        return mask.bool() & graph.allowed & prune(graph, mask.bool().any(0))[None]
    mask = mask.bool() & graph.allowed
    recv_nodes = _node_of_receivers(graph)
    S = graph.n_senders
    live = torch.zeros(S, dtype=torch.bool)
    live[0] = True
    receivers_of_node: dict[int, list[int]] = {}
    for r, nodes in enumerate(recv_nodes):
        for node in nodes:
            receivers_of_node.setdefault(node, []).append(r)
    for s in range(1, S):                                     # senders are topologically ordered
        live[s] = any(bool((mask[:, r] & live).any()) for r in receivers_of_node.get(s, []))
    reaches = torch.zeros(len(graph.nodes), dtype=torch.bool)
    reaches[-1] = True
    recv_reaches = torch.zeros(graph.n_receivers, dtype=torch.bool)
    recv_reaches[graph.logits_col] = True
    for s in reversed(range(S)):
        reaches[s] = bool((mask[s] & recv_reaches).any())
        if reaches[s]:
            recv_reaches[receivers_of_node.get(s, [])] = True
    return mask & live[:, None] & recv_reaches[None, :]
