"""Position-aware EAP and circuit evaluation against the plain model, ratios in one run.

    nice -n 10 python bench/bench_positions.py [--model random:gpt2-small] [--n 32] [--len 16] [--threads 2]
                                               [--clock cpu]

Floors as in bench_methods.py: F = one forward of the plain Hugging Face model, FB = one forward
and backward of it. Prints: position-aware EAP / (2F + 1B) (with the position-summed EAP of the
same run beside it), one position-aware circuit evaluation / F (pruned top 1% and 10% of the
P × E position-edges by EAP), and peak memory of position-aware EAP over one plain
forward+backward (fresh subprocesses). Targets: ≤ 1.5, ≤ 1.5, ≤ 2.

Each time is paired with its floor measured right before it (the ratio's median over repeats is
reported), so the machine's speed drifting between phases does not enter the ratios. `--clock cpu`
times process CPU time instead of wall time: on a shared machine whose jobs are paused and resumed,
wall-clock ratios swing by 2x between runs (use it with --threads 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import statistics
import time

from bench_methods import _status_kib, floors, hf_module, make

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def paired(op, floors, repeat=3, clock=time.perf_counter):
    """Median over repeats of time(op) / Σ time(floor), each floor timed just before op."""
    op()                                             # warm-up
    ratios = []
    for _ in range(repeat):
        base = 0.0
        for floor in floors:
            t = clock()
            floor()
            base += clock() - t
        t = clock()
        op()
        ratios.append((clock() - t) / base)
    return round(statistics.median(ratios), 3)


def emit(result, key, value):
    result[key] = value
    print(f"{key}: {value}", file=sys.stderr, flush=True)     # progress, in case the run is cut short


def child(args):
    torch.set_num_threads(args.threads)
    model, task, evaluation = make(args.model, args.n, args.len)
    from circuits import methods, positions
    setup = None
    if args.child != "plain":
        setup = evaluation.prepare(model, task, positions=positions.of_task(task) if args.child == "pos" else None)
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
    else:
        methods.get("eap").score(setup)
    print((_status_kib("VmHWM") - base) / 1024)


def peak_child(args, what):
    cmd = [sys.executable, __file__, "--model", args.model, "--n", str(args.n), "--len", str(args.len),
           "--threads", str(args.threads), "--child", what]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:gpt2-small")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    from circuits import methods, positions, select

    model, task, evaluation = make(args.model, args.n, args.len)
    plain_forward, plain_fb = floors(hf_module(model), task.clean)

    g = model.graph
    plain = evaluation.prepare(model, task)
    pos = evaluation.prepare(model, task, positions=positions.of_task(task))
    scores = methods.get("eap").score(pos)
    result = {"model": args.model, "batch": [args.n, args.len], "threads": args.threads,
              "positions": pos.n_positions, "position_edges": pos.n_edges, "clock": args.clock}
    t = time.perf_counter()
    plain_forward()
    emit(result, "F_seconds_once", round(time.perf_counter() - t, 3))
    r = args.repeat
    clock = CLOCK[args.clock]
    timed = functools.partial(paired, clock=clock)
    emit(result, "eap_positions_over_2F_plus_B", timed(lambda: methods.get("eap").score(pos), [plain_forward, plain_fb], r))
    emit(result, "eap_plain_over_2F_plus_B", timed(lambda: methods.get("eap").score(plain), [plain_forward, plain_fb], r))
    for share in (0.01, 0.10):
        mask = select.prune(g, select.top_n(g, scores, int(share * pos.n_edges)))
        emit(result, f"eval_positions_pruned_top{int(share * 100)}pct_edges", int(mask.sum()))
        emit(result, f"eval_positions_pruned_top{int(share * 100)}pct_over_F",
             timed(lambda mask=mask: pos.metric(mask), [plain_forward], r))
    plain_mask = select.prune(g, select.top_n(g, scores.sum(0), g.n_edges // 10))
    emit(result, "eval_plain_pruned_top10pct_over_F", timed(lambda: plain.metric(plain_mask), [plain_forward], r))
    emit(result, "eval_positions_full_over_F", timed(lambda: pos.metric(pos.full_mask()), [plain_forward], r))
    if args.no_memory:
        print(json.dumps(result, indent=1))
        return
    plain_peak = peak_child(args, "plain")
    result["peak_mib_plain_forward_backward"] = round(plain_peak, 1)
    result["peak_eap_positions_over_plain"] = round(peak_child(args, "pos") / plain_peak, 3)
    result["peak_eap_plain_over_plain"] = round(peak_child(args, "eap") / plain_peak, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
