"""Discovery: score or search, select, prune, and record how the circuit was made."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from circuits import methods, select
from circuits.circuit import Circuit
from circuits.evaluation import Setup, behaviour_gap, normalized_faithfulness
from circuits.methods.acdc import acdc
from circuits.methods.registry import check_params
from circuits.tasks.task import Metric


def package_version() -> str:
    try:
        return version("circuits")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Selection:
    """How to turn scores into a mask; exactly one of the fields, or a faithfulness target."""

    top_n: int | None = None
    threshold: float | None = None
    greedy: int | None = None
    target_faithfulness: float = 0.8
    prune: bool = True

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Discovery:
    circuit: Circuit
    faithfulness: dict
    seconds: float
    details: dict = field(default_factory=dict)


def _apply(setup: Setup, scores: torch.Tensor, sel: Selection,
           progress: bool = False) -> tuple[torch.Tensor, int | None, Search | None]:
    """(mask, edges selected before pruning, the search when the faithfulness target chose it)."""
    g = setup.graph
    if sel.top_n is not None:
        mask = select.top_n(g, scores, sel.top_n)
    elif sel.threshold is not None:
        mask = select.threshold(g, scores, sel.threshold)
    elif sel.greedy is not None:
        mask = select.greedy(g, scores, sel.greedy)
    else:
        found = smallest_faithful(setup, scores, sel.target_faithfulness, sel.prune, progress=progress)
        return found.mask, found.n, found
    selected = int((mask & g.allowed).sum())
    return (select.prune(g, mask) if sel.prune else mask), selected, None


def search_tolerance(n_edges: int) -> int:
    """How close (in edges) the faithfulness search brackets the smallest faithful size: 1% of the
    graph, at least one edge. Finer steps change the circuit by a sliver and cost a forward each."""
    return max(1, n_edges // 100)


@dataclass(frozen=True)
class Search:
    """The faithfulness-target search's answer and the evaluations it spent.

    n: edges selected (before pruning) of the circuit returned; metric: its mean metric;
    tried: (n, faithfulness) in the order evaluated."""

    mask: torch.Tensor
    n: int
    metric: float | None
    faithfulness: float
    tolerance: int
    tried: tuple[tuple[int, float], ...]


def _first_guess(scores: torch.Tensor, allowed: torch.Tensor, target: float, lo: int, hi: int) -> int:
    """A cheap starting size: the top-n holding `target` of the total |score| mass."""
    mags = torch.sort(scores[allowed].abs().float(), descending=True).values
    total = float(mags.sum())
    if not total > 0:
        return hi
    n = int(torch.searchsorted(torch.cumsum(mags, 0), torch.tensor(target * total)).item()) + 1
    return min(max(n, lo), hi)


def smallest_faithful(setup: Setup, scores: torch.Tensor, target: float, prune: bool = True,
                      tolerance: int | None = None, progress: bool = False) -> Search:
    """The smallest top-n circuit (by |score|) whose measured faithfulness reaches `target`,
    to within `tolerance` edges (default `search_tolerance`): the answer n reaches it and n − tol
    (or the last size below n that was measured) does not.

    A bracketing search on the sorted scores: start at the size holding `target` of the |score|
    mass; if it falls short, the whole graph (faithfulness 1, known without a forward) closes the
    bracket, else step down by ÷4 to bracket the crossing; then interpolate on log n between the bracket's
    faithfulness values (regula falsi with the Illinois rule, so a saturating curve does not pin
    the steps to one end). Sizes
    are multiples of the tolerance, so no circuit below it is ever evaluated; each size is
    evaluated once. Faithfulness is not strictly monotone in n; the search assumes it is between
    the measured points.
    """
    from tqdm.auto import tqdm
    g = setup.graph
    N = g.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)   # at position grain [P, S, R]: P × E
    tol = tolerance or search_tolerance(N)

    def mask_for(n: int) -> torch.Tensor:
        m = select.top_n(g, scores, n)
        return select.prune(g, m) if prune else m

    empty = setup.empty_metric()
    full = setup.clean_metric().mean().item()
    if behaviour_gap(full, empty) is None:      # nothing to explain: no size is more faithful than another
        return Search(mask_for(tol), tol, None, float("nan"), tol, ())

    grid = lambda n: min(N, max(tol, -(-n // tol) * tol))   # round up onto the tolerance grid
    seen: dict[int, tuple[float, float]] = {}
    bar = tqdm(desc=f"faithfulness search (target {target:g}, ±{tol} edges)", unit="eval", disable=not progress)

    known = {N: (full, 1.0)}                    # the whole graph is the model: no forward needed

    def f(n: int) -> float:
        if n in known:
            return known[n][1]
        if n not in seen:
            m = setup.metric(mask_for(n)).mean().item()
            seen[n] = (m, normalized_faithfulness(m, empty, full))
            bar.update(1)
            bar.set_postfix(n=n, f=f"{seen[n][1]:.3f}", refresh=False)
        return seen[n][1]

    ok = lambda n: f(n) >= target
    n = grid(_first_guess(scores, g.allowed.expand_as(scores), target, tol, N))
    if ok(n):
        hi, lo = n, None
        while hi > tol:
            down = grid(hi // 4)
            if not ok(down):
                lo = down
                break
            hi = down
    else:                                       # the whole graph (f = 1) closes the bracket
        lo, hi = n, N
    # Regula falsi on log n with the Illinois rule: when one end of the bracket stays twice in a
    # row, its distance to the target counts half, so a saturating (concave) curve does not pin the
    # steps to one side.
    if lo is not None:
        g_lo, g_hi = f(lo) - target, f(hi) - target
    side = 0
    while lo is not None and hi - lo > tol:
        t = g_lo / (g_lo - g_hi) if g_hi > g_lo else 0.5
        mid = grid(int(lo * (hi / lo) ** min(max(t, 0.0), 1.0)))
        mid = min(max(mid, grid(lo + 1)), hi - tol)
        if hi - mid < 2 * tol:                  # the answer is within two steps of hi: one check
            mid = hi - tol                      # below it ends the search if it falls short
        if not lo < mid < hi:
            mid = grid((lo + hi) // 2)
            if not lo < mid < hi:
                break
        g_mid = f(mid) - target
        if g_mid >= 0:
            hi, g_hi = mid, g_mid
            if side == 1:
                g_lo /= 2
            side = 1
        else:
            lo, g_lo = mid, g_mid
            if side == -1:
                g_hi /= 2
            side = -1
    bar.close()
    m, faith = seen[hi] if hi in seen else known.get(hi, (None, float("nan")))
    tried = tuple((k, v[1]) for k, v in seen.items())
    return Search(mask_for(hi), hi, m, faith, tol, tried)


def _smallest(n_max: int, faithful) -> int:
    """The first n on a doubling grid with faithful(n), then bisection down from it."""
    hi = 1
    while hi < n_max and not faithful(hi):
        hi *= 2
    hi = min(hi, n_max)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if faithful(mid):
            hi = mid
        else:
            lo = mid
    return hi


def select_neurons(setup: Setup, neuron_scores: torch.Tensor, sel: Selection) -> torch.Tensor:
    """[S, d] bool: the output dimensions kept, chosen from neuron scores by `sel` (top-n and
    threshold count neurons; by default the fewest reaching the faithfulness target, every
    edge kept)."""
    values = neuron_scores.abs().flatten()
    order = torch.sort(values, descending=True, stable=True).indices

    def top(n: int) -> torch.Tensor:
        keep = torch.zeros(values.numel(), dtype=torch.bool)
        keep[order[:n]] = True
        return keep.view_as(neuron_scores)

    if sel.greedy is not None:
        raise ValueError("greedy selection grows edges; at neuron grain use --top-n or --threshold")
    if sel.top_n is not None:
        return top(sel.top_n)
    if sel.threshold is not None:
        return neuron_scores.abs() >= sel.threshold
    full_mask = setup.graph.full_mask()
    empty = setup.metric(setup.graph.empty_mask()).mean().item()
    full = setup.clean_metric().mean().item()
    if behaviour_gap(full, empty) is None:
        return top(1)

    def faithful(n: int) -> bool:
        m = setup.metric(full_mask, neurons=top(n)).mean().item()
        return normalized_faithfulness(m, empty, full) >= sel.target_faithfulness

    return top(_smallest(values.numel(), faithful))


HYBRID_CANDIDATE_FAITHFULNESS = 0.95


def run(setup: Setup, method: str, *, selection: Selection = Selection(), tau: float | None = None,
        steps: int | None = None, candidates: int | None = None, acdc_metric: Metric | None = None,
        checkpoint=None, resume: bool = False, checkpoint_every: float = 30.0,
        method_params: dict | None = None,
        progress: bool = False, seed: int = 0, provenance: dict | None = None,
        neurons: bool = False) -> Discovery:
    """Find a circuit with `method` (a registered scoring method, `acdc`, or `hybrid`).

    method_params: the scoring method's own parameters, over its registered defaults (checked).
    neurons: a neuron-level circuit instead: every edge kept, the output dimensions of each sender
    chosen by an attribution method's neuron scores (the selection counts neurons)."""
    g = setup.graph
    t0 = time.perf_counter()
    params: dict = {}
    details: dict = {}
    known_metric = None                 # the circuit's metric when the search already measured it
    kept_neurons = neuron_scores = None
    if neurons:
        if setup.positions is not None:
            raise ValueError("neuron masks are per sender, not per position: drop --positions or --neurons")
        if method_params:
            raise ValueError(f"neuron scores use {method}'s default gradient; "
                             f"{', '.join(sorted(method_params))} do(es) not apply at neuron grain")
        from circuits.methods.scoring import neuron_attribution
        params = {"steps": steps or 5} if "steps" in methods.get(method).defaults else {}
        found = neuron_attribution(setup, method, progress=progress, **params)
        scores, neuron_scores = found.edges, found.neurons
        kept_neurons = select_neurons(setup, neuron_scores, selection)
        mask = g.full_mask()
        params["selection"] = {**selection.describe(), "grain": "neurons"}
        details = {"neurons": int(kept_neurons.sum()), "total_neurons": kept_neurons.numel()}
    elif method in ("acdc", "hybrid"):
        tau = 0.01 if tau is None else tau
        if acdc_metric is None:       # ACDC's own choice, KL, unless the task's metric is a divergence
            acdc_metric = setup.task.metric if setup.task.metric.is_divergence else Metric.KL
        params = {"tau": tau, "acdc_metric": acdc_metric.value}
        start_mask = None
        if method == "hybrid":
            scores0 = methods.get("eap-ig-activations").score(setup, steps=steps or 5, progress=progress)
            if candidates is None:
                # a superset that already carries the behaviour: ACDC only has to thin it out
                start_mask = smallest_faithful(setup, scores0, HYBRID_CANDIDATE_FAITHFULNESS, prune=False,
                                               progress=progress).mask
            else:
                start_mask = select.top_n(g, scores0, candidates)
            n_cand = int((start_mask & g.allowed).sum())
            params.update({"candidates": n_cand, "candidate_method": "eap-ig-activations"})
            if progress:
                from tqdm.auto import tqdm
                tqdm.write(f"hybrid: ACDC examines {n_cand} of {setup.n_edges} edges, the candidates of an EAP-IG pass "
                           + ("(its smallest top-n with faithfulness >= "
                              f"{HYBRID_CANDIDATE_FAITHFULNESS:g})" if candidates is None else f"(its top {candidates})"), file=sys.stderr)
        result = acdc(setup, tau, metric=acdc_metric, start_mask=start_mask, checkpoint=checkpoint,
                      resume=resume, progress=progress, checkpoint_every=checkpoint_every,
                      settings={"method": method, "seed": seed})
        mask, scores = result.mask, result.scores
        if selection.prune:
            mask = select.prune(g, mask)
        details = {"edges_tested": result.tested, "forwards": result.forwards}
    else:
        spec = methods.get(method)
        kwargs = dict(spec.defaults)
        if steps is not None and "steps" in kwargs:
            kwargs["steps"] = steps
        if "seed" in kwargs:
            kwargs["seed"] = seed
        kwargs.update(check_params(method, dict(method_params or {})))
        params = dict(kwargs)
        scores = spec.score(setup, progress=progress, **kwargs)
        mask, selected, search = _apply(setup, scores, selection, progress)
        params["selection"] = selection.describe()
        details = {"selected_before_pruning": selected}
        if search is not None:
            known_metric = search.metric
            details["search"] = {"evaluations": len(search.tried), "tolerance_edges": search.tolerance,
                                 "tried": [{"n": n, "faithfulness": f} for n, f in search.tried]}
    seconds = time.perf_counter() - t0
    faith = setup.faithfulness(mask, known_metric, neurons=kept_neurons)
    prov = {"model": setup.model.spec, "task": {"name": setup.task.name, **setup.task.meta,
                                                 "examples": len(setup.task)},
            "metric": setup.task.metric.value, "ablation": setup.ablation.value, "method": method,
            "parameters": params, "seed": seed, "package_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3), "faithfulness": faith["faithfulness"],
            "dtype": str(setup.model.weights.dtype).removeprefix("torch.")}
    if "direction" in params:
        prov["direction"] = params["direction"]
    if "source" in setup.model.meta:       # e.g. a GGUF file: its sha256 and quantization
        prov["model_source"] = setup.model.meta["source"]
    prov.update(provenance or {})
    names = None if setup.positions is None else setup.positions.names
    return Discovery(Circuit(g, mask, scores.float(), prov, names, kept_neurons, neuron_scores),
                     faith, seconds, details)
