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
A checkpoint (one atomic file holding the whole `WalkState` and the run's settings) is written
every `checkpoint_every` seconds and on interruption; `resume` continues with identical
decisions, and refuses a checkpoint made under other settings (`run_settings`), naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from circuits.evaluation import Setup
from circuits.files import OutputError, atomic_open, cause
from circuits.graph import Channel
from circuits.tasks.task import Metric


@dataclass(frozen=True)
class AcdcResult:
    mask: torch.Tensor          # [S, R] bool ([P, S, R] at position grain)
    scores: torch.Tensor        # [S, R] importance measured when each edge was tested (0 untested)
    tested: int                 # edges tested with a forward
    forwards: float             # forward passes, in units of one full forward of the batch
    seconds: float


@dataclass(frozen=True)
class Speculation:
    """How many candidate edges to test in one batched forward.

    A batch of k costs overhead + k (in units of one variant's forward); it decides every edge
    up to the first kept one. With keep rate p the expected number decided is (1 − (1−p)^k)/p,
    so k maximises that per unit of cost. `overhead` is measured once per run (and checkpointed,
    so a resumed run makes the same choices); p is a decaying average of recent decisions
    (`kept`/`decided`, kept in the walk's state).
    """

    overhead: float
    max_variants: int

    @staticmethod
    def record(kept: float, decided: float, was_kept: bool) -> tuple[float, float]:
        return 0.9 * kept + float(was_kept), 0.9 * decided + 1.0

    def size(self, kept: float, decided: float, overhead_scale: float = 1.0) -> int:
        p = min(max(kept / decided, 1e-3), 1.0)
        a = self.overhead * overhead_scale
        gain = lambda k: (1 - (1 - p) ** k) / p / (a + k)
        return max(range(1, self.max_variants + 1), key=gain)


@dataclass(frozen=True)
class WalkState:
    """Everything the walk has decided so far: what a checkpoint holds. The walk builds the next
    state on copies and replaces the whole record in one assignment, so an interruption at any
    instant leaves a consistent state (the last one), never a position ahead of its mask."""

    mask: torch.Tensor          # [S, R] bool ([P, S, R] at position grain)
    scores: torch.Tensor        # [S, R] ([P, S, R])
    pos_r: int                  # index into the receiver order
    pos_s: int                  # index into that receiver's edges (senders in reverse order)
    current: float              # the metric with the current mask
    tested: int
    forwards: float
    kept: float = 0.5
    decided: float = 2.0


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


def edge_cost(graph, r: int) -> float:
    """Cost of testing an edge into receiver r, in forwards: the test starts at r's layer from the
    cached state, so it runs (L − l + 0.5) of the L + 0.5 layers (the unembedding counted as half)."""
    L = graph.arch.n_layers
    return (L - min(graph.receivers[r].layer, L) + 0.5) / (L + 0.5)


def expected_forwards(graph, mask: torch.Tensor) -> float:
    """Forward-equivalents ACDC spends testing every edge of `mask` ([S, R] or [P, S, R]) once
    (no batching gains)."""
    per_receiver = (mask.bool() & graph.allowed).reshape(-1, graph.n_receivers).sum(0).tolist()
    return sum(n * edge_cost(graph, r) for r, n in enumerate(per_receiver))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_digest(weights) -> str:
    """A hash of every tensor of the model (so a checkpoint of other weights is refused)."""
    tensors = [weights.W_E, weights.W_pos, weights.W_U, weights.b_U, *weights.ln_final]
    for layer in weights.layers:
        for value in vars(layer).values():
            tensors += list(value) if isinstance(value, tuple) else [value]
    return _digest(*[t for t in tensors if t is None or isinstance(t, torch.Tensor)])


# What a checkpoint's settings are called on the command line, for the refusal message; in the
# order they are compared (the options a user types first: they explain the hashes that follow).
SETTING_NAMES = {"format": "checkpoint format", "method": "--method", "seed": "--seed", "tau": "--tau",
                 "metric": "--acdc-metric", "ablation": "--ablation", "task_metric": "--metric",
                 "model": "model", "task": "task", "weights": "model weights", "task_data": "task data",
                 "start_mask": "candidate edges (hybrid)", "order": "receiver order", "positions": "--positions"}
CHECKPOINT_FORMAT = 2


def run_settings(setup: Setup, tau: float, metric: Metric, start_mask: torch.Tensor | None,
                 order: list[int], extra: dict | None = None) -> dict:
    """Every setting that changes ACDC's result; a checkpoint resumes only under equal settings."""
    t = setup.task
    return {"format": CHECKPOINT_FORMAT, "model": setup.model.spec, "weights": weights_digest(setup.model.weights),
            "task": t.name, "task_data": _digest(t.clean, t.corrupted, t.answers, t.wrongs, t.lengths),
            "task_metric": t.metric.value, "ablation": setup.ablation.value, "metric": metric.value,
            "tau": float(tau), "start_mask": None if start_mask is None else _digest(start_mask.bool()),
            "order": _digest(torch.tensor(order)),
            "positions": None if setup.positions is None else list(setup.positions.names), **(extra or {})}


def _check_settings(path, saved: dict, now: dict) -> None:
    for key in sorted(set(saved) | set(now), key=lambda k: list(SETTING_NAMES).index(k) if k in SETTING_NAMES else 99):
        if saved.get(key) != now.get(key):
            name = SETTING_NAMES.get(key, key)
            raise ValueError(f"{path} was written by a different ACDC run: {name} was {saved.get(key)!r}, "
                             f"now {now.get(key)!r}; rerun with the checkpoint's settings, or delete it "
                             f"to start over")


def _load(path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a readable ACDC checkpoint ({cause(err)}); delete it to start over") from None
    if not isinstance(state, dict) or "settings" not in state:
        raise ValueError(f"{path} was written by an older version of circuits (no settings recorded); "
                         f"delete it to start over")
    return state


def check_checkpoint(path, given: dict) -> None:
    """Refuse a checkpoint whose settings differ from `given` (a subset, e.g. the command line's
    method, seed, tau, model): checked before any model loads."""
    saved = json.loads(_load(path)["settings"])
    _check_settings(path, {k: saved.get(k) for k in given}, given)


def _read_checkpoint(path, settings: dict) -> tuple[WalkState, float]:
    state = _load(path)
    _check_settings(path, json.loads(state["settings"]), settings)
    return WalkState(state["mask"].bool(), state["scores"], int(state["pos_r"]), int(state["pos_s"]),
                     float(state["current"]), int(state["tested"]), float(state["forwards"]),
                     float(state["kept"]), float(state["decided"])), float(state["overhead"])


def write_checkpoint(path, settings: dict, state: WalkState, overhead: float) -> None:
    """One atomic file: a failure leaves the previous checkpoint as it was."""
    record = {"settings": json.dumps(settings), "mask": state.mask, "scores": state.scores,
              "pos_r": state.pos_r, "pos_s": state.pos_s, "current": state.current, "tested": state.tested,
              "forwards": state.forwards, "kept": state.kept, "decided": state.decided, "overhead": overhead}
    with atomic_open(path, "wb") as f:
        torch.save(record, f)


def _step(name: str) -> None:
    """A boundary of the walk's bookkeeping (fault-injection tests interrupt here)."""


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
         naive: bool = False, receivers: list[int] | None = None, max_tests: int | None = None,
         settings: dict | None = None) -> AcdcResult:
    """Run ACDC at threshold tau. start_mask limits the search to its edges (others start removed);
    receivers restricts the walk to those receiver columns (edges into others stay as they are);
    max_tests stops after that many tested edges (for benchmarks). `settings` adds what else
    the checkpoint must match on resume (the CLI passes method and seed).

    naive=True is the reference: one full forward per tested edge, no prefix reuse, no batching.
    """
    g = setup.graph
    t0 = time.perf_counter()
    order = receiver_order(setup)
    if receivers is not None:
        keep = set(receivers)
        order = [r for r in order if r in keep]
    run = run_settings(setup, tau, metric, start_mask, order, settings) if checkpoint is not None else {}
    mask = (setup.full_mask() if start_mask is None else start_mask.clone().bool()) & g.allowed
    n_pos = setup.n_positions
    mid = g.arch.n_layers // 2
    state = overhead = None
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state, overhead = _read_checkpoint(checkpoint, run)
    t_forward = time.perf_counter()
    if state is None:
        state = WalkState(mask, torch.zeros(mask.shape), 0, 0,
                          setup.metric(mask, metric).mean().item(), 0, 0.0)
        t_forward = time.perf_counter() - t_forward
        overhead = 0.0 if naive else _measure_overhead(setup, mask, metric, mid)
    elif progress:                        # resumed: one forward, timed, for the ETA only
        setup.metric(state.mask, metric)
        t_forward = time.perf_counter() - t_forward
    spec = Speculation(overhead, max_variants)
    failed_save: list[str] = []

    def save(st: WalkState) -> None:
        if checkpoint is None:
            return
        try:
            write_checkpoint(checkpoint, run, st, overhead)
        except OutputError as err:
            # the run goes on (its result matters more); the last good checkpoint stays as it was
            if not failed_save:
                print(f"circuits: warning: checkpoint not updated: {err}", file=sys.stderr)
            failed_save.append(str(err))

    sign = 1.0 if metric.is_divergence else -1.0          # ablating what matters raises a divergence
    n_layers = g.arch.n_layers
    # Edges into receivers before the walk's layer are still as the walk found them: with a start
    # mask that removed some, tests start from the state under that mask, not the clean one.
    initial = (setup.full_mask() if start_mask is None else start_mask.bool()) & g.allowed
    walk = setup if naive or bool(initial.eq(setup.full_mask()).all()) else setup.rebased(initial)
    # The bar counts forward-equivalents, not edges: a test starts at its receiver's layer, so
    # edges into late layers cost a fraction of a forward and the ETA weighs them so. Candidates
    # are the start mask's edges (the walk visits the others without a forward).
    weight = [1.0 if naive else edge_cost(g, r) for r in range(g.n_receivers)]
    n_cand = (mask.reshape(-1, g.n_receivers).sum(0)).tolist()               # candidates per receiver
    before = [0.0]
    for r in order:
        before.append(before[-1] + n_cand[r] * weight[r])
    n_in = [int(g.n_inputs[r]) * (n_pos or 1) for r in order]                # edges into each receiver

    def done(st: WalkState) -> float:
        """Forward-equivalents of the walk up to st's position (within a receiver: pro rata)."""
        if st.pos_r >= len(order):
            return before[-1]
        i = st.pos_r
        return before[i] + (before[i + 1] - before[i]) * min(st.pos_s, n_in[i]) / max(n_in[i], 1)

    total = before[-1]
    if progress:
        left = total - done(state)
        n_left = int(sum(n_cand[r] for r in order[state.pos_r:]))
        tqdm.write(f"ACDC: {n_left} candidate edges into {len(order) - state.pos_r} receivers = {left:.0f} "
                   f"forwards (an edge into layer l costs (L - l + 0.5)/(L + 0.5) of one); about "
                   f"{_duration(left * t_forward)} at {t_forward:.2f}s per forward, less where "
                   f"speculative batches pay off", file=sys.stderr)
    bar = tqdm(total=round(total, 2), desc=f"ACDC τ={tau:g}", unit="F", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} forwards [{elapsed}<{remaining}{postfix}]")
    last_save = time.perf_counter()
    try:
        while state.pos_r < len(order) and (max_tests is None or state.tested < max_tests):
            bar.update(min(done(state), bar.total) - bar.n)   # the total is rounded: never past it
            r = order[state.pos_r]
            # the edges into r, each an index into mask without r: (s,), or (p, s) at position grain
            n_s = int(g.n_inputs[r])
            senders = [(s,) for s in reversed(range(n_s))] if n_pos is None else \
                [(p, s) for s in reversed(range(n_s)) for p in reversed(range(n_pos))]
            if state.pos_s >= len(senders):
                state = dataclasses.replace(state, pos_r=state.pos_r + 1, pos_s=0)
                continue
            if not _node_alive(setup, state.mask, r):
                # the node no longer reaches the logits: its inputs go without tests
                mask = state.mask.clone()
                mask[..., r] = False
                _step("dead receiver")
                state = dataclasses.replace(state, mask=mask, pos_r=state.pos_r + 1, pos_s=0)
                continue
            s = senders[state.pos_s]
            if not state.mask[(*s, r)]:
                state = dataclasses.replace(state, pos_s=state.pos_s + 1)
                continue
            start = 0 if naive else min(g.receivers[r].layer, n_layers)
            batch = [s]
            # the overhead was measured at the middle layer; per-variant work scales with depth
            k = spec.size(state.kept, state.decided, (n_layers - mid + 0.5) / (n_layers - start + 0.5))
            if not naive:
                for s2 in senders[state.pos_s + 1:]:
                    if len(batch) >= k:
                        break
                    if state.mask[(*s2, r)]:
                        batch.append(s2)
            coef = (~state.mask & g.allowed).float().expand(len(batch), *state.mask.shape).clone()
            for j, sj in enumerate(batch):
                coef[(slice(j, None), *sj, r)] = 1.0
            values = walk.metric_of_coef(coef, metric, start_layer=start).mean(1).tolist()
            _step("tested")
            # The bookkeeping works on copies; the new state replaces the old in one assignment.
            mask, scores = state.mask.clone(), state.scores.clone()
            pos_s, current, tested, kept, decided = state.pos_s, state.current, state.tested, state.kept, state.decided
            for j, sj in enumerate(batch):
                tested += 1
                scores[(*sj, r)] = sign * (values[j] - current)    # importance, see methods.base
                _step("scored")
                pos_s = senders.index(sj) + 1
                _step("advanced")
                removed = _removal_ok(metric, values[j], current, tau)
                kept, decided = Speculation.record(kept, decided, not removed)
                _step("decided")
                if not removed:
                    break
                mask[(*sj, r)] = False
                current = values[j]
                _step("removed")
            forwards = state.forwards + (n_layers - start + 0.5) / (n_layers + 0.5) * len(batch)
            state = WalkState(mask, scores, state.pos_r, pos_s, current, tested, forwards, kept, decided)
            _step("committed")
            bar.set_postfix(tested=state.tested, kept=int(state.mask.sum()), refresh=False)
            if checkpoint is not None and time.perf_counter() - last_save > checkpoint_every:
                save(state)
                _step("saved")
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        save(state)
        bar.close()
        raise
    bar.update(min(done(state), bar.total) - bar.n)
    bar.close()
    save(state)
    return AcdcResult(state.mask, state.scores, state.tested, state.forwards, time.perf_counter() - t0)
