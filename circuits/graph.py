"""The computational graph: senders, receivers, edges, as index tables over dense tensors.

Senders (rows): `input`, every head `a{L}.h{H}`, every MLP `m{L}`, in topological order.
Receivers (columns): per layer the q inputs of each head, the k and v inputs of each head (of each
KV head under grouped-query attention: `a{L}.kv{G}<k>`), the MLP input; finally `logits`.
An edge `sender->receiver` exists when the sender runs before the receiver reads the stream
(names follow the MIB/EAP-IG convention, e.g. `input->a0.h0<q>`, `a0.h1->m0`). Because senders
are topologically ordered, every receiver reads a prefix of the senders: `n_inputs[r]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import torch

from circuits.model.adapters import Arch


class Channel(Enum):
    Q = "q"
    K = "k"
    V = "v"
    MLP = "mlp"
    LOGITS = "logits"


@dataclass(frozen=True)
class Receiver:
    name: str
    layer: int          # n_layers for logits
    channel: Channel
    index: int          # head (q), KV head (k/v), else 0
    node: str           # the node it belongs to (for k/v under GQA: the first head of the group)


@dataclass(frozen=True, eq=False)
class Graph:
    """Index tables of a model's graph; computed once per architecture."""

    arch: Arch
    senders: tuple[str, ...]
    receivers: tuple[Receiver, ...]
    n_inputs: torch.Tensor                      # [R] long: receiver r reads senders [0, n_inputs[r])
    attn_cols: tuple[tuple[int, int], ...]      # per layer: [start, stop) of its q/k/v columns
    mlp_col: tuple[int, ...]                    # per layer (-1 when attention-only)
    sender_start: tuple[int, ...]               # per layer: first sender of that layer
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @property
    def logits_col(self) -> int:
        return self.n_receivers - 1

    @cached_property
    def allowed(self) -> torch.Tensor:
        """[S, R] bool: which sender→receiver pairs are edges."""
        return torch.arange(self.n_senders)[:, None] < self.n_inputs[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.n_inputs.sum())

    @cached_property
    def sender_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.senders)}

    @cached_property
    def receiver_index(self) -> dict[str, int]:
        return {r.name: i for i, r in enumerate(self.receivers)}

    @cached_property
    def sender_layer(self) -> torch.Tensor:
        """[S] layer of each sender (-1 for the input)."""
        out = torch.full((self.n_senders,), -1, dtype=torch.long)
        for layer, start in enumerate(self.sender_start):
            out[start:] = layer
        return out

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r].name}"

    def edge(self, name: str) -> tuple[int, int]:
        """(row, column) of an edge name such as `a0.h1->a2.h3<q>`."""
        try:
            sender, receiver = name.split("->")
            s, r = self.sender_index[sender], self.receiver_index[receiver]
        except (ValueError, KeyError):
            raise KeyError(f"no edge named {name!r} in this graph") from None
        if s >= int(self.n_inputs[r]):
            raise KeyError(f"{name!r} is not an edge: {sender} does not run before {receiver}")
        return s, r

    def edge_names(self, mask: torch.Tensor) -> list[str]:
        """Names of the edges set in a [S, R] mask, in row-major order."""
        rows, cols = torch.nonzero(mask & self.allowed, as_tuple=True)
        return [self.edge_name(int(s), int(r)) for s, r in zip(rows, cols)]

    def full_mask(self) -> torch.Tensor:
        return self.allowed.clone()

    def empty_mask(self) -> torch.Tensor:
        return torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)

    def mask_from_edges(self, names) -> torch.Tensor:
        mask = self.empty_mask()
        for name in names:
            mask[self.edge(name)] = True
        return mask

    # ---- node-level view -------------------------------------------------------------------

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """Heads and MLPs as units, plus input and logits."""
        return self.senders + ("logits",)

    @cached_property
    def receiver_node(self) -> torch.Tensor:
        """[R] index into `nodes` of the node each receiver belongs to."""
        idx = {n: i for i, n in enumerate(self.nodes)}
        return torch.tensor([idx[r.node] for r in self.receivers], dtype=torch.long)

    def receiver_nodes(self, r: int) -> list[int]:
        """Node indices a receiver feeds (every head of a KV group for k/v under GQA)."""
        rec = self.receivers[r]
        if rec.channel in (Channel.K, Channel.V) and self.arch.grouped:
            per = self.arch.n_heads // self.arch.n_kv_heads
            first = self.sender_index[f"a{rec.layer}.h{rec.index * per}"]
            return list(range(first, first + per))
        return [int(self.receiver_node[r])]

    def node_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[n_nodes] bool: nodes that touch at least one edge of the mask."""
        mask = mask & self.allowed
        out = torch.zeros(len(self.nodes), dtype=torch.bool)
        out[: self.n_senders] |= mask.any(1)
        for r in torch.nonzero(mask.any(0)).flatten().tolist():
            out[self.receiver_nodes(r)] = True
        return out

    def edges_of_nodes(self, nodes: torch.Tensor) -> torch.Tensor:
        """[S, R] mask of the edges whose both ends are in a node set ([n_nodes] bool)."""
        recv_ok = torch.tensor([bool(nodes[self.receiver_nodes(r)].all()) for r in range(self.n_receivers)])
        return self.allowed & nodes[: self.n_senders, None] & recv_ok[None, :]

    def counts(self) -> dict:
        """Node and edge counts by kind (for `circuits graph`)."""
        by_kind: dict[str, int] = {}
        n_in = self.n_inputs.tolist()
        for r, rec in enumerate(self.receivers):
            key = {Channel.Q: "->q", Channel.K: "->k", Channel.V: "->v",
                   Channel.MLP: "->mlp", Channel.LOGITS: "->logits"}[rec.channel]
            by_kind[key] = by_kind.get(key, 0) + n_in[r]
        a = self.arch
        return {
            "nodes": {"input": 1, "heads": a.n_layers * a.n_heads,
                      "mlps": a.n_layers if a.has_mlp else 0, "logits": 1,
                      "total": len(self.nodes)},
            "senders": self.n_senders,
            "receivers": {ch.value: sum(r.channel is ch for r in self.receivers) for ch in Channel},
            "edges": {"total": self.n_edges, "by_receiver": by_kind},
        }


def build(arch: Arch) -> Graph:
    """The graph of an architecture: deterministic, computed once per model."""
    H, KV, L = arch.n_heads, arch.n_kv_heads, arch.n_layers
    senders: list[str] = ["input"]
    receivers: list[Receiver] = []
    n_inputs: list[int] = []
    attn_cols, mlp_col, sender_start = [], [], []
    per_group = H // KV
    for layer in range(L):
        start = len(senders)
        sender_start.append(start)
        first = len(receivers)
        for h in range(H):
            receivers.append(Receiver(f"a{layer}.h{h}<q>", layer, Channel.Q, h, f"a{layer}.h{h}"))
        for ch in (Channel.K, Channel.V):
            for g in range(KV):
                name = f"a{layer}.h{g}<{ch.value}>" if KV == H else f"a{layer}.kv{g}<{ch.value}>"
                receivers.append(Receiver(name, layer, ch, g, f"a{layer}.h{g * per_group}"))
        n_inputs += [start] * (H + 2 * KV)
        attn_cols.append((first, len(receivers)))
        senders += [f"a{layer}.h{h}" for h in range(H)]
        if arch.has_mlp:
            mlp_col.append(len(receivers))
            receivers.append(Receiver(f"m{layer}", layer, Channel.MLP, 0, f"m{layer}"))
            n_inputs.append(start if arch.parallel else start + H)
            senders.append(f"m{layer}")
        else:
            mlp_col.append(-1)
    receivers.append(Receiver("logits", L, Channel.LOGITS, 0, "logits"))
    n_inputs.append(len(senders))
    return Graph(arch, tuple(senders), tuple(receivers), torch.tensor(n_inputs, dtype=torch.long),
                 tuple(attn_cols), tuple(mlp_col), tuple(sender_start))


def node_scores(g: Graph, edge_scores: torch.Tensor) -> torch.Tensor:
    """Node-level view of edge scores: each node's summed |importance| of outgoing edges.

    [n_nodes]; the logits node gets the sum over its incoming edges.
    """
    mag = edge_scores.abs() * g.allowed
    out = torch.zeros(len(g.nodes))
    out[: g.n_senders] = mag.sum(1)
    out[-1] = mag[:, g.logits_col].sum()
    return out
