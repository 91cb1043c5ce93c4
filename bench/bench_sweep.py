"""Sweep overhead: a 24-job sweep of quick jobs on 2 workers against the jobs' own times.

    nice -n 10 python bench/bench_sweep.py [--executor local|ray|both] [--workers 2] [--n 16]

The jobs: ioi-3l on ioi, eap / clean-corrupted / eap-ig-inputs × seeds 0-7, 16 examples, top 20
edges. A job's own time is what its worker spends on it, everything a standalone `circuits
discover` does but starting Python, importing and loading the model (shared by the worker's
jobs): the task, the evaluation's preparation, the method, the selection, the faithfulness and
encoding the circuit file (circuits/sweep/job.py). The sweep's wall time runs from the sweep's
start to its summary written.

Reported separately, as fixed costs of a sweep: Ray's import, start and stop (a local
instance), and each worker's preparation — its start-up (from the pool's start to the worker
ready: a fresh Python importing torch and circuits) plus its model loads (the first load imports
the model's libraries: transformers, a tokenizer). The ideal sweep spreads all of the work over
the workers: ideal = (Σ preparations + Σ own times) / workers. Target: the jobs' part of the
wall time, wall − Ray − Σ preparations / workers, is ≤ 1.2 × Σ own times / workers ("ratio");
"ratio_with_preparation" is wall − Ray against the whole ideal. Figures: README, Sweeps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = """
models = "ioi-3l"
tasks = "ioi"
methods = ["eap", "clean-corrupted", "eap-ig-inputs"]
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
n = {n}
top_n = 20
"""


def measure(executor: str, workers: int, n: int) -> dict:
    from circuits.sweep import runner
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.toml"
        grid.write_text(GRID.format(n=n))
        r = runner.run(grid, Path(tmp) / "out", executor=executor, workers=workers, quiet=True,
                       echo=lambda *a, **k: None)
    assert len(r.done) == 24 and not r.failed, r.failed
    own = sum(r.job_seconds.values())
    ray = (r.startup_seconds or 0.0) + (r.stop_seconds or 0.0)
    prep = {pid: r.worker_startup.get(pid, 0.0) + r.model_loads.get(pid, 0.0)
            for pid in set(r.worker_startup) | set(r.model_loads)}
    prep_share = sum(prep.values()) / workers
    ideal = own / workers
    return {"executor": executor, "workers": workers, "jobs": len(r.done), "wall_s": round(r.seconds, 2),
            "sum_job_s": round(own, 3), "ideal_s": round(ideal, 3),
            "ratio": round((r.seconds - ray - prep_share) / ideal, 3),
            "ratio_with_preparation": round((r.seconds - ray) / (ideal + prep_share), 3),
            "ray_startup_s": round(r.startup_seconds, 2) if r.startup_seconds is not None else None,
            "ray_stop_s": round(r.stop_seconds, 2) if r.stop_seconds is not None else None,
            "worker_startup_s": sorted(round(v, 2) for v in r.worker_startup.values()),
            "model_load_s": sorted(round(v, 2) for v in r.model_loads.values()),
            "preparation_share_s": round(prep_share, 2),
            "median_job_s": round(statistics.median(r.job_seconds.values()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executor", choices=["local", "ray", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    for executor in (["local", "ray"] if args.executor == "both" else [args.executor]):
        if executor == "ray" and importlib.util.find_spec("ray") is None:   # not imported: the sweep times that
            print("ray: not installed (pip install -e '.[ray]'), skipped")
            continue
        m = measure(executor, args.workers, args.n)
        print(json.dumps(m))
        ray = (f"; Ray start-up {m['ray_startup_s']}s and stop {m['ray_stop_s']}s (not counted)"
               if m["ray_startup_s"] is not None else "")
        print(f"{executor}: wall {m['wall_s']}s for 24 jobs whose own times sum to {m['sum_job_s']}s (median "
              f"{m['median_job_s']}s; ideal on {args.workers} workers {m['ideal_s']}s) + the workers' preparation "
              f"(start-up {m['worker_startup_s']}s, model loads {m['model_load_s']}s: "
              f"{m['preparation_share_s']}s per worker){ray}: ratio {m['ratio']} (target <= 1.2), "
              f"{m['ratio_with_preparation']} with the preparation in the ideal too")

if __name__ == "__main__":
    main()
