"""Ratios against the plain model, measured in one run (not a timed test).

    python bench/bench_methods.py [--model random:gpt2-small] [--n 32] [--len 16] [--threads 2]

Floors: F = one forward of the plain Hugging Face model (full logits), FB = one forward and one
backward of it (loss.backward(), parameter gradients included), as a user would run it.
Prints: EAP end to end (preparing the setup: its clean and corrupted forwards, then the scores) /
(2F + 1FB-backward), the scoring step alone / same, EAP-IG / same per step, one circuit evaluation / F,
ACDC forwards per edge tested (wall time / (edges tested x F)), and peak memory of EAP and
EAP-IG over the peak of one plain forward+backward (each measured in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def timeit(fn, repeat=3):
    fn()                                             # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make(model_spec, n, length):
    from circuits import evaluation
    from circuits.model import loader
    from circuits.tasks.task import from_pairs
    model = loader.load(model_spec, check=False)
    g = torch.Generator().manual_seed(0)
    hi = min(model.arch.d_vocab, 50000)
    clean = torch.randint(1, hi, (n, length), generator=g)
    corr = clean.clone()
    corr[:, : length // 2] = torch.randint(1, hi, (n, length // 2), generator=g)
    ans = torch.randint(1, hi, (n, 1), generator=g)
    wrong = torch.randint(1, hi, (n, 1), generator=g)
    task = from_pairs("bench", clean.tolist(), corr.tolist(), ans.tolist(), wrong.tolist())
    return model, task, evaluation


def hf_module(model):
    return model.bridge.original_model


def peak_child(args, what):
    """Peak RSS growth (MiB) of one operation, in a fresh process."""
    cmd = [sys.executable, __file__, "--model", args.model, "--n", str(args.n), "--len", str(args.len),
           "--threads", str(args.threads), "--child", what]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def child(args):
    torch.set_num_threads(args.threads)
    model, task, evaluation = make(args.model, args.n, args.len)
    from circuits import methods
    setup = evaluation.prepare(model, task) if args.child != "plain" else None
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:      # reset the peak-RSS counter (Linux)
        f.write("5")
    base = _status_kib("VmRSS")
    if args.child == "plain":
        m = hf_module(model)
        for p in m.parameters():
            p.requires_grad_(True)
        logits = m(task.clean)
        logits = getattr(logits, "logits", logits)
        logits[:, -1].logsumexp(-1).sum().backward()
    elif args.child == "eap":
        methods.get("eap").score(setup)
    else:
        methods.get("eap-ig-activations").score(setup, steps=5)
    print((_status_kib("VmHWM") - base) / 1024)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def acdc_cost(setup, g, scores, F, budget):
    """ACDC forwards per tested edge, weighted over a whole run.

    For a few layers L: edges into later receivers are already pruned to a sparse circuit (as they
    are when a real run reaches L: EAP's top 5% of edges, pruned), the receivers of L are searched for `budget` tests, and the
    wall time per tested edge is divided by F. Layers in between take the nearest measured cost;
    the average is weighted by the number of edges into each layer's receivers.
    """
    from circuits import select
    from circuits.methods.acdc import acdc
    L = g.arch.n_layers
    # what later layers look like when a run reaches L: a sparse circuit whose dead nodes have
    # already lost their incoming edges (ACDC removes those without tests)
    sparse = select.prune(g, select.top_n(g, scores, max(1, g.n_edges // 20)))
    layer_cols = {l: [c for c in range(g.n_receivers) if g.receivers[c].layer == l] for l in range(L)}
    measured = {}
    for layer in sorted({0, L // 3, (2 * L) // 3, L - 1}):
        cols = layer_cols[layer]
        start = sparse.clone()
        start[:, cols] = g.allowed[:, cols]
        res = acdc(setup, 1e-4, start_mask=start, receivers=cols, max_tests=budget)
        measured[layer] = {"tested": res.tested, "kept": int(res.mask[:, cols].sum()),
                           "forwards_per_edge": res.seconds / max(1, res.tested) / F}
    total = weighted = 0.0
    for layer in range(L):
        nearest = min(measured, key=lambda m: abs(m - layer))
        n = float(g.n_inputs[layer_cols[layer]].sum())
        total += n
        weighted += n * measured[nearest]["forwards_per_edge"]
    return weighted / total, {str(k): {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                              for k, v in measured.items()}


def floors(m, tokens):
    """The floors every ratio divides by: one plain forward of the Hugging Face module (no grad,
    full logits) and one forward + backward (parameter gradients), as two callables."""
    for p in m.parameters():
        p.requires_grad_(True)

    def plain_forward():
        with torch.no_grad():
            m(tokens)

    def plain_fb():
        out = m(tokens)
        out = getattr(out, "logits", out)
        out[:, -1].logsumexp(-1).sum().backward()
        m.zero_grad(set_to_none=True)
    return plain_forward, plain_fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:gpt2-small")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--acdc-edges", type=int, default=120, help="ACDC edge tests per sampled layer")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    from circuits import methods, select

    model, task, evaluation = make(args.model, args.n, args.len)
    plain_forward, plain_fb = floors(hf_module(model), task.clean)

    # the floor is re-measured around each slow phase: this machine's speed drifts by 10-20%
    F = timeit(plain_forward, repeat=7)
    FB = timeit(plain_fb, repeat=5)
    floor_eap = F + FB                      # 2 forwards + 1 backward
    setup = evaluation.prepare(model, task)
    g = model.graph
    eap_t = timeit(lambda: methods.get("eap").score(setup))
    eap_e2e_t = timeit(lambda: methods.get("eap").score(evaluation.prepare(model, task)))
    ig_t = timeit(lambda: methods.get("eap-ig-activations").score(setup, steps=5), repeat=1)
    scores = methods.get("eap").score(setup)
    mask = select.prune(g, select.top_n(g, scores, max(1, g.n_edges // 10)))
    eval_t = timeit(lambda: setup.metric(mask))
    rand = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0))
    rand_mask = select.top_n(g, rand, g.n_edges // 10)
    rand_t = timeit(lambda: setup.metric(rand_mask), repeat=1)
    full_t = timeit(lambda: setup.metric(g.full_mask()))
    F_acdc = timeit(plain_forward, repeat=5)
    acdc_per_edge, acdc_detail = acdc_cost(setup, g, scores, F_acdc, args.acdc_edges)
    result = {
        "model": args.model, "batch": [args.n, args.len], "threads": args.threads,
        "F_seconds": round(F, 4), "FB_seconds": round(FB, 4), "F_seconds_at_acdc": round(F_acdc, 4),
        "eap_end_to_end_over_2F_plus_B": round(eap_e2e_t / floor_eap, 3),
        "eap_scoring_only_over_2F_plus_B": round(eap_t / floor_eap, 3),
        "eap_ig5_over_2F_plus_B": round(ig_t / floor_eap, 3),
        "eap_ig5_per_step_over_F_plus_B": round(ig_t / 5 / FB, 3),
        "circuit_eval_pruned_top10pct_over_F": round(eval_t / F, 3),
        "circuit_edges": int(mask.sum()),
        "circuit_eval_random_10pct_over_F": round(rand_t / F, 3),
        "circuit_eval_full_over_F": round(full_t / F, 3),
        "acdc_forwards_per_edge_tested": round(acdc_per_edge, 3),
        "acdc_per_layer": acdc_detail,
    }
    plain_peak = peak_child(args, "plain")
    result["peak_mib_plain_forward_backward"] = round(plain_peak, 1)
    result["peak_eap_over_plain"] = round(peak_child(args, "eap") / plain_peak, 3)
    result["peak_eap_ig_over_plain"] = round(peak_child(args, "ig") / plain_peak, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
