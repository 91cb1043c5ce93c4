"""A real pretrained model, end to end, as a user calls each step: ratios measured in one run.

    nice -n 10 python bench/bench_real.py [MODEL] [--n 64] [--threads 2] [--acdc-tests 24]

MODEL defaults to the local checkpoint /work/models/smollm2-135m where it exists, else the
built-in spec smollm2-135m; the task is the built-in IOI with --n prompts.

Floors: F = one plain forward of the Hugging Face model on the same prompts (no grad, full logits);
FB = one forward and backward of it (parameter gradients), so 2F + 1B = F + FB.
Figures (targets from issue 13 in brackets):
- eap_over_2F_plus_B: preparing the setup (corrupted forward, clean forward with the gradient
  taps kept, as `discover --method eap` prepares it) + EAP scores [<= 1.5]
- eap_ig5_over_2F_plus_B: the same with EAP-IG (activations), 5 steps
- one_evaluation_over_F: the metric of the found circuit, one patched forward, over a plain
  forward timed right before it; the median of 4 such pairs [<= 1.5]
- search_over_F: the faithfulness-0.8 search on EAP's scores, m(empty) included [<= 10]
- acdc_forwards_per_tested_edge: ACDC's wall time per tested edge / F, from a sparse circuit
  (the search's) with every edge into one receiver layer opened, at an early, middle, late layer
- peak_memory_over_plain_fb: peak RSS growth of EAP end to end over that of one plain forward and
  backward, each in a fresh process [<= 2]
- load_seconds, rss_after_load_mib: loading the model in a fresh process
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOCAL = "/work/models/smollm2-135m"


def default_model() -> str:
    """The local dequantized checkpoint where this machine has it, else the built-in spec."""
    return LOCAL if Path(LOCAL, "config.json").is_file() else "smollm2-135m"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:        # reset VmHWM (Linux)
        f.write("5")


def timed(fn, repeat: int = 1):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def load(args):
    import torch
    torch.set_num_threads(args.threads)
    from circuits.model import loader
    from circuits.tasks.builtin import build_task
    model = loader.load(args.model)
    task = build_task("ioi", model, n=args.n, seed=0)
    return model, task


def child(args) -> None:
    """One measurement in a fresh process; prints one number."""
    import gc
    if args.child == "load":
        import torch  # noqa: F401  (imports are not the model's load time)
        from circuits.model import loader
        base = _status_kib("VmRSS")
        t = time.perf_counter()
        loader.load(args.model)
        print(json.dumps({"seconds": time.perf_counter() - t, "rss_mib": _status_kib("VmRSS") / 1024,
                          "rss_growth_mib": (_status_kib("VmRSS") - base) / 1024}))
        return
    model, task = load(args)
    from circuits import evaluation, methods
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    if args.child == "plain":
        m = model.bridge.original_model
        for p in m.parameters():
            p.requires_grad_(True)
        out = m(task.clean)
        getattr(out, "logits", out)[:, -1].logsumexp(-1).sum().backward()
    else:
        setup = evaluation.prepare(model, task, keep_clean_graph=True)
        methods.get("eap").score(setup)
    print(json.dumps({"peak_growth_mib": (_status_kib("VmHWM") - base) / 1024}))


def in_child(args, what: str) -> dict:
    cmd = [sys.executable, __file__, args.model, "--n", str(args.n), "--threads", str(args.threads), "--child", what]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def acdc_per_edge(setup, circuit, F: float, tests: int) -> dict:
    """Wall time per tested edge / F when ACDC searches one layer's receivers, later layers already
    sparse (the found circuit) as they are when a real run reaches that layer."""
    from circuits.methods.acdc import acdc
    g = setup.graph
    L = g.arch.n_layers
    out = {}
    for layer in sorted({1, L // 2, L - 2}):
        cols = [c for c in range(g.n_receivers) if g.receivers[c].layer == layer]
        start = circuit.clone()
        start[:, cols] = g.allowed[:, cols]
        res = acdc(setup, 1e-3, start_mask=start, receivers=cols, max_tests=tests)
        out[str(layer)] = round(res.seconds / max(1, res.tested) / F, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help=f"model spec (default {LOCAL} if present, else smollm2-135m)")
    ap.add_argument("--n", type=int, default=64, help="IOI prompts (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--acdc-tests", type=int, default=24, help="ACDC edge tests per sampled layer")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.child:
        return child(args)
    import torch
    from circuits import discover, evaluation, methods

    model, task = load(args)
    hf = model.bridge.original_model
    for p in hf.parameters():
        p.requires_grad_(True)

    def plain_forward():
        with torch.no_grad():
            hf(task.clean)

    def plain_fb():
        out = hf(task.clean)
        getattr(out, "logits", out)[:, -1].logsumexp(-1).sum().backward()
        hf.zero_grad(set_to_none=True)

    plain_forward()
    F, _ = timed(plain_forward, 2)
    FB, _ = timed(plain_fb, 2)
    floor = F + FB

    def eap_end_to_end():           # as `circuits discover --method eap` does it
        setup = evaluation.prepare(model, task, keep_clean_graph=True)
        return setup, methods.get("eap").score(setup)

    def ig_end_to_end():
        setup = evaluation.prepare(model, task)
        return methods.get("eap-ig-activations").score(setup, steps=5)

    def note(**figures):          # each figure as soon as it is measured (a long run may be cut short)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}),
              file=sys.stderr, flush=True)

    note(F_seconds=F, FB_seconds=FB)
    eap_t, (setup, scores) = timed(eap_end_to_end)
    note(eap_over_2F_plus_B=eap_t / floor)
    setup._empty.clear()      # m(∅) again from what prepare recorded (resample: the corrupted run's logits)
    search_t, found = timed(lambda: discover.smallest_faithful(setup, scores, 0.8))
    note(search_over_F=search_t / F, tried=found.tried)
    # one evaluation against a forward timed right before it, four times: the machine's speed
    # drifts, and a ratio of neighbours is steadier than one against the floor of the run's start
    pairs = []
    for _ in range(4):
        f_t, _ = timed(plain_forward)
        e_t, _ = timed(lambda: setup.metric(found.mask))
        pairs.append(e_t / f_t)
    eval_ratio = statistics.median(pairs)
    note(one_evaluation_over_F=eval_ratio, pairs=[round(x, 3) for x in pairs])
    F2, _ = timed(plain_forward, 2)            # the machine's speed drifts: re-measure the floor
    acdc = acdc_per_edge(setup, found.mask, F2, args.acdc_tests)
    note(acdc_by_layer=acdc)
    del setup
    gc.collect()
    ig_t, _ = timed(ig_end_to_end)             # after EAP's setup is freed: one setup at a time
    note(eap_ig5_over_2F_plus_B=ig_t / floor)
    plain_peak = in_child(args, "plain")["peak_growth_mib"]
    eap_peak = in_child(args, "eap")["peak_growth_mib"]
    note(peak_memory_over_plain_fb=eap_peak / plain_peak)
    loaded = in_child(args, "load")
    g = model.graph
    result = {
        "model": args.model, "prompts": list(task.clean.shape), "threads": args.threads,
        "F_seconds": round(F, 3), "FB_seconds": round(FB, 3), "F_seconds_later": round(F2, 3),
        "eap_over_2F_plus_B": round(eap_t / floor, 3),
        "eap_ig5_over_2F_plus_B": round(ig_t / floor, 3),
        "one_evaluation_over_F": round(eval_ratio, 3),
        "one_evaluation_over_F_pairs": [round(x, 3) for x in pairs],
        "search_over_F": round(search_t / F, 3),
        "search": {"evaluations": len(found.tried), "tolerance_edges": found.tolerance, "selected": found.n,
                   "edges": int((found.mask & g.allowed).sum()), "of": g.n_edges,
                   "faithfulness": round(found.faithfulness, 4),
                   "tried": [[n, round(f, 3)] for n, f in found.tried]},
        "acdc_forwards_per_tested_edge": {"by_layer": acdc,
                                          "mean": round(sum(acdc.values()) / len(acdc), 3)},
        "peak_mib_plain_fb": round(plain_peak, 1), "peak_mib_eap": round(eap_peak, 1),
        "peak_memory_over_plain_fb": round(eap_peak / plain_peak, 3),
        "load_seconds": round(loaded["seconds"], 2), "rss_after_load_mib": round(loaded["rss_mib"], 1),
        "load_rss_growth_mib": round(loaded["rss_growth_mib"], 1),
    }
    print(json.dumps(result, indent=1))
    if Path("bench").is_dir():
        Path("bench/bench_real.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
