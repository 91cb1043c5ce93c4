"""Ensembles: several methods' edge scores combined into one ranking.

Each member's scores are first put on a common scale, then averaged over members:

- "rank": sign(score) · rank(|score|) / n_edges (ties share their mean rank), so a member's
  order is kept both by signed score and by |score|;
- "score": score / max |score| (the member's scores normalised to [−1, 1]);
- "magnitude": rank(|score|) / n_edges, the sign dropped.

"rank" and "score" are monotone in the signed score and in |score|, so an ensemble of one method
ranks the edges exactly as that method does (tested), under both of MIB's rankings; "magnitude"
keeps the order by |score| only. Use it to mix signed attributions with unsigned scores (learned
masks): averaging a signed rank with an unsigned one cancels exactly the edges that work
against the behaviour, which are as much part of the mechanism as the others.
"""

from __future__ import annotations

import torch

from circuits.evaluation import Setup
from circuits.graph import Graph

COMBINE = ("rank", "score", "magnitude")
DEFAULT_MEMBERS = "eap-ig-inputs,eap-gim,edge-pruning"


def member_names(members) -> list[str]:
    """'a,b' or ['a', 'b'] → checked list of registered method names (no ensembles inside)."""
    from circuits.methods.registry import get
    names = [m.strip() for m in members.split(",")] if isinstance(members, str) else list(members)
    names = [n for n in names if n]
    if not names:
        raise ValueError("an ensemble needs at least one member method")
    for n in names:
        get(n)                                    # unknown names: one line listing the choices
        if n == "ensemble":
            raise ValueError("an ensemble cannot be a member of an ensemble")
    return names


def _signed_rank(values: torch.Tensor) -> torch.Tensor:
    """sign(v) · (mean rank of |v| among all values, 1..n) / n, for a 1-D tensor."""
    mag = values.abs()
    ordered = torch.sort(mag).values
    lo = torch.searchsorted(ordered, mag, right=False).float()
    hi = torch.searchsorted(ordered, mag, right=True).float()
    return torch.sign(values) * (lo + 1 + hi) / 2 / len(values)


def normalise(graph: Graph, scores: torch.Tensor, combine: str) -> torch.Tensor:
    """One member's [S, R] ([P, S, R] at position grain) scores on the common scale of `combine`
    (0 off the graph's edges)."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    allowed = graph.allowed.expand(scores.shape)
    values = scores.float()[allowed]
    if combine == "rank":
        scaled = _signed_rank(values)
    elif combine == "magnitude":
        scaled = _signed_rank(values.abs())
    else:
        top = values.abs().max()
        scaled = values / top if top > 0 else torch.zeros_like(values)
    out = torch.zeros(scores.shape, dtype=torch.float32)
    out[allowed] = scaled.cpu()
    return out


def combine_scores(graph: Graph, member_scores: list[torch.Tensor], combine: str = "magnitude") -> torch.Tensor:
    """The mean of the members' normalised scores, [S, R] float32 (higher = more important)."""
    if not member_scores:
        raise ValueError("an ensemble needs at least one member's scores")
    return torch.stack([normalise(graph, s, combine) for s in member_scores]).mean(0)


def ensemble(setup: Setup, members=DEFAULT_MEMBERS, combine: str = "magnitude",
             progress: bool = False) -> torch.Tensor:
    """Score with every member (its registered defaults) and combine. Cost: the members' sum."""
    from circuits.methods.registry import get
    names = member_names(members)
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    scores = []
    for name in names:
        spec = get(name)
        scores.append(spec.score(setup, progress=progress, **spec.defaults))
    return combine_scores(setup.graph, scores, combine)
