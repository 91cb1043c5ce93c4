"""`circuits sweep GRID -o DIR`: many discoveries at once, resumable, local or on Ray."""

from __future__ import annotations

import argparse
import sys

EXAMPLE_GRID = """\
grid file (TOML or JSON):
  models  = ["induction-2l", "ioi-3l"]
  tasks   = ["induction", "ioi"]
  methods = ["eap", "eap-ig-inputs", "clean-corrupted"]
  seeds   = [0, 1]
  n = 32
  top_n = 20                  # or threshold / greedy / target_faithfulness (lists = alternatives)
  curve = true                # MIB faithfulness curve, CPR and CMD for each circuit
  exclude = [{model = "induction-2l", task = "ioi"}, {model = "ioi-3l", task = "induction"}]
  [resources]                 # per job; Ray places actors by these
  cpus = 1
  gpus = 0

examples:
  circuits sweep grid.toml -o runs/
  circuits sweep grid.toml -o runs/ --executor ray                       (a local Ray instance)
  circuits sweep grid.toml -o /shared/runs --executor ray --address HEAD:6379   (join a cluster)
  circuits compare runs/

Rerunning the same command skips the jobs whose circuit file is there and matches its settings.
A failing job is retried once, then recorded in summary.csv/summary.md; exit code 1 if any failed.
"""


def cmd_sweep(args) -> int:
    from circuits.sweep import grid, runner
    if args.address and args.executor != "ray":
        raise ValueError("--address joins a Ray cluster: add --executor ray")
    jobs = grid.load(args.grid)             # every grid problem answers here, before any job
    if args.executor == "ray":
        from circuits.sweep.pools import import_ray
        import_ray()
    try:
        result = runner.run(args.grid, args.out, executor=args.executor, address=args.address,
                            workers=args.workers, quiet=args.quiet, jobs=jobs)
    except KeyboardInterrupt:
        print(f"circuits: sweep interrupted: the finished jobs are in {args.out}; rerun the same command "
              f"to run the rest", file=sys.stderr)
        return 130
    names = {j.key: j.name for j in result.jobs}
    for key, error in result.failed.items():
        print(f"failed: {names[key]}: {error}", file=sys.stderr)
    timing = f"{result.seconds:.1f}s"
    if result.startup_seconds is not None:
        timing += f" (Ray start-up {result.startup_seconds:.1f}s)"
    print(f"done {len(result.done)}, failed {len(result.failed)}, skipped {len(result.skipped)} (done before) "
          f"of {len(result.jobs)} jobs in {timing}; wrote {', '.join(result.files)} in {args.out}")
    return 1 if result.failed else 0


def add_sweep(sub, add_common) -> None:
    from circuits.cli.common import positive_int
    p = sub.add_parser("sweep", help="run the product of models × tasks × methods × seeds …, resumable (local or Ray)",
                       description="Run every combination of a grid's models, tasks, methods, seeds, ablations and "
                                   "selection settings as `circuits discover` would, one circuit file per job in DIR, "
                                   "then write summary.csv, summary.md, jaccard.svg and faithfulness-<task>.svg.",
                       epilog=EXAMPLE_GRID, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file (.toml or .json)")
    p.add_argument("-o", "--out", required=True, help="directory for the circuit files and the summary")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: Ray actors (pip install 'circuits[ray]')")
    p.add_argument("--address", help="with --executor ray: join the Ray cluster at this address (default: start a "
                                     "local Ray instance for the sweep)")
    p.add_argument("--workers", type=positive_int,
                   help="parallel workers (default: the machine's CPUs / the grid's cpus per job; on Ray, what the "
                        "cluster fits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)
