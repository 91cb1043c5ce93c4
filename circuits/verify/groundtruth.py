"""Scoring a method against a known circuit: ROC curves and AUROC, edge- and node-level."""

from __future__ import annotations

import torch

from circuits import evaluation
from circuits.graph import Channel, Graph
from circuits.patching import Ablation
from circuits.select import prune
from circuits.tasks.generators import tracr_task


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


# ---- tracr models: ground truth computed by ablation -----------------------------------------

def _nonzero(t: torch.Tensor, dim: int) -> torch.Tensor:
    return (t != 0).any(dim)


def _writes(weights, graph) -> torch.Tensor:
    """[S, d] bool: the residual directions each sender writes."""
    writes = torch.zeros(graph.n_senders, weights.arch.d_model, dtype=torch.bool)
    writes[0] = _nonzero(weights.W_E, 0)
    if weights.W_pos is not None:
        writes[0] |= _nonzero(weights.W_pos, 0)
    index = graph.sender_index
    for layer, lw in enumerate(weights.layers):
        for h in range(weights.arch.n_heads):
            writes[index[f"a{layer}.h{h}"]] = _nonzero(lw.W_O[h], 0)
        if weights.arch.has_mlp:
            writes[index[f"m{layer}"]] = _nonzero(lw.W_out, 0) | (lw.b_out != 0)
    return writes


def _reads(weights, graph) -> torch.Tensor:
    """[R, d] bool: the residual directions each receiver reads."""
    reads = torch.zeros(graph.n_receivers, weights.arch.d_model, dtype=torch.bool)
    for r, rec in enumerate(graph.receivers):
        if rec.channel is Channel.LOGITS:
            reads[r] = _nonzero(weights.W_U, 1)
            continue
        lw = weights.layers[rec.layer]
        matrix = {Channel.Q: lw.W_Q[rec.index], Channel.K: lw.W_K[rec.index], Channel.V: lw.W_V[rec.index],
                  Channel.MLP: lw.W_in}[rec.channel]
        reads[r] = _nonzero(matrix, 1)
    return reads


def structural_mask(weights, graph) -> torch.Tensor:
    """[S, R] bool: edges whose sender writes a residual direction the receiver reads.

    Kept only on input→logits paths of such edges.
    """
    overlap = _writes(weights, graph).float() @ _reads(weights, graph).float().T > 0
    return prune(graph, overlap & graph.allowed)


def carried(weights, graph, labels: list[str]) -> dict[str, list[str]]:
    """Per structural edge name: the SOps (residual label prefixes) written by its sender and
    read by its receiver."""
    writes, reads = _writes(weights, graph), _reads(weights, graph)
    out = {}
    for s, r in torch.nonzero(structural_mask(weights, graph)).tolist():
        dims = torch.nonzero(writes[s] & reads[r]).flatten().tolist()
        out[graph.edge_name(s, r)] = sorted({labels[i].split(":")[0] for i in dims})
    return out


def ground_truth(setup, tol: float = 1e-4) -> torch.Tensor:
    """[S, R] bool: the ground truth on the setup's task, under the setup's ablation.

    Structural edges (`structural_mask`) whose ablation alone changes the output logits of
    some example by more than `tol`, kept on input→logits paths. Drops edges that carry a
    direction the program never uses on these inputs, e.g. the query and key of tracr's
    selector-width head, whose always-true selector gives the same pattern whatever they read.
    """
    g = setup.graph
    structural = structural_mask(setup.model.weights, g)
    edges = torch.nonzero(structural).tolist()
    coef = torch.zeros(len(edges), g.n_senders, g.n_receivers, dtype=setup.model.weights.dtype)
    for i, (s, r) in enumerate(edges):
        coef[i, s, r] = 1.0
    keep = torch.zeros_like(structural)
    for chunk in setup.chunks:
        patched = setup.logits(coef, chunk).reshape(len(edges), len(chunk.task), -1)
        change = (patched - chunk.clean_logits[None]).abs().amax((1, 2))
        for i, (s, r) in enumerate(edges):
            keep[s, r] |= bool(change[i] > tol)
    return prune(g, keep)


GROUND_TRUTH_DATA = {"task": "tracr", "n": 200, "seed": 0}


def ground_truth_record(model) -> dict:
    """What `tasks/build_tracr.py` writes into meta.json: per ablation (zero, resample), the
    ground-truth edges on the recorded dataset, and the SOps each structural edge carries."""
    data = tracr_task(model, n=GROUND_TRUTH_DATA["n"], seed=GROUND_TRUTH_DATA["seed"])
    out = {"dataset": dict(GROUND_TRUTH_DATA),
           "carries": carried(model.weights, model.graph, model.meta["tracr"]["residual_labels"])}
    for ablation in (Ablation.ZERO, Ablation.RESAMPLE):
        mask = ground_truth(evaluation.prepare(model, data, ablation))
        out[ablation.value] = model.graph.edge_names(mask)
    return out


def shipped_ground_truth(model, ablation: str = "zero") -> torch.Tensor:
    """[S, R] bool: the ground truth recorded in a shipped tracr model's meta.json."""
    truth = model.meta.get("tracr", {}).get("ground_truth")
    if not truth or ablation not in truth:
        raise ValueError(f"{model.spec} ships no tracr ground truth for {ablation} ablation")
    return model.graph.mask_from_edges(truth[ablation])
