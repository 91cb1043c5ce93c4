"""Exact edge scores: the true patching effect of ablating each edge alone.

Edges into one layer's receivers share everything before that layer, so each batch of variants
starts its forward at the receivers' layer from the cached clean state (`patching.Prefix`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from circuits.evaluation import Setup


def edges_by_start_layer(setup: Setup) -> dict[int, list[tuple[int, int]]]:
    g = setup.graph
    groups: dict[int, list[tuple[int, int]]] = {}
    rows, cols = torch.nonzero(g.allowed, as_tuple=True)
    for s, r in zip(rows.tolist(), cols.tolist()):
        groups.setdefault(g.receivers[r].layer, []).append((s, r))
    return groups


def exact_effects(setup: Setup, *, variants: int = 16, progress: bool = False) -> torch.Tensor:
    """m(edge ablated) − m(clean) for every edge (mean over examples), [S, R] float32."""
    g = setup.graph
    out = torch.zeros(g.n_senders, g.n_receivers)
    clean = setup.clean_metric().mean()
    bar = tqdm(total=g.n_edges, desc="exact", unit="edge", disable=not progress)
    for layer, edges in sorted(edges_by_start_layer(setup).items()):
        start = min(layer, g.arch.n_layers)
        for i in range(0, len(edges), variants):
            batch = edges[i : i + variants]
            coef = torch.zeros(len(batch), g.n_senders, g.n_receivers)
            for v, (s, r) in enumerate(batch):
                coef[v, s, r] = 1.0
            values = setup.metric_of_coef(coef, start_layer=start).mean(1)
            for v, (s, r) in enumerate(batch):
                out[s, r] = values[v] - clean
            bar.update(len(batch))
    bar.close()
    return out
