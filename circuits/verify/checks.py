"""Verify a circuit with real interventions: every number here comes from patched forwards.

- faithfulness: normalized (m(C) − m(∅)) / (m(M) − m(∅)) and raw, with the ablation named;
- the faithfulness curve at the MIB sizes, with CPR (area under f) and CMD (area under |1 − f|);
- completeness (Wang et al. 2023): knock out random subsets K of the circuit's components from
  the circuit and from the model, compare F(C∖K) with F(M∖K);
- minimality: faithfulness lost without each component; components that are not needed (above
  `MINIMALITY_SAMPLE` components, a random sample of them, with the share not needed estimated
  and its 95% interval stated);
- ablation sensitivity: faithfulness under resample, mean and zero ablation;
- stability: rediscover on bootstrap resamples of the task and compare (Jaccard).
Every check takes position-aware [P, S, R] masks from a setup prepared with positions; a
component there is a sender at every position.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import math

import torch
from tqdm.auto import tqdm

from circuits import select
from circuits.evaluation import Setup, normalized_faithfulness, prepare
from circuits.graph import Graph
from circuits.patching import Ablation
from circuits.positions import Positions

MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
MINIMALITY_SAMPLE = 40       # components tested one by one at most; above, a random sample


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="eval", disable=not progress, leave=False)


@dataclass(frozen=True)
class CurvePoint:
    percent: float
    edges: int
    faithfulness: float


def normalized(setup: Setup, mask: torch.Tensor, empty: float, full: float) -> float:
    return normalized_faithfulness(setup.metric(mask).mean().item(), empty, full)


def baselines(setup: Setup) -> tuple[float, float]:
    """(m(∅), m(M)): the empty circuit under the setup's ablation, and the clean model."""
    return setup.empty_metric(), setup.clean_metric().mean().item()


RANKINGS = ("signed", "abs")


def faithfulness_curve(setup: Setup, scores: torch.Tensor, percents=MIB_PERCENTS,
                       absolute: bool = True, base: tuple[float, float] | None = None,
                       progress: bool = False) -> list[CurvePoint]:
    """Faithfulness of the top-k% edges, for each k, as the MIB circuit track builds them:
    int(k · n_edges) edges by |score| (absolute) or by signed score, then pruned; f not clipped.
    base: (m(∅), m(M)) when already measured."""
    g = setup.graph
    empty, full = base or baselines(setup)
    points = []
    bar = _bar(len(percents), "faithfulness curve", progress)
    for pct in percents:
        n = int(pct / 100 * setup.n_edges)
        mask = select.prune(g, select.top_n(g, scores, n, absolute=absolute))
        points.append(CurvePoint(pct, n, normalized(setup, mask, empty, full)))
        bar.update(1)
    bar.close()
    return points


def area_under(xs: list[float], ys: list[float]) -> float:
    """Trapezoidal area over x (here: the fraction of edges, 0..1)."""
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def cpr_cmd(points: list[CurvePoint]) -> tuple[float, float]:
    """MIB's integrated metrics of one curve: CPR = ∫ f and CMD = ∫ |1 − f| by the trapezoidal
    rule between neighbouring sizes, x = fraction of edges (0.001 … 1, linear, not divided by
    the x-range)."""
    xs = [p.percent / 100 for p in points]
    fs = [p.faithfulness for p in points]
    return area_under(xs, fs), area_under(xs, [abs(1 - f) for f in fs])


@dataclass(frozen=True)
class MIBScores:
    """The circuit-track figures of one set of edge scores.

    CPR is read off the curve of circuits chosen by signed score (edges that push toward the
    clean answer; leaving out the ones that push against it lets f exceed 1), CMD off the curve
    chosen by |score|: MIB's pairing. Each curve's other area is kept too, labelled."""

    signed: list[CurvePoint]
    absolute: list[CurvePoint]

    @property
    def cpr(self) -> float:
        return cpr_cmd(self.signed)[0]

    @property
    def cmd(self) -> float:
        return cpr_cmd(self.absolute)[1]

    def as_dict(self) -> dict:
        out = {"CPR": self.cpr, "CMD": self.cmd, "pairing": "CPR by signed score, CMD by |score| (MIB)"}
        for label, points in (("signed", self.signed), ("abs", self.absolute)):
            cpr, cmd = cpr_cmd(points)
            out[f"by_{label}_score"] = {"points": [vars(p) for p in points], "CPR": cpr, "CMD": cmd}
        return out


def mib_scores(setup: Setup, scores: torch.Tensor, percents=MIB_PERCENTS, progress: bool = False) -> MIBScores:
    """Both MIB curves of `scores` on the setup's examples (the test set, held out)."""
    base = baselines(setup)
    return MIBScores(faithfulness_curve(setup, scores, percents, absolute=False, base=base, progress=progress),
                     faithfulness_curve(setup, scores, percents, absolute=True, base=base, progress=progress))


def _components(graph: Graph, mask: torch.Tensor) -> list[int]:
    nodes = graph.node_mask(mask if mask.dim() == 2 else mask.any(0))
    return [i for i in range(1, graph.n_senders) if nodes[i]]


def _without_senders(mask: torch.Tensor, senders: list[int]) -> torch.Tensor:
    out = mask.clone()
    out[..., senders, :] = False
    return out


