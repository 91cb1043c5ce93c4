"""Discovery: score or search, select, prune, and record how the circuit was made."""

from __future__ import annotations

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


def _apply(setup: Setup, scores: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, int | None]:
    """(mask, edges selected before pruning; None for the faithfulness target)."""
    g = setup.graph
    if sel.top_n is not None:
        mask = select.top_n(g, scores, sel.top_n)
    elif sel.threshold is not None:
        mask = select.threshold(g, scores, sel.threshold)
    elif sel.greedy is not None:
        mask = select.greedy(g, scores, sel.greedy)
    else:
        return smallest_faithful(setup, scores, sel.target_faithfulness, sel.prune), None
    selected = int((mask & g.allowed).sum())
    return (select.prune(g, mask) if sel.prune else mask), selected


def smallest_faithful(setup: Setup, scores: torch.Tensor, target: float, prune: bool = True) -> torch.Tensor:
    """The smallest top-n circuit (by |score|) whose measured faithfulness reaches target.

    Faithfulness is not monotone in n, so this bisects on a monotone envelope: the first n on a
    doubling grid that reaches the target, then bisection between it and the previous grid point.
    """
    g = setup.graph

    def mask_for(n: int) -> torch.Tensor:
        m = select.top_n(g, scores, n)
        return select.prune(g, m) if prune else m

    empty = setup.metric(g.empty_mask()).mean().item()
    full = setup.clean_metric().mean().item()
    if behaviour_gap(full, empty) is None:
        return mask_for(1)          # nothing to explain: no size is more faithful than another

    def faithful(n: int) -> bool:
        return normalized_faithfulness(setup.metric(mask_for(n)).mean().item(), empty, full) >= target

    hi = 1
    while hi < g.n_edges and not faithful(hi):
        hi *= 2
    hi = min(hi, g.n_edges)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if faithful(mid):
            hi = mid
        else:
            lo = mid
    return mask_for(hi)


HYBRID_CANDIDATE_FAITHFULNESS = 0.95


def run(setup: Setup, method: str, *, selection: Selection = Selection(), tau: float | None = None,
        steps: int | None = None, candidates: int | None = None, acdc_metric: Metric | None = None,
        checkpoint=None, resume: bool = False, checkpoint_every: float = 30.0,
        method_params: dict | None = None,
        progress: bool = False, seed: int = 0, provenance: dict | None = None) -> Discovery:
    """Find a circuit with `method` (a registered scoring method, `acdc`, or `hybrid`).

    method_params: the scoring method's own parameters, over its registered defaults (checked)."""
    g = setup.graph
    t0 = time.perf_counter()
    params: dict = {}
    details: dict = {}
    if method in ("acdc", "hybrid"):
        tau = 0.01 if tau is None else tau
        if acdc_metric is None:       # ACDC's own choice, KL, unless the task's metric is a divergence
            acdc_metric = setup.task.metric if setup.task.metric.is_divergence else Metric.KL
        params = {"tau": tau, "acdc_metric": acdc_metric.value}
        start_mask = None
        if method == "hybrid":
            scores0 = methods.get("eap-ig-activations").score(setup, steps=steps or 5)
            if candidates is None:
                # a superset that already carries the behaviour: ACDC only has to thin it out
                start_mask = smallest_faithful(setup, scores0, HYBRID_CANDIDATE_FAITHFULNESS, prune=False)
            else:
                start_mask = select.top_n(g, scores0, candidates)
            n_cand = int((start_mask & g.allowed).sum())
            params.update({"candidates": n_cand, "candidate_method": "eap-ig-activations"})
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
        mask, selected = _apply(setup, scores, selection)
        params["selection"] = selection.describe()
        if selected is not None:
            details = {"selected_before_pruning": selected}
    seconds = time.perf_counter() - t0
    faith = setup.faithfulness(mask)
    prov = {"model": setup.model.spec, "task": {"name": setup.task.name, **setup.task.meta,
                                                 "examples": len(setup.task)},
            "metric": setup.task.metric.value, "ablation": setup.ablation.value, "method": method,
            "parameters": params, "seed": seed, "package_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3), "faithfulness": faith["faithfulness"]}
    if "direction" in params:
        prov["direction"] = params["direction"]
    if "source" in setup.model.meta:       # e.g. a GGUF file: its sha256 and quantization
        prov["model_source"] = setup.model.meta["source"]
    prov.update(provenance or {})
    return Discovery(Circuit(g, mask, scores.float(), prov), faith, seconds, details)
