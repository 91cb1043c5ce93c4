"""The protocol every scoring method follows (its record lives in `registry`).

A scoring method maps a prepared `Setup` (model, task, ablation, caches) to one importance per
edge, a [S, R] float32 tensor on the graph's index. Sign convention, for every method:

    importance = m(clean) − m(edge ablated)        for task metrics (higher is better), and
    importance = m(edge ablated) − m(clean)        for divergences (KL, MSE),

so higher = more important, as the MIB circuit track reads scores; a negative importance means
the edge works against the behaviour. Attribution methods estimate the patching effect to first
order; `exact` measures it. Selection usually ranks by |importance|.
"""

from __future__ import annotations

from typing import Protocol

import torch

from circuits.evaluation import Setup


class ScoreFn(Protocol):
    """Every method takes `progress` (show a bar) and its own keyword parameters."""

    def __call__(self, setup: Setup, progress: bool = False, **params) -> torch.Tensor: ...


def importance_sign(setup: Setup) -> float:
    """Multiply m(edge ablated) − m(clean) by this to get an importance."""
    return -1.0 if setup.task.metric.higher_is_better else 1.0
