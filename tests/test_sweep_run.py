"""Sweeps that run: the test sweep (2 shipped models × 2 tasks × 3 methods × 2 seeds, the model/task
pairs that make no sense excluded) gives the same circuits on the local pool, on Ray, and as
`circuits discover` alone; a killed worker and a raising job cost only themselves, and a rerun
runs only what is missing. Slow: every worker loads its models."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from circuits.cli.main import main
from circuits.sweep import runner

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IOI = ROOT / "tasks" / "examples" / "ioi-mini.jsonl"
TEST_GRID = """
models = ["induction-2l", "ioi-3l"]
tasks = ["induction", "ioi"]
methods = ["eap", "eap-ig-inputs", "clean-corrupted"]
seeds = [0, 1]
n = 16
top_n = 20
exclude = [{model = "induction-2l", task = "ioi"}, {model = "ioi-3l", task = "induction"}]
"""
FAULT_GRID = """
models = "ioi-3l"
tasks = "ioi"
methods = ["eap", "clean-corrupted"]
seeds = [0, 1]
n = 16
top_n = 20
curve = true
include = [{task = "broken.jsonl", method = "eap", seed = 0}]
"""
VOLATILE = ("created", "seconds", "sweep")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def test_grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "grid.toml"
    path.write_text(TEST_GRID)
    return path


@pytest.fixture(scope="module")
def local_sweep(test_grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    result = runner.run(test_grid, out, workers=2, quiet=True, echo=quiet)
    return out, result


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def edges(path: Path) -> dict:
    return json.loads(path.read_text())["edges"]


def test_local_sweep_equals_each_discover_alone(local_sweep, tmp_path, capsys):
    out, result = local_sweep
    assert len(result.jobs) == 12 and len(result.done) == 12 and not result.failed
    for job in result.jobs:
        s = job.settings
        alone = tmp_path / job.name
        argv = ["discover", s["model"], s["task"], "--method", s["method"], "--seed", str(s["seed"]),
                "--n", str(s["n"]), "--top-n", str(s["top_n"]), "--out", str(alone), "--quiet"]
        assert main(argv + (["--steps", str(s["steps"])] if "steps" in s else [])) == 0
        mine, theirs = json.loads((out / job.name).read_text()), json.loads(alone.read_text())
        assert mine["edges"] == theirs["edges"], job.name                # every mask bit and score
        assert {k: v for k, v in mine.items() if k != "provenance"} == {k: v for k, v in theirs.items() if k != "provenance"}
        # the faithfulness comes from forwards run with the worker's thread count, not the
        # command's: equal to float rounding (matmul reduction order), edges and scores exactly
        strip = lambda p: {k: v for k, v in p.items() if k not in VOLATILE + ("faithfulness",)}
        assert strip(mine["provenance"]) == strip(theirs["provenance"])
        assert mine["provenance"]["faithfulness"] == pytest.approx(theirs["provenance"]["faithfulness"], rel=1e-5, abs=1e-7)
        assert mine["provenance"]["sweep"]["settings"] == s
    capsys.readouterr()
    assert [r["status"] for r in summary(out)] == ["done"] * 12


def test_a_rerun_skips_what_is_done(local_sweep, test_grid):
    out, _ = local_sweep
    again = runner.run(test_grid, out, quiet=True, echo=quiet)
    assert len(again.skipped) == 12 and not again.done and again.workers == 0


def test_ray_sweep_equals_the_local_one(local_sweep, test_grid, ray_session, tmp_path):
    out, result = local_sweep
    ray_out = tmp_path / "ray"
    got = runner.run(test_grid, ray_out, executor="ray", workers=2, quiet=True, echo=quiet)
    assert len(got.done) == 12 and not got.failed
    for job in result.jobs:
        assert edges(ray_out / job.name) == edges(out / job.name), job.name


# ---- faults ----------------------------------------------------------------------------------

def fault_grid(tmp_path: Path) -> Path:
    row = json.loads(IOI.read_text().splitlines()[0])
    broken = dict(row, corrupted=row["corrupted"] + " and more")     # token lengths differ: the job raises
    (tmp_path / "broken.jsonl").write_text(json.dumps(broken) + "\n")
    path = tmp_path / "grid.toml"
    path.write_text(FAULT_GRID)
    return path


def events(out: Path) -> list[dict]:
    log = out / runner.LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def kill_a_worker_mid_job(out: Path, timeout: float = 600) -> tuple[str, int]:
    """Wait until a worker (pid known) holds an unfinished good job, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids, holding, done = {}, {}, set()
        for e in events(out):
            if e["event"] == "worker":
                pids[e["slot"]] = e["pid"]
            elif e["event"] == "start":
                holding[e["slot"]] = e["job"]
            elif e["event"] in ("done", "failed", "retry"):
                done.add(e["job"])
        for slot, job in holding.items():
            if slot in pids and job not in done and not job.startswith("ioi-3l.broken"):
                os.kill(pids[slot], signal.SIGKILL)
                return job, pids[slot]
        time.sleep(0.05)
    raise AssertionError("no worker ever held a job")


