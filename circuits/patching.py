"""The one patching mechanism: a forward pass in which receivers read ablated sender outputs.

For every receiver r the engine feeds

    input_r = stream_r + Σ_s coef[s, r] · (ablated_s − current_s)

where stream_r is what r reads in this very forward, current_s is sender s's output in this
forward and ablated_s its output under the ablation (the corrupted run for resample ablation).
`coef = 1 − mask` for a circuit; fractional or per-variant coefficients serve attribution and
batched search. At position grain (`groups`: the position of every token) the coefficient has a
position dimension, coef[p, s, r], applied to the tokens of position p: one matmul per position.
A neuron mask ([S, d], 1 = kept) ablates the other output dimensions of each sender for every
receiver: the sender's output in this forward (current_s) is then partly ablated already.
Every method (evaluation, ACDC, EAP, EAP-IG, verification) sets `coef` and nothing else. Receivers without any ablated incoming edge read the shared residual stream, so
the full circuit costs one plain forward; patched receivers get their own copy only where needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from circuits.graph import Graph
from circuits.model import components as C
from circuits.model.adapters import Norm, Positional, Weights
from circuits.positions import TokenGroups

PATCH_CACHE_ENTRIES = 64
# a kept-edges evaluation sums the kept senders' terms for up to BLOCK_STAGES layers' receivers at once
# (each stored δ read once per block), holding at most BLOCK_BYTES of sums
BLOCK_STAGES = 8
BLOCK_BYTES = 256 * 2**20


class Ablation(Enum):
    RESAMPLE = "resample"   # the corrupted prompt's sender output
    MEAN = "mean"           # mean over a reference set and its positions
    MEAN_POS = "mean-pos"   # mean over a reference set, per position
    ZERO = "zero"


@dataclass
class Prefix:
    """State of a forward pass at the start of `layer`, shared by every variant of a batch.

    resid: [B, P, d] the residual stream entering the layer; delta: [S_p, B, P, d], ablated minus
    current output of the senders that ran before it (S_p = graph.sender_start[layer]).
    """

    layer: int
    resid: torch.Tensor
    delta: torch.Tensor
    # patches from these senders, keyed by their coefficients: many forwards that start here
    # (ACDC's tests, exact scores) reuse them instead of re-reading every cached sender
    patches: dict = field(default_factory=dict, repr=False)
    # delta with tokens sorted by position ([S_p, B·P, d]), for position-aware coefficients
    by_group: dict = field(default_factory=dict, repr=False)


@dataclass
class Run:
    """What a forward returns. logits: [V·B, vocab] at `positions`, or [V·B, P, vocab]."""

    logits: torch.Tensor
    outputs: torch.Tensor | None = None          # [S, B, P, d] when record=True
    resid: list[torch.Tensor] | None = None      # resid entering each layer, then the final one
    taps: dict = field(default_factory=dict)     # tensors whose gradients give receiver gradients


def _active_columns(coef: torch.Tensor | None, n_receivers: int) -> torch.Tensor:
    if coef is None:
        return torch.zeros(n_receivers, dtype=torch.bool)
    return (coef != 0).reshape(-1, n_receivers).any(0).cpu()


class _Deltas:
    """Ablated-minus-current outputs of the senders so far, laid out for one matmul per layer."""

    def __init__(self, prefix: Prefix | None, n_own: int, V: int, B: int, P: int, d: int,
                 like: torch.Tensor, groups: TokenGroups | None = None, differentiable: bool = False):
        self.n_shared = 0 if prefix is None else prefix.delta.shape[0]
        self.groups = groups
        self.cache = None if prefix is None else prefix.patches
        # Differentiable (learned masks): writing into a preallocated buffer would modify tensors
        # autograd saved, so the deltas are kept as a list and stacked where read.
        self.differentiable = differentiable
        self.parts: list[torch.Tensor] = []
        buffer = n_own and not differentiable
        if groups is None:
            self.shared = None if prefix is None else prefix.delta.reshape(self.n_shared, -1)
            self.own = like.new_empty(V, n_own, B * P * d) if buffer else None
        else:                                     # tokens sorted by position: [.., B·P, d]
            self.shared = None
            if prefix is not None:
                self.shared = prefix.by_group.get("sorted")
                if self.shared is None:
                    self.shared = prefix.by_group["sorted"] = \
                        prefix.delta.reshape(self.n_shared, B * P, d)[:, groups.order]
            self.own = like.new_empty(V, n_own, B * P, d) if buffer else None
        self.V, self.B, self.P, self.d = V, B, P, d

    def put(self, s: int, ablated: torch.Tensor, out: torch.Tensor) -> None:
        V, B, P, d = self.V, self.B, self.P, self.d
        if self.groups is None:
            if self.differentiable:
                self.parts.append((ablated - out.reshape(V, B, P, d)).reshape(V, B * P * d))
                return
            torch.sub(ablated, out.reshape(V, B, P, d), out=self.own[:, s - self.n_shared].view(V, B, P, d))
            return
        diff = (ablated - out.reshape(V, B, P, d)).reshape(V, B * P, d)[:, self.groups.order]
        if self.differentiable:
            self.parts.append(diff)
        else:
            self.own[:, s - self.n_shared] = diff

    def _own(self, lo: int, hi: int) -> torch.Tensor:
        """[V, hi − lo, B·P·d] (with groups [V, hi − lo, B·P, d], tokens sorted) deltas of own
        senders lo..hi (indices counted from n_shared)."""
        if self.differentiable:
            return torch.stack(self.parts[lo:hi], 1)
        return self.own[:, lo:hi]

    def _by_group(self, coef: torch.Tensor, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[v, r, tokens of p] += Σ_s coef[v, p, s, r] · src[(v,) s, tokens of p], tokens sorted.

        coef: [V, G, n, R]; src: [n, B·P, d] (shared by the variants) or [V, n, B·P, d]."""
        V, n, R, d = coef.shape[0], coef.shape[2], coef.shape[3], self.d
        for p, a, b in self.groups.spans():
            c = coef[:, p].transpose(1, 2)                                       # [V, R, n]
            if src.dim() == 3:
                part = (c.reshape(V * R, n) @ src[:, a:b].reshape(n, (b - a) * d)).view(V, R, b - a, d)
            else:
                part = torch.bmm(c, src[:, :, a:b].reshape(V, n, (b - a) * d)).view(V, R, b - a, d)
            out[:, :, a:b] += part
        return out

    def _shared_matmul(self, coef: torch.Tensor, first: int) -> torch.Tensor:
        if self.groups is None:
            return coef.transpose(1, 2) @ self.shared[first : first + coef.shape[1]]
        V, R = coef.shape[0], coef.shape[-1]
        out = coef.new_zeros(V, R, self.B * self.P, self.d)
        return self._by_group(coef, self.shared[first : first + coef.shape[2]], out)

    def _shared_patch(self, coef: torch.Tensor, first: int) -> torch.Tensor:
        if self.cache is None:
            return self._shared_matmul(coef, first)
        key = (first, tuple(coef.shape), hash(coef.detach().cpu().numpy().tobytes()))
        hit = self.cache.get(key)
        if hit is None:
            hit = self._shared_matmul(coef, first)
            self.cache[key] = hit
            while len(self.cache) > PATCH_CACHE_ENTRIES:          # bounded: oldest first
                self.cache.pop(next(iter(self.cache)))
        return hit.clone()

    def patch(self, coef: torch.Tensor, n_senders: int, first: int = 0,
              plus: torch.Tensor | None = None, cols: list[int] | None = None) -> torch.Tensor:
        """coef: [V, n_senders − first, R] for senders [first, n_senders) → [R, V·B·P, d],
        receiver-major, with `plus` ([V·B·P, d]) added to every receiver's patch. With groups,
        coef is [V, G, n_senders − first, R]."""
        out = self._patch(coef, n_senders, first)
        return out if plus is None else out.add_(plus)

    def _patch(self, coef: torch.Tensor, n_senders: int, first: int) -> torch.Tensor:
        if self.groups is not None:
            return self._patch_by_group(coef, n_senders, first)
        V, R = coef.shape[0], coef.shape[2]
        out = None
        ns = max(0, min(self.n_shared, n_senders) - first)
        if ns:
            out = self._shared_patch(coef[:, :ns], first)                             # [V, R, BPd]
        lo = max(first, self.n_shared)
        if n_senders > lo:
            own = torch.bmm(coef[:, lo - first :].transpose(1, 2),
                            self._own(lo - self.n_shared, n_senders - self.n_shared))
            out = own if out is None else out.add_(own)
        BP = self.B * self.P
        if V == 1:
            return out.view(R, BP, self.d)
        return out.view(V, R, BP, self.d).transpose(0, 1).reshape(R, V * BP, self.d)

    def _patch_by_group(self, coef: torch.Tensor, n_senders: int, first: int) -> torch.Tensor:
        V, R, BP, d = coef.shape[0], coef.shape[3], self.B * self.P, self.d
        ns = max(0, min(self.n_shared, n_senders) - first)
        out = self._shared_patch(coef[:, :, :ns], first) if ns else coef.new_zeros(V, R, BP, d)
        lo = max(first, self.n_shared)
        if n_senders > lo:
            self._by_group(coef[:, :, lo - first :], self._own(lo - self.n_shared, n_senders - self.n_shared), out)
        out = out[:, :, self.groups.inverse]                                     # token order again
        if V == 1:
            return out.view(R, BP, d)
        return out.transpose(0, 1).reshape(R, V * BP, d)


