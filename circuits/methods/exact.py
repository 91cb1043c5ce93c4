"""Exact edge scores: the true patching effect of ablating each edge alone.

Edges into one layer's receivers share everything before that layer, so each batch of variants
starts its forward at the receivers' layer from the cached clean state (`patching.Prefix`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from circuits.evaluation import Setup


def edges_by_start_layer(setup: Setup) -> dict[int, list[tuple[int, ...]]]:
    """Edges as (s, r), or (p, s, r) at position grain, by their receiver's layer."""
    g = setup.graph
    groups: dict[int, list[tuple[int, ...]]] = {}
    allowed = setup.full_mask()
    for edge in torch.nonzero(allowed).tolist():
        groups.setdefault(g.receivers[edge[-1]].layer, []).append(tuple(edge))
    return groups


def exact_effects(setup: Setup, *, variants: int = 16, progress: bool = False) -> torch.Tensor:
    """m(edge ablated) − m(clean) for every edge (mean over examples), [S, R] float32
    ([P, S, R] at position grain: the edge ablated at that position only)."""
    g = setup.graph
    out = torch.zeros(setup.full_mask().shape)
    clean = setup.clean_metric().mean()
    bar = tqdm(total=setup.n_edges, desc="exact", unit="edge", disable=not progress)
    for layer, edges in sorted(edges_by_start_layer(setup).items()):
        start = min(layer, g.arch.n_layers)
        for i in range(0, len(edges), variants):
            batch = edges[i : i + variants]
            coef = torch.zeros(len(batch), *out.shape)
            for v, edge in enumerate(batch):
                coef[(v, *edge)] = 1.0
            values = setup.metric_of_coef(coef, start_layer=start).mean(1)
            for v, edge in enumerate(batch):
                out[edge] = values[v] - clean
            bar.update(len(batch))
    bar.close()
    return out
