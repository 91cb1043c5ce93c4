"""Methods on the shipped induction model, and what the hybrid (attribution picks, ACDC decides)
saves against plain ACDC. Ratios measured in one run; not a timed test.

    python bench/bench_default.py [--model induction-2l] [--n 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="induction-2l")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tau", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from circuits import discover, evaluation, methods, patching
    from circuits.model import loader
    from circuits.tasks import builtin
    from circuits.verify.checks import jaccard

    model = loader.load(args.model)
    task = builtin.build_task("induction", model, n=args.n)
    setup = evaluation.prepare(model, task)
    w, g = model.weights, model.graph

    def forward():
        with torch.no_grad():
            patching.run(w, g, task.clean, positions=task.positions)

    forward()
    t = time.perf_counter()
    for _ in range(10):
        forward()
    F = (time.perf_counter() - t) / 10
    out = {"model": args.model, "examples": len(task), "edges": g.n_edges, "F_seconds": round(F, 5)}
    for name in ("eap", "eap-ig-activations", "exact"):
        t = time.perf_counter()
        methods.get(name).score(setup)
        out[f"{name}_over_F"] = round((time.perf_counter() - t) / F, 2)
    full = discover.run(setup, "acdc", tau=args.tau)
    hybrid = discover.run(setup, "hybrid", tau=args.tau)          # default candidates
    out["acdc"] = {"seconds": round(full.seconds, 3), "edges_tested": full.details["edges_tested"],
                   "forwards_per_edge_tested": round(full.seconds / full.details["edges_tested"] / F, 3),
                   "edges": full.circuit.n_edges, "faithfulness": round(full.faithfulness["faithfulness"], 3)}
    out["hybrid"] = {"seconds": round(hybrid.seconds, 3), "edges_tested": hybrid.details["edges_tested"],
                     "candidates": hybrid.circuit.provenance["parameters"]["candidates"],
                     "edges": hybrid.circuit.n_edges, "faithfulness": round(hybrid.faithfulness["faithfulness"], 3),
                     "time_saved_vs_acdc": round(1 - hybrid.seconds / full.seconds, 3),
                     "edge_jaccard_vs_acdc": round(jaccard(full.circuit.mask, hybrid.circuit.mask), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