def check_first_run(out: Path, killed_job: str, pid: int) -> None:
    log = events(out)
    died = [e for e in log if e["event"] == "worker-died"]
    assert died and died[0]["job"] == killed_job and died[0]["pid"] == pid
    assert [e for e in log if e["event"] == "retry" and e["job"] == killed_job]
    assert [e for e in log if e["event"] == "done" and e["job"] == killed_job]      # retried, then done
    failed = [e for e in log if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["job"].startswith("ioi-3l.broken.eap.seed0")
    assert failed[0]["attempts"] == 2 and "TaskError" in failed[0]["error"]
    rows = summary(out)
    broken = next(r for r in rows if r["task"] == "broken")
    assert broken["status"] == "failed" and broken["error"].startswith("TaskError: ") and "broken.jsonl" in broken["error"]
    assert sum(r["status"] == "done" for r in rows) == 4
    assert not (out / runner.LOCK).exists()


def fix_and_rerun(tmp_path: Path, out: Path, run) -> list[str]:
    """Repair the raising job's task file; the rerun must run that job only."""
    (tmp_path / "broken.jsonl").write_text(IOI.read_text())
    n_before = len(events(out))
    run()
    started = [e["job"] for e in events(out)[n_before:] if e["event"] == "start"]
    assert len(started) == 1 and started[0].startswith("ioi-3l.broken.eap.seed0")
    assert [r["status"] for r in summary(out)] == ["done"] * 5
    return started


def test_local_killed_worker_and_raising_job_then_rerun(tmp_path):
    g, out = fault_grid(tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-m", "circuits.cli.main", "sweep", str(g), "-o", str(out), "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed_job, pid = kill_a_worker_mid_job(out)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr                    # finished, with one failed job
    assert "failed: ioi-3l.broken.eap.seed0" in stderr and "done 4, failed 1" in stdout
    check_first_run(out, killed_job, pid)
    # a second sweep on the same directory while one runs is refused (lock with a live pid)
    (out / runner.LOCK).write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "being written by another sweep" in busy.stderr
    (out / runner.LOCK).unlink()
    fix_and_rerun(tmp_path, out, lambda: subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900))


def test_ray_killed_actor_and_raising_job_then_rerun(ray_session, tmp_path):
    g, out = fault_grid(tmp_path), tmp_path / "out"
    results = []
    sweep = threading.Thread(target=lambda: results.append(
        runner.run(g, out, executor="ray", workers=2, quiet=True, echo=quiet)))
    sweep.start()
    try:
        killed_job, pid = kill_a_worker_mid_job(out)
    finally:
        sweep.join(900)
    assert results and len(results[0].done) == 4 and len(results[0].failed) == 1
    check_first_run(out, killed_job, pid)
    fix_and_rerun(tmp_path, out, lambda: runner.run(g, out, executor="ray", workers=2, quiet=True, echo=quiet))


def test_ctrl_c_costs_only_the_jobs_in_flight(tmp_path):
    g = tmp_path / "grid.toml"
    g.write_text('models = "induction-2l"\ntasks = "induction"\nmethods = ["eap", "clean-corrupted"]\n'
                 'seeds = [0, 1, 2]\nn = 16\ntop_n = 20\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "circuits.cli.main", "sweep", str(g), "-o", str(out), "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not any(e["event"] == "done" for e in events(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "sweep interrupted" in stderr
    assert not (out / runner.LOCK).exists()
    done = {r["file"] for r in summary(out) if r["status"] == "done"}
    assert done and {r["status"] for r in summary(out)} == {"done", "not run"}
    assert {p.name for p in out.glob("*.json")} == done              # no half-written circuit
    interrupted = next(e for e in events(out) if e["event"] == "interrupted")
    assert len(interrupted["in_flight"]) <= 1
    n_before = len(events(out))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    started = {e["job"] for e in events(out)[n_before:] if e["event"] == "start"}
    assert started == {r["file"] for r in summary(out)} - done        # only what was missing
