"""Token positions as a grain of the graph: every edge once per position.

A position-aware edge `s@p->r@p` is sender s's output at position p feeding receiver r's input at
the same position (attention moves information across positions inside the receiving head). Masks,
scores and coefficients gain a leading position dimension: [P, S, R], dense.

Positions are numbered (`0 … T−1`, one per token; rows must have one length) or named by the task:
each row maps labels to token indices (e.g. IO, S1, S2, END), so rows of different lengths align
by label. A label names the last token of its span: token t belongs to the first label (in index
order) whose index is ≥ t; tokens after the last label belong to it too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from circuits.errors import CircuitsError
from circuits.graph import Graph


class PositionError(CircuitsError, ValueError):
    """Position labels or lengths that do not define one position per token."""


@dataclass(frozen=True, eq=False)
class TokenGroups:
    """The tokens of a batch grouped by position, laid out for one matmul per position.

    group: [B, T] long in [0, n); order: [B·T] flat token indices sorted by position (stable);
    inverse: its inverse permutation; bounds: n + 1 offsets of each position's tokens in `order`.
    """

    group: torch.Tensor
    n: int
    order: torch.Tensor
    inverse: torch.Tensor
    bounds: tuple[int, ...]

    @staticmethod
    def of(group: torch.Tensor, n: int) -> TokenGroups:
        flat = group.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        counts = torch.bincount(flat, minlength=n).tolist()
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        return TokenGroups(group, n, order, inverse, tuple(bounds))

    def spans(self):
        """(position, start, stop) into `order` for each position with tokens."""
        return [(p, lo, hi) for p, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])) if hi > lo]

    def to(self, device) -> TokenGroups:
        return TokenGroups(self.group.to(device), self.n, self.order.to(device), self.inverse.to(device),
                           self.bounds)


@dataclass(frozen=True, eq=False)
class Positions:
    """The positions of a task: names [P] and the position of every token, group [B, T] long."""

    names: tuple[str, ...]
    group: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.names)

    def rows(self, rows: slice, width: int) -> TokenGroups:
        return TokenGroups.of(self.group[rows, :width], self.n)


def numbered(n: int) -> tuple[str, ...]:
    return tuple(str(p) for p in range(n))


def of_task(task, n: int | None = None) -> Positions:
    """The task's positions: its labels, else one per token (rows of equal length).

    n: the number of positions asked for (`--positions N`), checked against the task.
    """
    names = tuple(getattr(task, "position_names", ()) or ())
    B, T = task.clean.shape
    if names:
        index = task.position_index                                             # [B, K]
        if n is not None and n != len(names):
            raise PositionError(f"task {task.name} names {len(names)} positions ({', '.join(names)}), "
                                f"not {n}")
        t = torch.arange(T).expand(B, T).contiguous()
        group = torch.searchsorted(index.contiguous(), t, side="left").clamp(max=len(names) - 1)
        return Positions(names, group)
    lengths = task.lengths
    if bool((lengths != lengths[0]).any()):
        raise PositionError(f"task {task.name} has prompts of {int(lengths.min())} to {int(lengths.max())} "
                            f"tokens and no position labels: give every row `positions` "
                            f"{{label: token index}} or use prompts of one length")
    if n is not None and n != T:
        raise PositionError(f"--positions {n}, but task {task.name}'s prompts have {T} tokens "
                            f"(one position per token)")
    return Positions(numbered(T), torch.arange(T).expand(B, T).clone())


def check_labels(labels: list[dict], lengths: list[int], where: list[str]) -> tuple[tuple[str, ...], torch.Tensor]:
    """Per-row {label: token index} maps → (names in index order, index [B, K] long).

    Every row must name the same labels, each at a token of its prompt, in the same order.
    """
    first = next((i for i, lab in enumerate(labels) if lab), None)
    if first is None:
        return (), torch.zeros(len(labels), 0, dtype=torch.long)
    ref = labels[first]
    names = tuple(sorted(ref, key=lambda k: ref[k]))
    rows = []
    for lab, length, loc in zip(labels, lengths, where):
        if not lab:
            raise PositionError(f"{loc}: no position labels, but {where[first]} has "
                                f"{', '.join(names)}; label every row or none")
        if set(lab) != set(names):
            missing = sorted(set(names) - set(lab))
            extra = sorted(set(lab) - set(names))
            what = (f"lacks {', '.join(missing)}" if missing else "") + \
                   ("; " if missing and extra else "") + (f"has extra {', '.join(extra)}" if extra else "")
            raise PositionError(f"{loc}: position labels differ from {where[first]}'s: {what}")
        for name in names:
            idx = lab[name]
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise PositionError(f"{loc}: position {name!r} should be a token index, got {idx!r}")
            if not 0 <= idx < length:
                raise PositionError(f"{loc}: position {name!r} is token {idx}, past the prompt's "
                                    f"{length} tokens (indices 0..{length - 1})")
        row = [lab[name] for name in names]
        if any(a >= b for a, b in itertools.pairwise(row)):
            order = sorted(lab, key=lambda k: lab[k])
            raise PositionError(f"{loc}: position labels in token order {', '.join(order)}, but "
                                f"{where[first]} has {', '.join(names)}; every row needs the same order "
                                f"at distinct tokens")
        rows.append(row)
    return names, torch.tensor(rows, dtype=torch.long)


# ---- naming and views ------------------------------------------------------------------------

def edge_name(graph: Graph, names: tuple[str, ...], p: int, s: int, r: int) -> str:
    return f"{graph.senders[s]}@{names[p]}->{graph.receivers[r].name}@{names[p]}"


def edge(graph: Graph, names: tuple[str, ...], name: str) -> tuple[int, int, int]:
    """(position, row, column) of a name such as `a0.h1@END->logits@END`."""
    try:
        left, right = name.split("->")
        (sender, ps), (receiver, pr) = left.rsplit("@", 1), right.rsplit("@", 1)
    except ValueError:
        raise KeyError(f"no position-aware edge named {name!r} (expected sender@POS->receiver@POS)") from None
    if ps != pr:
        raise KeyError(f"{name!r}: an edge joins one position to itself, not {ps} to {pr}")
    if ps not in names:
        raise KeyError(f"{name!r}: no position {ps!r} (positions: {', '.join(names)})")
    s, r = graph.edge(f"{sender}->{receiver}")
    return names.index(ps), s, r


def edge_names(graph: Graph, names: tuple[str, ...], mask: torch.Tensor) -> list[str]:
    """Names of the edges set in a [P, S, R] mask, position-major."""
    ps, rows, cols = torch.nonzero(mask & graph.allowed, as_tuple=True)
    return [edge_name(graph, names, int(p), int(s), int(r)) for p, s, r in zip(ps, rows, cols)]


def mask_from_edges(graph: Graph, names: tuple[str, ...], edges) -> torch.Tensor:
    mask = torch.zeros(len(names), graph.n_senders, graph.n_receivers, dtype=torch.bool)
    for name in edges:
        mask[edge(graph, names, name)] = True
    return mask


def full_mask(graph: Graph, n: int) -> torch.Tensor:
    return graph.allowed.expand(n, -1, -1).clone()


def empty_mask(graph: Graph, n: int) -> torch.Tensor:
    return torch.zeros(n, graph.n_senders, graph.n_receivers, dtype=torch.bool)


def n_edges(graph: Graph, n: int) -> int:
    return n * graph.n_edges


def counts(graph: Graph, names: tuple[str, ...]) -> dict:
    """`Graph.counts` at position grain: every edge once per position."""
    out = graph.counts()
    P = len(names)
    out["positions"] = {"count": P, "names": list(names)}
    out["edges"] = {"total": P * graph.n_edges, "per_position": graph.n_edges,
                    "by_receiver": {k: P * v for k, v in out["edges"]["by_receiver"].items()}}
    return out


def summed(x: torch.Tensor) -> torch.Tensor:
    """The plain (position-summed) view of [P, S, R] scores; for masks: edges at any position."""
    return x.any(0) if x.dtype == torch.bool else x.sum(0)


def node_mask_by_position(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """[P, n_nodes] bool: the nodes each position's edges touch."""
    return torch.stack([graph.node_mask(m) for m in mask])


def names_from_spec(spec: str) -> tuple[str, ...]:
    """`--positions` for a graph without a task: a count (`16`) or comma-separated labels."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise PositionError("--positions needs at least 1 position")
        return numbered(int(spec))
    names = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not names or len(set(names)) != len(names):
        raise PositionError(f"--positions {spec!r}: give a count or distinct comma-separated labels")
    return names
