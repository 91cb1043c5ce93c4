"""ACDC (Conmy et al. 2023) with the original algorithm's semantics, made fast.

Receivers are visited in reverse topological order (logits, then each layer's MLP, then its
q/k/v inputs); each incoming edge is removed when removing it changes the metric by less than
τ — for divergences from the clean run (KL, MSE): D(new) − D(current) < τ; for task metrics
|m(new) − m(current)| < τ —
and the removal is kept. A receiver whose node no longer reaches the logits loses its incoming
edges without tests (they cannot change the output).

Speed, without changing the result:
- every edge removed so far points into a later receiver, so the forward up to the receiver's
  layer is the clean one: each test starts at that layer from the cached clean state (from a
  start mask, the cached state under that mask: the walk has not touched earlier layers);
- speculation: k consecutive candidate edges run as k variants of one batch, variant j assuming
  candidates 0..j−1 were removed. The walk stops at the first kept edge and later variants are
  recomputed, so decisions are exactly the sequential ones.
At position grain (a setup prepared with positions) every edge is tested once per position,
masks and scores are [P, S, R]; the walk is the same.
A checkpoint is written every `checkpoint_every` seconds and on interruption; `resume` continues
with identical decisions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from circuits.evaluation import Setup
from circuits.graph import Channel
from circuits.tasks.task import Metric


@dataclass(frozen=True)
class AcdcResult:
    mask: torch.Tensor          # [S, R] bool ([P, S, R] at position grain)
    scores: torch.Tensor        # [S, R] importance measured when each edge was tested (0 untested)
    tested: int                 # edges tested with a forward
    forwards: float             # forward passes, in units of one full forward of the batch
    seconds: float


@dataclass
class Speculation:
    """How many candidate edges to test in one batched forward.

    A batch of k costs overhead + k (in units of one variant's forward); it decides every edge
    up to the first kept one. With keep rate p the expected number decided is (1 − (1−p)^k)/p,
    so k maximises that per unit of cost. `overhead` is measured once per run (and checkpointed,
    so a resumed run makes the same choices); p is a decaying average of recent decisions.
    """

    overhead: float
    max_variants: int
    kept: float = 0.5
    decided: float = 2.0

    def record(self, was_kept: bool) -> None:
        self.kept = 0.9 * self.kept + float(was_kept)
        self.decided = 0.9 * self.decided + 1.0

    def size(self, overhead_scale: float = 1.0) -> int:
        p = min(max(self.kept / self.decided, 1e-3), 1.0)
        a = self.overhead * overhead_scale
        gain = lambda k: (1 - (1 - p) ** k) / p / (a + k)
        return max(range(1, self.max_variants + 1), key=gain)


def _measure_overhead(setup: Setup, mask: torch.Tensor, metric: Metric, layer: int) -> float:
    """Fixed cost of one forward call in units of one variant's cost, at `layer`."""
    g = setup.graph
    coef = (~mask & g.allowed).float()
    times = {}
    for V in (1, 4, 1, 4):
        t = time.perf_counter()
        setup.metric_of_coef(coef.expand(V, *coef.shape), metric, start_layer=layer)
        times[V] = time.perf_counter() - t
    per_variant = max((times[4] - times[1]) / 3, 1e-9)
    return max(times[1] - per_variant, 0.0) / per_variant


def receiver_order(setup: Setup) -> list[int]:
    """Receivers in reverse topological order: logits, then per layer (last first) MLP, v, k, q."""
    g = setup.graph
    order = [g.logits_col]
    for layer in reversed(range(g.arch.n_layers)):
        if g.mlp_col[layer] >= 0:
            order.append(g.mlp_col[layer])
        c0, c1 = g.attn_cols[layer]
        order += list(reversed(range(c0, c1)))
    return order


def _fingerprint(setup: Setup, tau: float, metric: Metric, candidates: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([setup.model.spec, setup.task.name, setup.ablation.value, tau, metric.value,
                         len(setup.task), setup.n_positions]).encode())
    h.update(setup.task.clean.numpy().tobytes())
    h.update(setup.task.corrupted.numpy().tobytes())
    if candidates is not None:
        h.update(candidates.numpy().tobytes())
    return h.hexdigest()[:16]


def _removal_ok(metric: Metric, new: float, current: float, tau: float) -> bool:
    if metric.is_divergence:
        return new - current < tau
    return abs(new - current) < tau


def _node_alive(setup: Setup, mask: torch.Tensor, r: int) -> bool:
    """Does the node(s) that receiver r feeds still send any edge?"""
    g = setup.graph
    rec = g.receivers[r]
    if rec.channel is Channel.LOGITS:
        return True
    return any(bool(mask[..., n, :].any()) for n in g.receiver_nodes(r))


def acdc(setup: Setup, tau: float, *, metric: Metric = Metric.KL, max_variants: int = 16,
         start_mask: torch.Tensor | None = None, checkpoint: str | Path | None = None,
         resume: bool = False, checkpoint_every: float = 30.0, progress: bool = False,
         naive: bool = False, receivers: list[int] | None = None, max_tests: int | None = None) -> AcdcResult:
    """Run ACDC at threshold tau. start_mask limits the search to its edges (others start removed);
    receivers restricts the walk to those receiver columns (edges into others stay as they are);
    max_tests stops after that many tested edges (for benchmarks).

    naive=True is the reference: one full forward per tested edge, no prefix reuse, no batching.
    """
    g = setup.graph
    t0 = time.perf_counter()
    fingerprint = _fingerprint(setup, tau, metric, start_mask)
    mask = (setup.full_mask() if start_mask is None else start_mask.clone().bool()) & g.allowed
    scores = torch.zeros(mask.shape)
    n_pos = setup.n_positions
    order = receiver_order(setup)
    if receivers is not None:
        keep = set(receivers)
        order = [r for r in order if r in keep]
    pos_r, pos_s = 0, 0
    tested, forwards = 0, 0.0
    current = setup.metric(mask, metric).mean().item()
    mid = g.arch.n_layers // 2
    spec = None
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{checkpoint} was written by a different ACDC run (model, task, τ or metric)")
        mask, scores = state["mask"], state["scores"]
        pos_r, pos_s = int(state["pos_r"]), int(state["pos_s"])
        current, tested, forwards = float(state["current"]), int(state["tested"]), float(state["forwards"])
        spec = Speculation(float(state["overhead"]), max_variants, float(state["kept"]), float(state["decided"]))
    if spec is None:
        spec = Speculation(0.0 if naive else _measure_overhead(setup, mask, metric, mid), max_variants)

    def save() -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"fingerprint": fingerprint, "mask": mask, "scores": scores, "pos_r": pos_r,
                    "pos_s": pos_s, "current": current, "tested": tested, "forwards": forwards,
                    "overhead": spec.overhead, "kept": spec.kept, "decided": spec.decided}, tmp)
        tmp.replace(path)

    sign = 1.0 if metric.is_divergence else -1.0          # ablating what matters raises a divergence
    n_layers = g.arch.n_layers
    # Edges into receivers before the walk's layer are still as the walk found them: with a start
    # mask that removed some, tests start from the state under that mask, not the clean one.
    initial = (setup.full_mask() if start_mask is None else start_mask.bool()) & g.allowed
    walk = setup if naive or bool(initial.eq(setup.full_mask()).all()) else setup.rebased(initial)

    total = int(mask.sum())
    bar = tqdm(total=total, desc=f"ACDC τ={tau:g}", unit="edge", disable=not progress)
    bar.update(int(sum(int(mask[..., order[i]].sum()) for i in range(pos_r))) + pos_s)
    last_save = time.perf_counter()
    try:
        while pos_r < len(order) and (max_tests is None or tested < max_tests):
            r = order[pos_r]
            layer = min(g.receivers[r].layer, n_layers)
            start = 0 if naive else layer
            # the edges into r, each an index into mask without r: (s,), or (p, s) at position grain
            senders = [(s,) for s in reversed(range(int(g.n_inputs[r])))] if n_pos is None else \
                [(p, s) for s in reversed(range(int(g.n_inputs[r]))) for p in reversed(range(n_pos))]
            if not _node_alive(setup, mask, r):
                mask[..., r] = False
                bar.update(len(senders) - pos_s)
                pos_r, pos_s = pos_r + 1, 0
                continue
            while pos_s < len(senders) and (max_tests is None or tested < max_tests):
                s = senders[pos_s]
                if not mask[(*s, r)]:
                    pos_s += 1
                    bar.update(1)
                    continue
                batch = [s]
                # the overhead was measured at the middle layer; per-variant work scales with depth
                k = spec.size((g.arch.n_layers - mid + 0.5) / (g.arch.n_layers - start + 0.5))
                if not naive:
                    for s2 in senders[pos_s + 1 :]:
                        if len(batch) >= k:
                            break
                        if mask[(*s2, r)]:
                            batch.append(s2)
                coef = (~mask & g.allowed).float().expand(len(batch), *mask.shape).clone()
                for j, sj in enumerate(batch):
                    coef[(slice(j, None), *sj, r)] = 1.0
                values = walk.metric_of_coef(coef, metric, start_layer=start).mean(1).tolist()
                cost = (n_layers - start + 0.5) / (n_layers + 0.5)
                forwards += cost * len(batch)
                for j, sj in enumerate(batch):
                    tested += 1
                    scores[(*sj, r)] = sign * (values[j] - current)    # importance, see methods.base
                    while senders[pos_s] != sj:
                        pos_s += 1
                        bar.update(1)
                    pos_s += 1
                    bar.update(1)
                    removed = _removal_ok(metric, values[j], current, tau)
                    spec.record(not removed)
                    if not removed:
                        break
                    mask[(*sj, r)] = False
                    current = values[j]
                bar.set_postfix(tested=tested, kept=int(mask.sum()), refresh=False)
                if checkpoint is not None and time.perf_counter() - last_save > checkpoint_every:
                    save()
                    last_save = time.perf_counter()
            pos_r, pos_s = pos_r + 1, 0
    except KeyboardInterrupt:
        save()
        bar.close()
        raise
    bar.close()
    save()
    return AcdcResult(mask, scores, tested, forwards, time.perf_counter() - t0)
