"""Bounded memory and streaming (issue 12), measured on the command line as a user runs it.

1. `circuits evaluate` peak memory (max RSS of the process) on a task file of 1,000 and of
   10,000 rows at the same --batch-size: the target is ≤ 1.2× (memory follows the batch, not
   the rows).
2. A 50 MB task file: seconds from the command's start until its row count shows on stderr
   (target ≤ 5 s), and how fast rows are then read.

    python bench/bench_reliability.py [--model ioi-3l] [--batch-size 32] [--rows 1000 10000]
    PYTHONPATH=/work/main python bench/bench_reliability.py   # the same against another checkout

Each run is a fresh process (its own peak), started with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tasks" / "examples" / "ioi-mini.jsonl"


def task_file(path: Path, rows: int) -> Path:
    base = EXAMPLES.read_text().splitlines()
    with path.open("w") as f:
        for i in range(rows):
            f.write(base[i % len(base)] + "\n")
    return path


def peak_evaluate(model: str, task: Path, batch_size: int, threads: int) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one `circuits evaluate` process."""
    code = ("import resource, sys, time; from circuits.cli.main import main; t = time.perf_counter(); "
            f"rc = main(['evaluate', {model!r}, {str(task)!r}, '--batch-size', '{batch_size}', '--quiet', '--json']); "
            "sys.stderr.write(f'BENCH {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {time.perf_counter() - t}\\n'); "
            "sys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed on {task}: {done.stderr.strip()[-500:]}")
    kb, seconds = re.search(r"BENCH (\d+) ([\d.]+)", done.stderr).groups()
    return int(kb) / 1024**2, float(seconds)


def row_count_latency(model: str, task: Path, rows: int, timeout: float = 120) -> tuple[float | None, float | None]:
    """(seconds until the row count shows, rows read per second while reading) for a big file."""
    argv = [sys.executable, "-m", "circuits.cli.main", "evaluate", model, str(task), "--batch-size", "32"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, shown, rate = b"", None, None
    count = f"{rows:,} rows".encode()
    first_progress = None
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            chunk = proc.stderr.read() or b""
            seen += chunk
            now = time.perf_counter() - t0
            if shown is None and (count in seen or f"/{rows}".encode() in seen):
                shown = now
            done = [int(m) for m in re.findall(rb"(\d+)/%d" % rows, seen)]
            if done and max(done) > 0:
                if first_progress is None:
                    first_progress = (now, max(done))
                elif now - first_progress[0] > 10:
                    rate = (max(done) - first_progress[1]) / (now - first_progress[0])
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return shown, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ioi-3l")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs=2, default=[1000, 10000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big-mb", type=float, default=50)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peaks = {}
        for rows in args.rows:
            gb, seconds = peak_evaluate(args.model, task_file(tmp / f"t{rows}.jsonl", rows), args.batch_size, args.threads)
            peaks[rows] = gb
            print(f"evaluate {args.model}, {rows:>6,} rows, --batch-size {args.batch_size}: peak {gb:.2f} GB, {seconds:.1f} s")
        small, large = args.rows
        ratio = peaks[large] / peaks[small]
        print(f"peak memory {large:,} rows / {small:,} rows: {ratio:.2f} (target <= 1.2)")
        figures["evaluate"] = {"model": args.model, "batch_size": args.batch_size,
                               "peak_gb": {str(k): round(v, 3) for k, v in peaks.items()}, "ratio": round(ratio, 3)}
        line = len(EXAMPLES.read_text().splitlines()[0]) + 1
        rows = int(args.big_mb * 1e6 / line)
        big = task_file(tmp / "big.jsonl", rows)
        size = big.stat().st_size / 1e6
        shown, rate = row_count_latency(args.model, big, rows)
        print(f"{size:.0f} MB task file ({rows:,} rows): row count shown after "
              + (f"{shown:.2f} s" if shown is not None else "never (within the timeout)") + " (target <= 5 s)"
              + (f"; then {rate:,.0f} rows/s read" if rate else ""))
        figures["big_file"] = {"mb": round(size, 1), "rows": rows, "row_count_seconds": shown and round(shown, 2),
                               "rows_per_second": rate and round(rate)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