class _KeptDeltas:
    """The same patches for one variant from the start of the forward, computed from the other side:

        Σ_{s<n} coef[s,r]·δ_s = Σ_{s<n, none kept} δ_s + Σ_{s<n, some kept} coef[s,r]·δ_s

    A sender none of whose edges the circuit keeps has coef 1 everywhere: the first sum is one
    running total over those; the second runs over the senders with a kept edge (coef < 1),
    usually a few of them. So a sparse circuit neither stores every sender's δ (S·B·P·d floats)
    nor reads them all at every layer."""

    def __init__(self, coef: torch.Tensor, graph: Graph, B: int, P: int, d: int, like: torch.Tensor):
        keep = ((coef[0] != 1) & graph.allowed.to(coef.device)).any(1).cpu()  # [S] senders with a kept edge
        self.kept = torch.nonzero(keep).flatten()                             # sorted: slots follow senders
        self.slot = {int(s): i for i, s in enumerate(self.kept.tolist())}
        self.own = like.new_empty(len(self.slot), B * P * d)
        self.total = like.new_zeros(B * P * d)
        self.snap = {0: None}                                                 # running totals at layer starts
        self.boundaries = set(graph.sender_start)
        self.n = 0
        self.B, self.P, self.d = B, P, d
        self.coef = coef[0]                                                   # [S, R]
        # receivers by the sender count they read from (a layer's start; the logits: every sender)
        L = graph.arch.n_layers
        self.stages = [graph.sender_start[l] for l in range(L)] + [graph.n_senders]
        self.stage_cols = [list(range(*graph.attn_cols[l])) + ([graph.mlp_col[l]] if graph.mlp_col[l] >= 0 else [])
                           for l in range(L)] + [[graph.logits_col]]
        per_stage = max(len(c) for c in self.stage_cols) * B * P * d * like.element_size()
        self.stages_per_block = max(1, min(BLOCK_STAGES, BLOCK_BYTES // max(1, per_stage)))
        self.block = None             # (first stage, last stage + 1, kept slots read, {col: row}, sums)

    def put(self, s: int, ablated: torch.Tensor, out: torch.Tensor) -> None:
        B, P, d = self.B, self.P, self.d
        i = self.slot.get(s)
        if i is None:
            self.total += (ablated - out.reshape(B, P, d)).reshape(-1)
        else:
            torch.sub(ablated, out.reshape(B, P, d), out=self.own[i].view(B, P, d))
        self.n = s + 1
        if self.n in self.boundaries:
            self.snap[self.n] = self.total.clone()

    def _block_for(self, stage: int):
        """The terms of senders with a kept edge, before `stage`'s block, into every receiver of the block, in
        one matmul: each sender's δ is read once per block of layers, not once per layer."""
        if self.block is not None and self.block[0] <= stage < self.block[1]:
            return self.block
        end = min(len(self.stages), stage + self.stages_per_block)
        cols = [c for st in range(stage, end) for c in self.stage_cols[st]]
        n_old = int(torch.searchsorted(self.kept, self.stages[stage]))
        sums = None
        if n_old:
            k = self.coef[self.kept[:n_old].to(self.coef.device)][:, cols]                  # [k, n_cols]
            sums = k.transpose(0, 1) @ self.own[:n_old]
        self.block = (stage, end, n_old, {c: i for i, c in enumerate(cols)}, sums)
        return self.block

    def patch(self, coef: torch.Tensor, n_senders: int, first: int = 0,
              plus: torch.Tensor | None = None, cols: list[int] | None = None) -> torch.Tensor:
        """coef: [1, n_senders − first, R] → [R, B·P, d], `plus` ([B·P, d]) added to each;
        called when senders [0, n_senders) have run. cols: the receiver columns coef's columns
        are (first = 0, n_senders a layer start or every sender): then the patch comes from the
        block sums and the senders since the block's start."""
        assert self.n == n_senders and first in self.snap, "patch read out of order"
        base = self.total if self.snap[first] is None else self.total - self.snap[first]
        if plus is not None:
            base = base + plus.reshape(-1)
        if cols is not None and first == 0:
            _, _, n_old, row, sums = self._block_for(self.stages.index(n_senders))
            R = len(cols)
            if sums is None:
                out = base.expand(R, -1).clone()
            else:
                rows = [row[c] for c in cols]
                mine = sums[rows[0] : rows[0] + R] if rows == list(range(rows[0], rows[0] + R)) else sums[rows]
                out = torch.add(base.expand(R, -1), mine)
            i1 = int(torch.searchsorted(self.kept, n_senders))
            if i1 > n_old:
                k = self.coef[self.kept[n_old:i1].to(self.coef.device)][:, cols]            # [k, R]
                out.addmm_(k.transpose(0, 1), self.own[n_old:i1])
            return out.view(R, self.B * self.P, self.d)
        R = coef.shape[2]
        i0, i1 = (int(torch.searchsorted(self.kept, x)) for x in (first, n_senders))
        if i1 > i0:
            mine = coef[0, (self.kept[i0:i1] - first).to(coef.device)]           # [k, R]
            out = torch.addmm(base.expand(R, -1), mine.transpose(0, 1), self.own[i0:i1])
        else:
            out = base.expand(R, -1).clone()
        return out.view(R, self.B * self.P, self.d)


class _KeptGroupDeltas:
    """`_KeptDeltas` at position grain (one variant from the start of the forward, groups given):

        Σ_{s<n} coef[p,s,r]·δ_s = Σ_{s<n} δ_s − Σ_{s<n} (1 − coef[p,s,r])·δ_s   on the tokens of p.

    Only senders with a kept edge at some position are stored (tokens sorted by position), and a
    layer's patch reads only those with a kept edge into that layer's receivers: a sparse
    position-aware circuit reads a few senders per layer instead of every earlier one."""

    def __init__(self, coef: torch.Tensor, allowed: torch.Tensor, boundaries, groups: TokenGroups,
                 B: int, P: int, d: int, like: torch.Tensor):
        keep = ((coef[0] != 1) & allowed.to(coef.device)).any(0).any(1).cpu()     # [S]
        self.kept = torch.nonzero(keep).flatten()
        self.slot = {int(s): i for i, s in enumerate(self.kept.tolist())}
        self.own = like.new_empty(len(self.slot), B * P, d)                 # [k, B·P, d] tokens sorted
        self.total = like.new_zeros(B * P, d)                               # token order
        self.snap = {0: None}
        self.boundaries = set(boundaries)
        self.groups = groups
        self.n = 0
        self.B, self.P, self.d = B, P, d

    def put(self, s: int, ablated: torch.Tensor, out: torch.Tensor) -> None:
        B, P, d = self.B, self.P, self.d
        diff = (ablated - out.reshape(B, P, d)).reshape(B * P, d)
        i = self.slot.get(s)
        if i is not None:
            torch.index_select(diff, 0, self.groups.order, out=self.own[i])
        self.total += diff
        self.n = s + 1
        if self.n in self.boundaries:
            self.snap[self.n] = self.total.clone()

    def patch(self, coef: torch.Tensor, n_senders: int, first: int = 0,
              plus: torch.Tensor | None = None, cols: list[int] | None = None) -> torch.Tensor:
        """coef: [1, G, n_senders − first, R] → [R, B·P, d], `plus` ([B·P, d]) added to each;
        senders [0, n_senders) have run."""
        assert self.n == n_senders and first in self.snap, "patch read out of order"
        base = self.total if self.snap[first] is None else self.total - self.snap[first]
        if plus is not None:
            base = base + plus.view(base.shape)
        R = coef.shape[-1]
        i0, i1 = (int(torch.searchsorted(self.kept, x)) for x in (first, n_senders))
        if i1 == i0:
            return base.expand(R, -1, -1).clone()
        own = self.own[i0:i1]
        keep = 1 - coef[0][:, (self.kept[i0:i1] - first).to(coef.device)]                 # [G, k, R]
        used = torch.nonzero((keep != 0).any(2).any(0)).flatten()          # kept into these receivers
        if len(used) == 0:
            return base.expand(R, -1, -1).clone()
        if 2 * len(used) <= len(own):                                       # few: read only those
            own, keep = own[used.to(own.device)], keep[:, used]
        out = base.expand(R, -1, -1).clone()                                            # token order
        flat = out.view(-1, self.d)
        N = out.shape[1]
        # per position, only the receivers with a kept edge there and the senders of those edges;
        # their kept terms are subtracted at those receivers' tokens of that position
        nonzero = keep != 0
        rows_at, senders_at = nonzero.any(1).tolist(), nonzero.any(2).tolist()
        for p, a, b in self.groups.spans():
            rows = [r for r, x in enumerate(rows_at[p]) if x]
            if not rows:
                continue
            senders = [s for s, x in enumerate(senders_at[p]) if x]
            src, c = own[:, a:b].reshape(len(own), -1), keep[p]                               # [k, T_p·d], [k, R]
            if 4 * len(senders) <= 3 * len(own):
                src, c = src[senders], c[senders]
            rows_t = torch.tensor(rows, device=out.device)
            at = (rows_t[:, None] * N + self.groups.order[a:b][None, :]).reshape(-1)
            flat.index_add_(0, at, (c[:, rows].transpose(0, 1) @ src).view(-1, self.d), alpha=-1)
        return out


def _qkv(arch, lw, resid, coef, deltas, cols, c0, mlp_col, s0, freeze_norm=False):
    """q, k, v of one layer ([N, P, n, dh] each) and, with mlp_col, the stream entering the layer
    plus the MLP's patch from senders before s0 ([N·P, d]).

    Receivers whose coefficient columns are identical (typically: every edge ablated) share one
    patched input, so a sparse circuit costs a few extra projections, not one per receiver. When
    every head of a kind reads a patched input (dense circuits), the kind's projections run as
    one batched matmul over the heads' own inputs.
    """
    N, P, d = resid.shape
    shared_norm = None
    inputs = None
    mlp_patch = None
    group_of: dict[int, int] = {}
    if len(cols) or mlp_col >= 0:
        idx = (c0 + cols).tolist() + ([mlp_col] if mlp_col >= 0 else [])
        key = coef[..., :s0, idx].movedim(-1, 0).reshape(len(idx), -1)          # one row per receiver
        uniq, inverse = key, torch.arange(len(idx), device=key.device)
        if not coef.requires_grad:        # unique has no gradient; learned masks rarely repeat
            u, inv = torch.unique(key, dim=0, return_inverse=True)
            if 2 * len(u) <= len(idx):    # worth sharing; else keep column order (heads' rows are slices)
                uniq, inverse = u, inv
        # the stream is added inside the patch's matmul: patched inputs = resid + patch
        inv = inverse.tolist()
        reps = [idx[inv.index(u)] for u in range(len(uniq))]                  # a column of each unique row
        patches = deltas.patch(uniq.view(-1, *coef.shape[:-2], s0).movedim(0, -1), s0,
                               plus=resid.reshape(N * P, d), cols=reps)             # [n_u, N·P, d]
        if mlp_col >= 0:
            mlp_patch = patches[inverse[-1]]
            inverse = inverse[:-1]
        if len(cols):                     # many patched inputs per layer: the cheaper RMS norm
            if arch.norm is Norm.RMS and not freeze_norm and not torch.is_grad_enabled():
                inputs = C.rms_norm_no_grad(patches, lw.ln1[0], arch.norm_eps)        # [n_u, N·P, d]
            else:
                inputs = C.norm(arch, patches, lw.ln1, freeze_norm)
        group_of = dict(zip(cols.tolist(), inverse.tolist()))
    out = []
    H, KV = arch.n_heads, arch.n_kv_heads
    for offset, n, W, b in ((0, H, lw.W_Q, lw.b_Q), (H, KV, lw.W_K, lw.b_K), (H + KV, KV, lw.W_V, lw.b_V)):
        groups = [group_of.get(offset + h) for h in range(n)]
        if n > 1 and None not in groups and len(set(groups)) > 1:
            if groups == list(range(groups[0], groups[0] + n)):
                x = inputs[groups[0] : groups[0] + n]                                # [n, N·P, d]
            else:
                x = inputs.index_select(0, torch.tensor(groups, device=inputs.device))
            out.append(C.project_receivers(x, W, b, N, P))
            continue
        by_input: dict[int, list[int]] = {}
        plain = []
        for h, u in enumerate(groups):
            (plain if u is None else by_input.setdefault(u, [])).append(h)
        if not by_input:
            if shared_norm is None:
                shared_norm = C.norm(arch, resid, lw.ln1, freeze_norm)
            out.append(C.project(shared_norm, W, b))
            continue
        if len(by_input) == 1 and not plain:            # one input for every head of the kind
            (u,) = by_input
            out.append(C.project(inputs[u].view(N, P, d), W, b))
            continue
        t = resid.new_empty(N, P, n, W.shape[2])
        if plain:
            if shared_norm is None:
                shared_norm = C.norm(arch, resid, lw.ln1, freeze_norm)
            t[:, :, plain] = C.project(shared_norm, W[plain], b[plain])
        for u, heads in by_input.items():
            t[:, :, heads] = C.project(inputs[u].view(N, P, d), W[heads], b[heads])
        out.append(t)
    return (*out, mlp_patch)


def embed(w: Weights, tokens: torch.Tensor) -> torch.Tensor:
    """The input sender's output: token (and learned position) embeddings [B, P, d]."""
    x = w.W_E[tokens]
    if w.W_pos is not None and w.arch.positional is Positional.LEARNED:
        x = x + w.W_pos[: tokens.shape[1]]
    return x


def run(w: Weights, graph: Graph, tokens: torch.Tensor | None, *,
        positions: torch.Tensor | None = None,
        coef: torch.Tensor | None = None,
        ablated: torch.Tensor | None = None,
        prefix: Prefix | None = None,
        record: bool = False,
        taps: bool = False,
        embeds: torch.Tensor | None = None,
        stream: torch.Tensor | None = None,
        groups: TokenGroups | None = None,
        neurons: torch.Tensor | None = None,
        grad_mods: C.GradientMods | None = None) -> Run:
    """One forward pass of the engine.

    tokens: [B, P]. positions: [B] the position whose logits are wanted (None: all positions).
    coef: [V, S, R] or [S, R]: how much of each edge is ablated (1 − mask); V variants of the
    batch run side by side and return V·B rows. ablated: [S, B|1, P|1, d] sender outputs under
    the ablation (needed when coef is given). prefix: start at prefix.layer from a cached state.
    record: keep every sender's output and the residual stream per layer (V must be 1).
    taps: keep the tensors `receiver_grads` needs. embeds: [B, P, d] replaces the input sender's
    output. stream: [S, B, P, d] values every sender writes to the stream instead of its own
    output (straight-through: gradients still flow through the sender's computation).
    groups: the position of every token; coef is then [G, S, R] or [V, G, S, R], position-aware.
    neurons: [S, d] the output dimensions of each sender kept clean (1) or ablated (0) for every
    receiver (needs `ablated`).
    grad_mods: backward-only changes (GIM); the forward's values stay the same.
    """
    mods = grad_mods if grad_mods is not None and grad_mods.active else None
    freeze = mods is not None and mods.freeze_norm
    arch = graph.arch
    if coef is not None and coef.dim() == (2 if groups is None else 3):
        coef = coef.unsqueeze(0)
    if groups is not None and coef is not None:
        if coef.dim() != 4 or coef.shape[1] != groups.n:
            raise ValueError(f"position-aware coef should be [V, {groups.n}, S, R], got {tuple(coef.shape)}")
        groups = groups.to(w.device)
    V = 1 if coef is None else coef.shape[0]
    if coef is not None:
        if ablated is None:
            raise ValueError("patching needs the ablated sender outputs")
        coef = coef.to(device=w.device, dtype=w.dtype)
    if (record or taps) and V != 1:
        raise ValueError("record/taps need a single variant")
    off = None
    if neurons is not None:
        if ablated is None or prefix is not None:
            raise ValueError("a neuron mask needs the ablated sender outputs and a forward from the input")
        off = 1 - neurons.to(device=w.device, dtype=w.dtype)                   # [S, d]: ablated dims
    active = _active_columns(coef, graph.n_receivers)
    start = 0 if prefix is None else prefix.layer

    if prefix is None:
        x0 = embed(w, tokens) if embeds is None else embeds
        if stream is not None:
            x0 = x0 + (stream[0] - x0).detach()
        B, P, d = x0.shape
        resid = x0
    else:
        resid = prefix.resid
        B, P, d = resid.shape
    n_prefix = 0 if prefix is None else prefix.delta.shape[0]    # senders cached in the prefix
    deltas = None
    if coef is not None:
        differentiable = coef.requires_grad and torch.is_grad_enabled()
        # The kept-edges form is valid for the plain grain only: one variant from the input, no
        # position groups, no neuron mask, nothing differentiated (it writes into buffers in place).
        plain = (prefix is None and V == 1 and groups is None and off is None
                 and not torch.is_grad_enabled())
        if plain:
            deltas = _KeptDeltas(coef, graph, B, P, d, resid)
        elif (prefix is None and V == 1 and groups is not None and off is None
              and not torch.is_grad_enabled()):
            deltas = _KeptGroupDeltas(coef, graph.allowed, graph.sender_start, groups, B, P, d, resid)
        else:
            deltas = _Deltas(prefix, graph.n_senders - n_prefix, V, B, P, d, resid, groups,
                             differentiable=differentiable)
    outputs = resid.new_zeros(graph.n_senders, B, P, d) if record else None
    resid_log: list[torch.Tensor] = []

    def emit(s: int, out: torch.Tensor) -> None:
        if record:
            outputs[s] = out
        if deltas is not None:
            deltas.put(s, ablated[s], out)

    def neuron_ablated(first: int, out: torch.Tensor, heads: bool) -> torch.Tensor:
        """Sender outputs (heads: [N, P, H, d], else [N, P, d]) with the dims off the mask ablated."""
        n = out.shape[2] if heads else 1
        abl = ablated[first : first + n]                                          # [n, B|1, P|1, d]
        abl = abl.permute(1, 2, 0, 3) if heads else abl[0]
        if abl.shape[0] > 1 and out.shape[0] != abl.shape[0]:
            abl = abl.repeat(out.shape[0] // abl.shape[0], *([1] * (abl.dim() - 1)))
        return out + (off[first : first + n] if heads else off[first]) * (abl - out)

    if off is not None and prefix is None:
        resid = neuron_ablated(0, resid, heads=False)
    if V > 1:
        resid = resid.repeat(V, 1, 1)
    if prefix is None:
        emit(0, resid)
    if positions is not None:
        positions = positions.to(resid.device).repeat(V)
    key_valid = None
    if arch.pad_token_id is not None and tokens is not None:
        key_valid = (tokens.to(resid.device) != arch.pad_token_id).repeat(V, 1)
    cos = sin = None
    if arch.positional is Positional.ROTARY:
        cos, sin = w.rot_cos[:P].to(resid.dtype), w.rot_sin[:P].to(resid.dtype)
    tap: dict = {}

    for layer in range(start, arch.n_layers):
        lw = w.layers[layer]
        s0 = graph.sender_start[layer]
        if record:
            resid_log.append(resid)
        # ---- attention receivers: q, k, v of each head (and the MLP's share, fused) ----
        c0, c1 = graph.attn_cols[layer]
        col = graph.mlp_col[layer]
        cols = torch.nonzero(active[c0:c1]).flatten()
        fuse_mlp = col >= 0 and bool(active[col])
        q, k, v, mlp_patch = _qkv(arch, lw, resid, coef, deltas, cols, c0, col if fuse_mlp else -1, s0,
                                  freeze)
        H = arch.n_heads
        if taps:
            tap[("attn", layer)] = (resid, q, k, v)
        temperature = 1.0
        if mods is not None:
            q, k, v = (C.scale_grad(q, mods.q_scale), C.scale_grad(k, mods.k_scale),
                       C.scale_grad(v, mods.v_scale))
            temperature = mods.softmax_temperature
        if cos is not None:
            q, k = C.rotate(arch, q, cos, sin), C.rotate(arch, k, cos, sin)
        heads = C.head_outputs(lw, C.attend(arch, q, k, v, key_valid, temperature))     # [N, P, H, d]
        if stream is not None:
            heads = heads + (stream[s0 : s0 + H].permute(1, 2, 0, 3) - heads).detach()
        if off is not None:
            heads = neuron_ablated(s0, heads, heads=True)
        for h in range(H):
            emit(s0 + h, heads[:, :, h])
        attn_out = heads.sum(2) + lw.b_O
        if not arch.has_mlp:
            resid = resid + attn_out
            continue
        # ---- MLP receiver ----
        mid = resid if arch.parallel else resid + attn_out
        x = mid
        if fuse_mlp:
            n_in = int(graph.n_inputs[col])
            x = mlp_patch.view(mid.shape) if arch.parallel else mlp_patch.view(mid.shape) + attn_out
            if n_in > s0:                                    # the layer's own heads (sequential)
                x = x + deltas.patch(coef[..., s0:n_in, col : col + 1], n_in, first=s0).view(mid.shape)
        h2 = C.norm(arch, x, lw.ln2, freeze)
        if taps:
            tap[("mlp", layer)] = (x, h2)
        out = C.mlp(arch, lw, h2)
        if stream is not None:
            out = out + (stream[s0 + H] - out).detach()
        if off is not None:
            out = neuron_ablated(s0 + H, out, heads=False)
        emit(s0 + H, out)
        resid = (resid + attn_out + out) if arch.parallel else (mid + out)

    if record:
        resid_log.append(resid)
    # ---- logits receiver ----
    col = graph.logits_col
    x = resid
    if active[col]:
        x = deltas.patch(coef[..., col : col + 1], graph.n_senders, plus=resid.reshape(-1, d), cols=[col]).view(resid.shape)
    if positions is not None:
        x = x[torch.arange(x.shape[0], device=x.device), positions]
    hf = C.norm(arch, x, w.ln_final, freeze)
    if taps:
        tap[("logits",)] = (x, hf)
    logits = hf @ w.W_U
    if w.b_U is not None:
        logits = logits + w.b_U
    return Run(logits, outputs, resid_log if record else None, tap)


def prefix_at(layer: int, graph: Graph, clean: Run, ablated: torch.Tensor) -> Prefix:
    """The state entering `layer` when no edge into an earlier receiver is ablated."""
    n = graph.sender_start[layer] if layer < graph.arch.n_layers else graph.n_senders
    return Prefix(layer, clean.resid[layer], ablated[:n] - clean.outputs[:n])


def ablated_outputs(w: Weights, graph: Graph, ablation: Ablation, *, corrupted: torch.Tensor,
                    reference: torch.Tensor | None = None,
                    reference_valid: torch.Tensor | None = None,
                    batch_size: int | None = None) -> torch.Tensor:
    """Sender outputs under an ablation, [S, B|1, P|1, d].

    corrupted: [B, P] corrupted prompts (resample). reference: [B', P'] prompts whose mean is
    used by mean ablations (default: the corrupted prompts); reference_valid: [B', P'] bool
    marking real (non-padding) tokens. Means are summed `batch_size` reference rows at a time.
    """
    B, P = corrupted.shape
    S, d = graph.n_senders, graph.arch.d_model
    with torch.no_grad():
        if ablation is Ablation.ZERO:
            return torch.zeros(S, 1, 1, d, dtype=w.dtype, device=w.device)
        if ablation is Ablation.RESAMPLE:
            return run(w, graph, corrupted.to(w.device), positions=torch.zeros(B, dtype=torch.long),
                       record=True).outputs
        ref = corrupted if reference is None else reference
        valid = torch.ones(ref.shape, dtype=torch.bool) if reference_valid is None else reference_valid
        if ablation is Ablation.MEAN_POS and ref.shape[1] < P:
            raise ValueError(f"mean-pos ablation needs reference prompts at least {P} tokens long")
        total = count = None
        size = batch_size or ref.shape[0]
        for start in range(0, ref.shape[0], size):
            part = slice(start, start + size)
            outs = run(w, graph, ref[part].to(w.device), positions=torch.zeros(len(ref[part]), dtype=torch.long),
                       record=True).outputs
            weight = valid[part].to(device=w.device, dtype=w.dtype)[None, :, :, None]    # [1, b, P', 1]
            dims = (1, 2) if ablation is Ablation.MEAN else (1,)
            add, n = (outs * weight).sum(dims), weight.sum(dims)
            total, count = (add, n) if total is None else (total + add, count + n)
        mean = total / count.clamp(min=1)
        if ablation is Ablation.MEAN:
            return mean[:, None, None]
        return mean[:, None, :P]                                                   # [S, 1, P, d]
