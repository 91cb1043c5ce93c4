"""Sweep overhead: a 24-job sweep of quick jobs on 2 workers against the jobs' own times.

    nice -n 10 python bench/bench_sweep.py [--executor local|ray|both] [--workers 2] [--n 16]

The jobs: ioi-3l on ioi, eap / clean-corrupted / eap-ig-inputs × seeds 0-7, --top-n 20. A job's
own time is what its worker spends on it (task, discovery, the model's loading when that job
loaded it); the sweep's wall time runs from the command's start to its summary written. Target:
wall ≤ 1.2 × (sum of the jobs' own times / workers). Reported separately: the workers' start-up
(a fresh Python importing torch, before any job) and Ray's start-up.
"""

from __future__ import annotations

import argparse
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
    ideal = own / workers
    ray_startup = r.startup_seconds or 0.0
    worker_startup = max(r.worker_startup) if r.worker_startup else None
    return {"executor": executor, "workers": workers, "jobs": len(r.done), "wall_s": round(r.seconds, 2),
            "sum_job_s": round(own, 2), "ideal_s": round(ideal, 2),
            "ratio": round((r.seconds - ray_startup) / ideal, 3),
            "ratio_without_worker_startup": round((r.seconds - ray_startup - (worker_startup or 0)) / ideal, 3),
            "ray_startup_s": round(ray_startup, 2) if r.startup_seconds is not None else None,
            "worker_startup_s": round(worker_startup, 2) if worker_startup is not None else None,
            "median_job_s": round(statistics.median(r.job_seconds.values()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executor", choices=["local", "ray", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    for executor in (["local", "ray"] if args.executor == "both" else [args.executor]):
        if executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray: not installed (pip install -e '.[ray]'), skipped")
                continue
        m = measure(executor, args.workers, args.n)
        print(json.dumps(m))
        extra = f", Ray start-up {m['ray_startup_s']}s (not counted)" if m["ray_startup_s"] is not None else ""
        print(f"{executor}: wall {m['wall_s']}s for 24 jobs whose own times sum to {m['sum_job_s']}s "
              f"(ideal on {args.workers} workers {m['ideal_s']}s): ratio {m['ratio']} (target <= 1.2){extra}; "
              f"worker start-up {m['worker_startup_s']}s, ratio without it {m['ratio_without_worker_startup']}")


if __name__ == "__main__":
    main()