def completeness_subsets(graph: Graph, mask: torch.Tensor, n_subsets: int = 16, seed: int = 0) -> list[list[int]]:
    """Half single components, the rest random halves of the circuit's components."""
    comps = _components(graph, mask)
    rng = random.Random(seed)
    subsets = [[c] for c in comps[:n_subsets // 2]]
    while len(subsets) < n_subsets and comps:
        subsets.append(sorted(c for c in comps if rng.random() < 0.5) or [rng.choice(comps)])
    return subsets


def completeness(setup: Setup, mask: torch.Tensor, n_subsets: int = 16, seed: int = 0,
                 progress: bool = False) -> dict:
    """Wang et al.'s completeness: for random subsets K of the circuit's components, compare the
    metric of C∖K with that of M∖K. A complete circuit has small gaps for every K."""
    g = setup.graph
    subsets = completeness_subsets(g, mask, n_subsets, seed)
    full = setup.full_mask()
    rows = []
    bar = _bar(2 * len(subsets), "completeness", progress)
    for K in subsets:
        f_c = setup.metric(_without_senders(mask, K)).mean().item()
        f_m = setup.metric(_without_senders(full, K)).mean().item()
        bar.update(2)
        rows.append({"knocked_out": [g.senders[s] for s in K], "circuit": f_c, "model": f_m,
                     "gap": abs(f_c - f_m)})
    bar.close()
    if not rows:
        return {"subsets": 0, "worst_gap": None, "median_gap": None, "worst": None, "median": None}
    rows.sort(key=lambda r: r["gap"])
    return {"subsets": len(rows), "worst_gap": rows[-1]["gap"], "median_gap": statistics.median(r["gap"] for r in rows),
            "worst": rows[-1], "median": rows[len(rows) // 2]}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial share k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def minimality_plan(graph: Graph, mask: torch.Tensor, sample: int = MINIMALITY_SAMPLE, seed: int = 0) -> tuple[list[int], int]:
    """(components to test, components in the circuit): all of them up to `sample`, else a random
    sample of that many (0: all)."""
    comps = _components(graph, mask)
    if sample and len(comps) > sample:
        return sorted(random.Random(seed).sample(comps, sample)), len(comps)
    return comps, len(comps)


def minimality(setup: Setup, mask: torch.Tensor, needed: float = 0.01, sample: int = MINIMALITY_SAMPLE,
               seed: int = 0, progress: bool = False) -> dict:
    """Faithfulness drop when each component's outgoing edges leave the circuit.

    Above `sample` components (0: never) a random sample of that many is tested: `not_needed` then
    lists those found among the sample, and `estimate` the share of all components not needed,
    k/n with its 95% Wilson interval (the stated error of the sample)."""
    g = setup.graph
    empty, full = baselines(setup)
    tested, total = minimality_plan(g, mask, sample, seed)
    bar = _bar(len(tested) + 1, f"minimality ({len(tested)} of {total} components)", progress)
    base = normalized(setup, mask, empty, full)
    bar.update(1)
    drops = {}
    for s in tested:
        drops[g.senders[s]] = base - normalized(setup, _without_senders(mask, [s]), empty, full)
        bar.update(1)
    bar.close()
    not_needed = sorted(n for n, d in drops.items() if d < needed)
    out = {"faithfulness": base, "drop": drops, "threshold": needed, "not_needed": not_needed,
           "components": total, "tested": len(tested)}
    if len(tested) < total:
        lo, hi = wilson(len(not_needed), len(tested))
        out["estimate"] = {"share_not_needed": len(not_needed) / len(tested), "interval_95": [lo, hi],
                           "sampled": len(tested), "of": total, "seed": seed}
    return out


SENSITIVITY_ABLATIONS = (Ablation.RESAMPLE, Ablation.MEAN, Ablation.ZERO)


def ablation_sensitivity(setup: Setup, mask: torch.Tensor, progress: bool = False) -> dict:
    """Faithfulness under each ablation; another ablation costs its preparation (about 2 forwards),
    its empty circuit and the circuit."""
    out = {}
    bar = _bar(len(SENSITIVITY_ABLATIONS), "ablations", progress)
    for ablation in SENSITIVITY_ABLATIONS:
        other = setup if ablation is setup.ablation else prepare(setup.model, setup.task, ablation,
                                                                 positions=setup.positions)
        empty, full = baselines(other)
        out[ablation.value] = normalized(other, mask, empty, full)
        bar.update(1)
    bar.close()
    return out


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def stability(setup: Setup, mask: torch.Tensor, rediscover, n_boot: int = 3, seed: int = 0) -> dict:
    """Jaccard between the circuit and circuits rediscovered on bootstrap resamples of the task.

    rediscover: Setup → mask (the same method and parameters as the original circuit)."""
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(n_boot):
        rows = torch.randint(0, len(setup.task), (len(setup.task),), generator=gen)
        sub = setup.task.subset(rows)
        positions = None
        if setup.positions is not None:
            positions = Positions(setup.positions.names, setup.positions.group[rows, : sub.clean.shape[1]])
        boot = prepare(setup.model, sub, setup.ablation, positions=positions)
        scores.append(jaccard(mask, rediscover(boot)))
    return {"bootstraps": n_boot, "jaccard": scores, "mean_jaccard": sum(scores) / len(scores) if scores else None}
