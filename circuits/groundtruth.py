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
