"""Scoring a method against a known circuit: ROC curves and AUROC, edge- and node-level."""

from __future__ import annotations

import torch

from circuits.graph import Graph


def roc(scores: torch.Tensor, truth: torch.Tensor) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) sweeping a threshold down the scores.

    scores, truth: 1-D, same length; ties are swept together."""
    scores, truth = scores.flatten().float(), truth.flatten().bool()
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both positive and negative items in the ground truth")
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], truth[order]
    fpr, tpr = [0.0], [0.0]
    tp = fp = 0
    for i in range(len(s)):
        tp += int(t[i])
        fp += int(not t[i])
        if i + 1 == len(s) or s[i + 1] != s[i]:
            fpr.append(fp / neg)
            tpr.append(tp / pos)
    return fpr, tpr


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    fpr, tpr = roc(scores, truth)
    return sum((fpr[i + 1] - fpr[i]) * (tpr[i] + tpr[i + 1]) / 2 for i in range(len(fpr) - 1))


def edge_auroc(graph: Graph, scores: torch.Tensor, truth_mask: torch.Tensor) -> float:
    """AUROC of |edge scores| against a ground-truth edge mask, over the graph's edges."""
    allowed = graph.allowed
    return auroc(scores.abs()[allowed], truth_mask.bool()[allowed])


def node_auroc(graph: Graph, node_scores: torch.Tensor, truth_nodes: set[str]) -> float:
    """AUROC of node scores against a set of ground-truth node names (heads and MLPs only)."""
    idx = [i for i, n in enumerate(graph.nodes) if n not in ("input", "logits")]
    truth = torch.tensor([graph.nodes[i] in truth_nodes for i in idx])
    return auroc(node_scores[idx], truth)


def truth_nodes(graph: Graph, truth_mask: torch.Tensor) -> set[str]:
    """Heads and MLPs that touch a ground-truth edge: the node-level ground truth."""
    touched = graph.node_mask(truth_mask.bool())
    return {n for n, t in zip(graph.nodes, touched.tolist()) if t} - {"input", "logits"}


def sweep_auroc(graph: Graph, masks: list[torch.Tensor], truth_mask: torch.Tensor) -> float:
    """AUROC of a family of circuits (e.g. ACDC over a τ sweep) against a ground-truth mask.

    Each circuit is one (FPR, TPR) point; with (0, 0) and (1, 1) added and the points sorted,
    each keeps the best TPR reached at or before its FPR (any member of the family can be
    chosen), joined by straight lines as in the ACDC paper's ROC plots. A member equal to the
    ground truth gives 1.0; the empty and the full circuit alone give 0.5.
    """
    allowed, truth = graph.allowed, truth_mask.bool() & graph.allowed
    pos, neg = int(truth.sum()), int((allowed & ~truth).sum())
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both positive and negative edges in the ground truth")
    points = [(0.0, 0.0), (1.0, 1.0)]
    for m in masks:
        m = m.bool() & allowed
        points.append((int((m & ~truth).sum()) / neg, int((m & truth).sum()) / pos))
    points.sort()
    area, best, prev_x, prev_y = 0.0, 0.0, 0.0, 0.0
    for x, y in points:
        best = max(best, y)
        area += (x - prev_x) * (prev_y + best) / 2
        prev_x, prev_y = x, best
    return area
