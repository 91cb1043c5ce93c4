"""`circuits benchmark`: methods side by side on held-out examples (MIB circuit-track figures)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_METHODS = "eap,eap-ig-inputs,eap-ig-activations,eap-gim,edge-pruning,ensemble"


def check_benchmark_args(args) -> list:
    """Everything that needs no model: the method list, the split sizes of a built-in task."""
    from circuits.methods.registry import parse_list
    from circuits.tasks.builtin import is_builtin
    from circuits.tasks.splits import check_split
    specs = parse_list(args.methods)
    if args.plot and Path(args.plot).suffix.lower() not in (".svg", ".png"):
        raise ValueError(f"{args.plot}: the plot is written as .svg or .png")
    check_split(args.n if is_builtin(args.task) else None, args.test_fraction)
    return specs


def cmd_benchmark(args) -> int:
    from circuits.cli.common import (
        _load_model_and_task,
        _print_json,
        refuse_overwriting_inputs,
    )
    specs = check_benchmark_args(args)
    outputs = [p for p in (args.plot, args.out) if p]
    refuse_overwriting_inputs([args.task], outputs)

    from circuits.io import plot
    from circuits.patching import Ablation
    from circuits.verify import benchmark
    model, task = _load_model_and_task(args)
    rep = benchmark.run(model, task, specs, ablation=Ablation(args.ablation), test_fraction=args.test_fraction,
                        seed=args.split_seed, batch_size=args.batch_size,
                        both_directions=not args.one_direction, progress=not args.quiet)
    rep["model"] = args.model
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    if args.plot:
        plot.save_curves(rep, args.plot)
    if args.json:
        _print_json(rep)
    else:
        print(benchmark.table(rep))
        written = [p for p in (args.out, args.plot) if p]
        if written:
            print("\nwritten: " + ", ".join(written))
    return 0


def add_benchmark(sub, add_common) -> None:
    from circuits.cli.common import ABLATIONS
    p = sub.add_parser(
        "benchmark", help="methods side by side on held-out examples: MIB faithfulness curves, CPR, CMD, time",
        description="Split the task's examples (seeded) into discovery and test sets, find edge scores "
                    "with each method on the discovery set, and judge them on the test set by MIB's "
                    "circuit-track curves: circuits of 0.1 ... 100%% of the edges, CPR on circuits "
                    "chosen by signed score, CMD on circuits chosen by |score|.",
        epilog="examples:\n  circuits benchmark ioi-3l ioi\n"
               "  circuits benchmark induction-2l induction --methods eap,eap-ig-inputs,edge-pruning:steps=20 "
               "--plot curves.svg\n"
               "  circuits benchmark ioi-3l ioi --methods 'ensemble:members=eap+eap-gim:combine=score'\n\n"
               "A method is name or name:key=value:key=value (parameters as in the registry; ensemble\n"
               "members joined with +). Methods with a gradient direction are also run the other way\n"
               "unless the list fixes it (--one-direction: never).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("task", help="task file or built-in task")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--ablation", default="resample", choices=ABLATIONS)
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of examples held out (default 0.5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the discovery/test split (default 0)")
    p.add_argument("--one-direction", action="store_true", help="run each method only in its given direction")
    p.add_argument("--plot", help="figure of every method's curves: .svg, or .png (needs matplotlib)")
    p.add_argument("--out", help="write the JSON report here")
    add_common(p)
    p.set_defaults(func=cmd_benchmark, preflight_check=check_benchmark_args)
