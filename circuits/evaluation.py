"""Evaluate circuits on a task: the caches one (model, task, ablation) needs, prepared once.

`Setup.metric(mask)` runs the one patching forward (`patching.run`) over the task's examples and
returns the metric per example; everything else (faithfulness, ACDC, verification) builds on it.
A setup prepared with `positions` takes position-aware masks, [P, S, R] (a batch: [V, P, S, R]);
a plain [S, R] mask still means the same edges at every position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from circuits import patching
from circuits.model.loader import Model
from circuits.patching import Ablation, Prefix
from circuits.positions import Positions, TokenGroups
from circuits.tasks.task import Metric, Task, check_metric, metric_values


@dataclass(frozen=True, eq=False)
class Chunk:
    """One slice of the examples with its cached clean run and ablated sender outputs."""

    rows: slice
    task: Task
    ablated: torch.Tensor          # [S, B|1, P|1, d]
    clean: patching.Run            # recorded clean run (outputs, resid per layer)
    clean_logits: torch.Tensor     # [B, vocab] at the answer positions
    groups: TokenGroups | None = None   # the position of every token (position-aware setups)
    # [B, vocab] the corrupted run's logits at the answer positions (resample ablation): the
    # empty circuit's logits, recorded by the forward that caches the ablated outputs
    corrupted_logits: torch.Tensor | None = None
    _prefixes: dict = field(default_factory=dict, repr=False)
    # the clean run with its autograd graph and gradient taps, kept when prepared for EAP
    _graph: dict = field(default_factory=dict, repr=False)

    def take_clean_graph(self) -> patching.Run | None:
        """The clean run with gradient taps, once (EAP's backward starts from it); None if not kept."""
        return self._graph.pop("run", None)

    def prefix(self, layer: int, graph) -> Prefix:
        """The clean state entering `layer`; the most recent one is kept, with its patch cache."""
        cached = self._prefixes.get(layer)
        if cached is None:
            self._prefixes.clear()
            cached = self._prefixes[layer] = patching.prefix_at(layer, graph, self.clean, self.ablated)
        return cached


def behaviour_gap(full: float, empty: float) -> float | None:
    """m(model) − m(∅), or None when it is too small to divide by: ablating every edge leaves the
    metric as it is clean, so there is no behaviour to explain."""
    gap = full - empty
    return gap if abs(gap) > 1e-6 * max(1.0, abs(full), abs(empty)) else None


def normalized_faithfulness(m_circuit: float, empty: float, full: float) -> float:
    """(m(C) − m(∅)) / (m(M) − m(∅)); NaN where there is no behaviour."""
    gap = behaviour_gap(full, empty)
    return float("nan") if gap is None else (m_circuit - empty) / gap


@dataclass(frozen=True, eq=False)
class Setup:
    model: Model
    task: Task
    ablation: Ablation
    chunks: tuple[Chunk, ...]
    positions: Positions | None = None
    # m(∅) per metric: every faithfulness needs it, and it costs a forward over all examples
    _empty: dict = field(default_factory=dict, repr=False, compare=False)
    # buffers the circuit evaluations reuse (page faults of fresh ones cost ~0.2 F on CPU)
    workspace: patching.Workspace = field(default_factory=patching.Workspace, repr=False, compare=False)

    @property
    def graph(self):
        return self.model.graph

    @property
    def n_positions(self) -> int | None:
        return None if self.positions is None else self.positions.n

    def _mask_dims(self) -> int:
        """Dimensions of one mask at this setup's grain: 2 ([S, R]) or 3 ([P, S, R])."""
        return 2 if self.positions is None else 3

    def _groups(self, coef: torch.Tensor | None, chunk: Chunk) -> TokenGroups | None:
        return None if coef is None or coef.dim() == 2 or self.positions is None else chunk.groups

    def empty_mask(self) -> torch.Tensor:
        g = self.graph
        return g.empty_mask() if self.positions is None else g.empty_mask().expand(self.positions.n, -1, -1).clone()

    def full_mask(self) -> torch.Tensor:
        g = self.graph
        return g.full_mask() if self.positions is None else g.full_mask().expand(self.positions.n, -1, -1).clone()

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges * (1 if self.positions is None else self.positions.n)

    def coef(self, mask: torch.Tensor) -> torch.Tensor:
        """1 − mask on the graph's edges: [S, R] or [V, S, R] float ([P, S, R], [V, P, S, R] at
        position grain)."""
        return (~mask.bool() & self.graph.allowed).to(self.model.weights.dtype)

    def logits(self, coef: torch.Tensor | None, chunk: Chunk, start_layer: int = 0,
               neurons: torch.Tensor | None = None) -> torch.Tensor:
        w, g = self.model.weights, self.graph
        tokens = chunk.task.clean.to(w.device)
        prefix = chunk.prefix(start_layer, g) if start_layer > 0 else None
        with torch.no_grad():
            return patching.run(w, g, tokens, positions=chunk.task.positions, coef=coef,
                                ablated=chunk.ablated, prefix=prefix, groups=self._groups(coef, chunk),
                                neurons=neurons, workspace=self.workspace).logits

    def metric_of_coef(self, coef: torch.Tensor, metric: Metric | None = None,
                       start_layer: int = 0, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """Metric per example for each variant: coef [S, R] → [B]; [V, S, R] → [V, B]
        (at position grain [P, S, R] → [B] and [V, P, S, R] → [V, B]; [S, R] still → [B])."""
        metric = metric or self.task.metric
        V = coef.shape[0] if coef.dim() == self._mask_dims() + 1 else None
        parts = []
        for chunk in self.chunks:
            logits = self.logits(coef, chunk, start_layer, neurons)
            values = metric_values(metric, logits, chunk.task, chunk.clean_logits)
            parts.append(values.view(V or 1, -1))
        out = torch.cat(parts, dim=1)
        return out if V is not None else out[0]

    def metric(self, mask: torch.Tensor, metric: Metric | None = None,
               neurons: torch.Tensor | None = None) -> torch.Tensor:
        """Metric per example with only the circuit's edges clean ([S, R] or [P, S, R] bool mask);
        neurons: [S, d] bool, the output dimensions of each sender kept (the others ablated)."""
        return self.metric_of_coef(self.coef(mask), metric, neurons=neurons)

    def clean_metric(self, metric: Metric | None = None) -> torch.Tensor:
        metric = metric or self.task.metric
        return torch.cat([metric_values(metric, c.clean_logits, c.task, c.clean_logits) for c in self.chunks])

    def rebased(self, mask: torch.Tensor) -> "Setup":
        """The same setup whose cached state (the prefixes later forwards start from) is the run
        with only `mask`'s edges clean, instead of the clean run. Valid for forwards that keep
        every edge into receivers before their start layer as in `mask` (ACDC from a start mask:
        its walk has not reached those layers yet). The metric's reference stays the clean run."""
        w, g = self.model.weights, self.graph
        chunks = []
        for c in self.chunks:
            coef = self.coef(mask)
            with torch.no_grad():
                base = patching.run(w, g, c.task.clean.to(w.device), positions=c.task.positions,
                                    coef=coef, ablated=c.ablated, record=True, groups=self._groups(coef, c))
            chunks.append(Chunk(c.rows, c.task, c.ablated, base, c.clean_logits, c.groups, c.corrupted_logits))
        return dataclasses.replace(self, chunks=tuple(chunks), _empty=self._empty)

    def empty_metric(self, metric: Metric | None = None) -> float:
        """Mean metric of the empty circuit (every edge ablated), computed once per metric."""
        metric = metric or self.task.metric
        if metric not in self._empty:
            if all(c.corrupted_logits is not None for c in self.chunks):   # resample: recorded
                values = torch.cat([metric_values(metric, c.corrupted_logits, c.task, c.clean_logits)
                                    for c in self.chunks])
            else:
                values = self.metric(self.graph.empty_mask(), metric)
            self._empty[metric] = values.mean().item()
        return self._empty[metric]

    def has_behaviour(self) -> bool:
        """False when ablating every edge leaves the metric as it is clean: nothing to explain,
        and faithfulness (a ratio over that difference) is undefined."""
        return behaviour_gap(self.clean_metric().mean().item(), self.empty_metric()) is not None

    def faithfulness(self, mask: torch.Tensor, m_circuit: float | None = None,
                     neurons: torch.Tensor | None = None) -> dict:
        """Normalized faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) with the raw means.
        m_circuit: the circuit's mean metric when already measured (saves a forward)."""
        m_c = self.metric(mask, neurons=neurons).mean().item() if m_circuit is None else m_circuit
        m_empty = self.empty_metric()
        m_full = self.clean_metric().mean().item()
        return {"circuit": m_c, "empty": m_empty, "model": m_full,
                "faithfulness": normalized_faithfulness(m_c, m_empty, m_full)}


def _checked(model: Model, task: Task) -> Task:
    """Refuse a task the model cannot run; pad for non-causal models (which read padding)."""
    w = model.weights
    if int(task.clean.max()) >= w.arch.d_vocab:
        raise ValueError(f"task {task.name} has token ids beyond the model's vocabulary ({w.arch.d_vocab})")
    if task.clean.shape[1] > w.arch.n_ctx:
        raise ValueError(f"task {task.name} has prompts of {task.clean.shape[1]} tokens; "
                         f"the model's context is {w.arch.n_ctx}")
    if not w.arch.causal and bool((task.lengths != task.lengths[0]).any()):
        if w.arch.pad_token_id is None:
            raise ValueError(f"{model.spec} attends to every position (not causal), so right-padding "
                             f"would be read as input: task {task.name} needs prompts of one length")
        pad = w.arch.pad_token_id       # the token the model masks out of attention
        task = dataclasses.replace(task, clean=task.clean.masked_fill(~task.valid, pad),
                                   corrupted=task.corrupted.masked_fill(~task.valid, pad))
    return task


def _shared_ablation(model: Model, task: Task, ablation: Ablation, reference: Task | None,
                     batch_size: int | None) -> torch.Tensor | None:
    """The sender outputs every chunk shares (mean and zero ablations); None for resample."""
    if ablation not in (Ablation.MEAN, Ablation.MEAN_POS, Ablation.ZERO):
        return None
    ref = reference or task
    return patching.ablated_outputs(model.weights, model.graph, ablation, corrupted=task.corrupted,
                                    reference=ref.corrupted if reference is None else ref.clean,
                                    reference_valid=ref.valid, batch_size=batch_size)


def _same_padding(pad: int | None, task: Task) -> bool:
    """Whether a patched forward on the clean tokens masks the same keys as the corrupted run
    (so that the empty circuit's logits are the corrupted run's)."""
    return pad is None or bool(((task.clean == pad) == (task.corrupted == pad)).all())


def _rows(n: int, size: int | None):
    size = size or n
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def prepare(model: Model, task: Task, ablation: Ablation = Ablation.RESAMPLE, *,
            batch_size: int | None = None, reference: Task | None = None,
            positions: Positions | None = None, keep_clean_graph: bool = False) -> Setup:
    """Cache the clean runs and ablated outputs of a task, in chunks of `batch_size` examples.

    Mean ablations average over `reference` (default: the task's corrupted prompts). The caches
    are kept for every chunk (many forwards reuse them): memory grows with the rows; for a few
    forwards over many rows, `evaluate_streaming` keeps nothing between chunks.
    positions: the task's token positions (`circuits.positions.of_task`) for position-aware masks.
    keep_clean_graph: run the clean forward with gradient taps and keep its autograd graph for
    one later EAP backward (saves EAP its own clean forward; costs the graph's memory until then).
    """
    w, g = model.weights, model.graph
    task = _checked(model, task)
    shared = _shared_ablation(model, task, ablation, reference, batch_size)
    chunks = []
    for rows in _rows(len(task), batch_size):
        sub = task.subset(range(rows.start, rows.stop))
        corrupted_logits = None
        if shared is not None:
            ablated = shared if shared.shape[2] == 1 else shared[:, :, : sub.clean.shape[1]]
        else:                   # resample: the corrupted run, its logits kept as m(∅)'s
            with torch.no_grad():
                corrupted = patching.run(w, g, sub.corrupted.to(w.device), positions=sub.positions, record=True)
            ablated = corrupted.outputs
            if _same_padding(w.arch.pad_token_id, sub):
                corrupted_logits = corrupted.logits
            del corrupted
        graph = {}
        if keep_clean_graph:
            tokens = sub.clean.to(w.device)
            with torch.enable_grad():
                run = patching.run(w, g, tokens, positions=sub.positions, record=True, taps=True,
                                   embeds=patching.embed(w, tokens).detach().requires_grad_(True))
            graph["run"] = run
            clean = patching.Run(run.logits.detach(), run.outputs.detach(), [r.detach() for r in run.resid])
        else:
            with torch.no_grad():
                clean = patching.run(w, g, sub.clean.to(w.device), positions=sub.positions, record=True)
        groups = None if positions is None else positions.rows(rows, sub.clean.shape[1])
        chunks.append(Chunk(rows, sub, ablated, clean, clean.logits, groups, corrupted_logits, _graph=graph))
    setup = Setup(model, task, ablation, tuple(chunks), positions)
    check_metric(setup.clean_metric(), task, "clean")
    return setup


STREAMING_BATCH = 64


def evaluate_streaming(model: Model, task: Task, ablation: Ablation, masks: dict[str, torch.Tensor], *,
                       batch_size: int | None = None, progress: bool = False,
                       positions: Positions | None = None,
                       neurons: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Mean metric of the clean run, the corrupted run and each circuit (`masks`: name → [S, R]
    bool, or [P, S, R] at position grain with `positions`, the task's token positions), one
    chunk of `batch_size` examples (default STREAMING_BATCH) at a time with nothing kept between
    chunks, so peak memory follows the batch size, not the number of rows. neurons: name → [S, d]
    bool neuron mask of that circuit (the other output dimensions ablated).

    Per chunk: one clean forward, one corrupted forward (which also records the resample
    ablation's sender outputs), one forward per circuit: no more work than `prepare` plus one
    `Setup.metric` per circuit."""
    from tqdm.auto import tqdm
    w, g = model.weights, model.graph
    task = _checked(model, task)
    shared = _shared_ablation(model, task, ablation, None, batch_size or STREAMING_BATCH)
    sums = {"clean": 0.0, "corrupted": 0.0, **{name: 0.0 for name in masks}}
    clean_values = []
    rows_all = _rows(len(task), batch_size or STREAMING_BATCH)
    for rows in tqdm(rows_all, desc="evaluating", unit="batch", disable=not progress or len(rows_all) < 2):
        sub = task.subset(range(rows.start, rows.stop))
        with torch.no_grad():
            clean = patching.run(w, g, sub.clean.to(w.device), positions=sub.positions).logits
            corrupted = patching.run(w, g, sub.corrupted.to(w.device), positions=sub.positions,
                                     record=shared is None)
            if shared is None:
                ablated = corrupted.outputs
            else:
                ablated = shared if shared.shape[2] == 1 else shared[:, :, : sub.clean.shape[1]]
            values = metric_values(task.metric, clean, sub, clean)
            clean_values.append(values)
            sums["clean"] += values.sum().item()
            sums["corrupted"] += metric_values(task.metric, corrupted.logits, sub, clean).sum().item()
            del corrupted
            for name, mask in masks.items():
                coef = (~mask.bool() & g.allowed).to(w.dtype)
                groups = None
                if coef.dim() == 3:
                    if positions is None:
                        raise ValueError(f"circuit {name} is position-aware ([P, S, R]): pass the task's positions")
                    groups = positions.rows(rows, sub.clean.shape[1])
                logits = patching.run(w, g, sub.clean.to(w.device), positions=sub.positions, coef=coef,
                                      ablated=ablated, groups=groups,
                                      neurons=None if neurons is None else neurons.get(name)).logits
                sums[name] += metric_values(task.metric, logits, sub, clean).sum().item()
    check_metric(torch.cat(clean_values), task, "clean")
    return {k: v / len(task) for k, v in sums.items()}
