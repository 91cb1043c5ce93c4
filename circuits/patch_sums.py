"""How the patching forward sums Σ_s coef[s, r] · δ_s (δ = ablated − current sender output)
for the receivers of a layer: three layouts of the same sum, chosen by `patching.run`.

- `Deltas`: every variant and grain, from a cached prefix or the input; differentiable.
- `KeptDeltas`: one variant from the input, no grad (circuit evaluation): a running total of
  the senders with no kept edge plus the kept senders' terms, summed a block of layers at once.
- `KeptGroupDeltas`: the same at position grain.

Each has `put(s, ablated_s, current_s)` as senders run and `patch(coef, n_senders, first, plus,
cols)` → [R, tokens, d] when a layer's receivers read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuits.graph import Graph
from circuits.positions import TokenGroups

PATCH_CACHE_ENTRIES = 64
# a kept-edges evaluation sums the kept senders' terms for up to BLOCK_STAGES layers' receivers at once
# (each stored δ read once per block), holding at most BLOCK_BYTES of sums
BLOCK_STAGES = 8
BLOCK_BYTES = 256 * 2**20


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


class Workspace:
    """Buffers that successive forwards of one setup reuse. On CPU a fresh tensor costs its page
    faults at first touch (about 0.4 s for the 0.7 GB of kept δs of a 64-prompt smollm2 batch),
    a reused one nothing. The forwards that share a workspace must run one after another."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined), like `like`'s dtype and device."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self._buffers.pop(name, None)                  # the old one goes before the new one comes
            buf = self._buffers[name] = like.new_empty(numel)
        return buf[:numel].view(shape)


class Deltas:
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


class KeptDeltas:
    """The same patches for one variant from the start of the forward, computed from the other side:

        Σ_{s<n} coef[s,r]·δ_s = Σ_{s<n, none kept} δ_s + Σ_{s<n, some kept} coef[s,r]·δ_s

    A sender none of whose edges the circuit keeps has coef 1 everywhere: the first sum is one
    running total over those; the second runs over the senders with a kept edge (coef < 1),
    usually a few of them. So a sparse circuit neither stores every sender's δ (S·B·P·d floats)
    nor reads them all at every layer.

    The kept δs are stored token-major, [B·P, k, d]: a block's sums are then one batched matmul
    [R, k] @ [k, d] per token, about 2.5× faster on CPU than [R, k] @ [k, B·P·d], whose output
    rows are too long to stay in cache. Patches come out as [R, B·P, d] views of [B·P, R, d]."""

    def __init__(self, coef: torch.Tensor, graph: Graph, B: int, P: int, d: int, like: torch.Tensor,
                 workspace: Workspace | None = None):
        keep = ((coef[0] != 1) & graph.allowed.to(coef.device)).any(1).cpu()  # [S] senders with a kept edge
        self.kept = torch.nonzero(keep).flatten()                             # sorted: slots follow senders
        self.slot = {int(s): i for i, s in enumerate(self.kept.tolist())}
        workspace = workspace or Workspace()
        self.own = workspace.take("kept deltas", (B * P, len(self.slot), d), like)   # [B·P, k, d]
        self.total = like.new_zeros(B * P, d)
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
        widest = max(len(c) for c in self.stage_cols)
        self.stages_per_block = max(1, min(BLOCK_STAGES, BLOCK_BYTES // max(1, widest * B * P * d * like.element_size())))
        # one buffer for every block's sums (a fresh one per block costs its page faults again)
        most = max(sum(len(c) for c in self.stage_cols[i : i + self.stages_per_block])
                   for i in range(len(self.stage_cols)))
        self.buffer = workspace.take("block sums", (B * P * most * d,), like) if len(self.slot) else None
        self.block = None             # (first stage, last stage + 1, kept slots read, {col: row}, sums)

    def put(self, s: int, ablated: torch.Tensor, out: torch.Tensor) -> None:
        B, P, d = self.B, self.P, self.d
        i = self.slot.get(s)
        if i is None:
            self.total += (ablated - out.reshape(B, P, d)).view(B * P, d)
        else:
            torch.sub(ablated, out.reshape(B, P, d), out=self.own[:, i].view(B, P, d))
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
            sums = self.buffer[: self.B * self.P * len(cols) * self.d].view(self.B * self.P, len(cols), self.d)
            torch.matmul(k.transpose(0, 1).contiguous(), self.own[:, :n_old], out=sums)     # [B·P, n_cols, d]
        self.block = (stage, end, n_old, {c: i for i, c in enumerate(cols)}, sums)
        return self.block

    def patch(self, coef: torch.Tensor, n_senders: int, first: int = 0,
              plus: torch.Tensor | None = None, cols: list[int] | None = None) -> torch.Tensor:
        """coef: [1, n_senders − first, R] → [R, B·P, d] (a view), `plus` ([B·P, d]) added to each;
        called when senders [0, n_senders) have run. cols: the receiver columns coef's columns
        are (first = 0, n_senders a layer start or every sender): then the patch comes from the
        block sums and the senders since the block's start."""
        assert self.n == n_senders and first in self.snap, "patch read out of order"
        base = self.total if self.snap[first] is None else self.total - self.snap[first]
        if plus is not None:
            base = base + plus.view(base.shape)
        base = base[:, None]                                                  # [B·P, 1, d]
        if cols is not None and first == 0:
            _, _, n_old, row, sums = self._block_for(self.stages.index(n_senders))
            R = len(cols)
            if sums is None:
                out = base.expand(-1, R, -1).clone()
            else:
                rows = [row[c] for c in cols]
                # each receiver's rows are read once (its layer's one patch), so they are finished in place
                contiguous = rows == list(range(rows[0], rows[0] + R))
                out = (sums[:, rows[0] : rows[0] + R] if contiguous else sums[:, rows]).add_(base)
            i1 = int(torch.searchsorted(self.kept, n_senders))
            if i1 > n_old:
                k = self.coef[self.kept[n_old:i1].to(self.coef.device)][:, cols]            # [k, R]
                out.add_(torch.matmul(k.transpose(0, 1), self.own[:, n_old:i1]))
            return out.transpose(0, 1)
        R = coef.shape[2]
        i0, i1 = (int(torch.searchsorted(self.kept, x)) for x in (first, n_senders))
        if i1 > i0:
            mine = coef[0, (self.kept[i0:i1] - first).to(coef.device)]           # [k, R]
            out = torch.matmul(mine.transpose(0, 1), self.own[:, i0:i1]).add_(base)
        else:
            out = base.expand(-1, R, -1).clone()
        return out.transpose(0, 1)


class KeptGroupDeltas:
    """`KeptDeltas` at position grain (one variant from the start of the forward, groups given):

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
