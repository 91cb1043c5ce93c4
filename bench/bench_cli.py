"""Command-line latency, end to end as a user waits for it (a fresh process per call).

    python bench/bench_cli.py [--repeats 3]

Prints the median wall time of each command against its target. Not a timed test: the machine's
load moves these figures; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "tasks" / "examples" / "ioi-mini.jsonl")

CASES = [  # (label, arguments, target seconds, expected exit status)
    ("--help", ["--help"], 1.0, 0),
    ("argument error (discover --bogus)", ["discover", "--bogus"], 1.0, 2),
    ("missing task file (discover)", ["discover", "induction-2l", "no-such-task.jsonl"], 1.0, 2),
    ("evaluate random:gpt2-tiny", ["evaluate", "random:gpt2-tiny", EXAMPLE], 5.0, 0),
    ("graph random:gpt2-small", ["graph", "random:gpt2-small"], 10.0, 0),
]


def wall(args: list[str], status: int) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "circuits.cli.main", *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != status:
        raise SystemExit(f"circuits {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    wall(["graph", "random:gpt2-tiny"], 0)          # warm the OS file cache and the tokenizer cache
    print(f"{'command':<36} {'median s':>9} {'target s':>9}")
    for label, argv, target, status in CASES:
        t = statistics.median(wall(argv, status) for _ in range(args.repeats))
        print(f"{label:<36} {t:>9.2f} {target:>9.1f}  {'ok' if t <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
