"""One protocol for every scoring method, and a registry of frozen records.

A scoring method maps a prepared `Setup` (model, task, ablation, caches) to one importance per
edge, a [S, R] float32 tensor on the graph's index. Sign convention, for every method:

    importance = m(clean) − m(edge ablated)        for task metrics (higher is better), and
    importance = m(edge ablated) − m(clean)        for divergences (KL, MSE),

so higher = more important, as the MIB circuit track reads scores; a negative importance means
the edge works against the behaviour. Attribution methods estimate the patching effect to first
order; `exact` measures it. Selection usually ranks by |importance|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from circuits.evaluation import Setup
from circuits.graph import Graph


class ScoreFn(Protocol):
    """Every method takes `progress` (show a bar) and its own keyword parameters."""

    def __call__(self, setup: Setup, progress: bool = False, **params) -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    score: ScoreFn
    defaults: dict = field(default_factory=dict)
    exact: bool = False


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def importance_sign(setup: Setup) -> float:
    """Multiply m(edge ablated) − m(clean) by this to get an importance."""
    return -1.0 if setup.task.metric.higher_is_better else 1.0


def node_scores(g: Graph, edge_scores: torch.Tensor) -> torch.Tensor:
    """Node-level view of edge scores: each node's summed |importance| of outgoing edges.

    [n_nodes]; the logits node gets the sum over its incoming edges.
    """
    mag = edge_scores.abs() * g.allowed
    out = torch.zeros(len(g.nodes))
    out[: g.n_senders] = mag.sum(1)
    out[-1] = mag[:, g.logits_col].sum()
    return out
