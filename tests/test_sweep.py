"""Sweeps without running models: the grid (product, exclude/include, settings per method, names),
bad input answered before any job, the directory lock, the summary and figures, compare DIR, and
the scheduling (a queued job per worker, a dead worker's jobs, longest first) with a scripted pool."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from circuits.cli.main import main
from circuits.sweep import grid, report, runner

ROOT = Path(__file__).resolve().parents[1]
IOI = str(ROOT / "tasks" / "examples" / "ioi-mini.jsonl")

GRID = """
models = ["induction-2l", "ioi-3l"]
tasks = ["induction", "ioi"]
methods = ["eap", "eap-ig-inputs", "clean-corrupted"]
seeds = [0, 1]
n = 16
top_n = 20
exclude = [{model = "induction-2l", task = "ioi"}, {model = "ioi-3l", task = "induction"}]
"""


def write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_product_with_exclude_gives_the_test_sweep(tmp_path):
    jobs = grid.load(write(tmp_path, GRID))
    assert len(jobs) == 12
    assert {(j.settings["model"], j.settings["task"]) for j in jobs} == {("induction-2l", "induction"), ("ioi-3l", "ioi")}
    assert len({j.name for j in jobs}) == 12 and len({j.key for j in jobs}) == 12
    eap = next(j for j in jobs if j.settings["method"] == "eap")
    ig = next(j for j in jobs if j.settings["method"] == "eap-ig-inputs")
    assert "steps" not in eap.settings and ig.settings["steps"] == 5       # a setting only where it applies
    assert eap.name.startswith("induction-2l.induction.eap.seed0.resample.top20.")
    assert grid.load(write(tmp_path, GRID)) [0].key == jobs[0].key            # names are stable


def test_json_grid_include_selection_alternatives_and_dedup(tmp_path):
    data = {"models": "induction-2l", "tasks": "induction", "methods": ["eap", "acdc"],
            "top_n": [10, 20], "target_faithfulness": 0.9, "tau": 0.05,
            "include": [{"model": "ioi-3l", "task": ["ioi", IOI], "method": "eap", "top_n": 5,
                         "resources": {"cpus": 2, "memory": "1GB"}}]}
    jobs = grid.load(write(tmp_path, json.dumps(data), "grid.json"))
    sel = [(j.settings["method"], j.settings.get("top_n"), j.settings.get("target_faithfulness"), j.settings.get("tau"))
           for j in jobs if j.settings["model"] == "induction-2l"]
    # three selections for eap; acdc ignores selection, so its three combinations are one job
    assert sel == [("eap", 10, None, None), ("eap", 20, None, None), ("eap", None, 0.9, None), ("acdc", None, None, 0.05)]
    extra = [j for j in jobs if j.settings["model"] == "ioi-3l"]
    assert len(extra) == 2 and all(j.settings["top_n"] == 5 for j in extra)
    assert extra[0].resources == grid.Resources(cpus=2.0, gpus=0.0, memory=1024 ** 3)
    file_job = extra[1]
    assert file_job.settings["task"] == IOI and "n" not in file_job.settings and len(file_job.settings["task_sha256"]) == 16


def test_a_changed_task_file_is_a_different_job(tmp_path):
    (tmp_path / "t.jsonl").write_text(Path(IOI).read_text())
    g = write(tmp_path, 'models = "ioi-3l"\ntasks = "t.jsonl"\nmethods = "eap"\n')
    before = grid.load(g)[0]
    (tmp_path / "t.jsonl").write_text(Path(IOI).read_text().splitlines()[0] + "\n")
    assert grid.load(g)[0].key != before.key


@pytest.mark.parametrize("text,says", [
    ('models = ["induction-2l", "inductoin-2l"]\ntasks = "induction"\nmethods = "eap"',
     "models[1]: unknown model 'inductoin-2l'; did you mean induction-2l?"),
    ('models = "induction-2l"\ntasks = ["induction", "iio"]\nmethods = "eap"', "tasks[1]: unknown task 'iio'"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = ["eap", "eapp"]',
     "methods[1]: unknown method 'eapp'; did you mean eap?"),
    ('models = "random:gpt3"\ntasks = "induction"\nmethods = "eap"', "unknown random architecture 'gpt3'"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\nablations = ["zero", "mena"]',
     "ablations[1]: unknown ablation 'mena'; did you mean mean?"),
    ('models = []\ntasks = "induction"\nmethods = "eap"', "models is empty: the product would have no jobs"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\nexclude = [{task = "induction"}]',
     "the grid has no jobs: every combination is excluded"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\nexclude = [{task = "ioi"}]',
     "exclude[0] matches no job of the grid"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\nmethod = "acdc"', "unknown setting 'method'"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\ntau = 0.1', "tau: applies to acdc and hybrid"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\nseeds = [0, "one"]',
     "seeds[1]: expected an integer, got 'one'"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\ntarget_faithfulness = 1.5',
     "target_faithfulness: must be (0.0, 1.0]"),
    ('models = "induction-2l"\ntasks = "induction"', "methods is missing"),
    ('models = "induction-2l"\ntasks = "induction"\nmethods = "eap"\n[resources]\ngpu = 1',
     "resources: unknown resource 'gpu'; did you mean gpus?"),
    ('models = ["induction-2l"\ntasks = "induction"', "not valid TOML"),
])
def test_bad_grids_are_one_line_errors_naming_the_entry_before_any_job(tmp_path, capsys, text, says):
    g = write(tmp_path, text)
    out = tmp_path / "out"
    assert main(["sweep", str(g), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert err.count("\n") == 1 and err.startswith("circuits: error: ")
    assert not out.exists()                      # nothing started, nothing written


def test_malformed_json_and_missing_file(tmp_path, capsys):
    g = write(tmp_path, '{"models": ["induction-2l",]}', "grid.json")
    assert main(["sweep", str(g), "-o", str(tmp_path / "o")]) == 2
    assert "grid.json: not valid JSON" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    assert main(["sweep", str(g), "-o", str(tmp_path / "o"), "--address", "x:1"]) == 2
    assert "--address joins a Ray cluster" in capsys.readouterr().err


def test_grid_checks_import_no_torch(tmp_path):
    g = write(tmp_path, GRID)
    code = f"import sys; from circuits.sweep import grid; grid.load({str(g)!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "False"


def test_lock_refuses_a_live_sweep_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / runner.LOCK
    lock.write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname(), "started": "t"}))
    with pytest.raises(runner.SweepLocked, match=f"another sweep \\(pid {os.getppid()}"):
        with runner.directory_lock(tmp_path):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(), "started": "t"}))
    notes = []
    with runner.directory_lock(tmp_path, note=notes.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(runner.SweepLocked):          # and now it is ours: a second one refuses
            with runner.directory_lock(tmp_path):
                pass
    assert "stale lock" in notes[0] and not lock.exists()


def _fake_circuit(job, seed, with_curve=True):
    """A circuit file as a sweep job would write it, on the induction-2l graph, without a model."""
    from circuits import circuit as circuit_io
    g = circuit_io.graph_from_summary({"n_layers": 2, "n_heads": 4, "has_mlp": True})
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(seed)) * g.allowed
    mask = (scores.abs() > 1.0) & g.allowed
    record = {"key": job.key, "settings": job.settings, "job_seconds": 1.5}
    if with_curve:
        record["curve"] = {"points": [{"percent": p, "edges": 1, "faithfulness": min(1.0, p / 20)}
                                      for p in (0.1, 1.0, 10.0, 100.0)], "CPR": 0.8, "CMD": 0.2}
    return circuit_io.Circuit(g, mask, scores, {"model": job.settings["model"], "method": job.settings["method"],
                                                "faithfulness": 0.5 + seed / 10, "sweep": record})


def test_summary_figures_and_compare_dir(tmp_path, capsys):
    from circuits import circuit as circuit_io
    jobs = [j for j in grid.load(write(tmp_path, GRID)) if j.settings["model"] == "induction-2l"]
    out = tmp_path / "out"
    out.mkdir()
    for i, job in enumerate(jobs[:4]):
        circuit_io.save(_fake_circuit(job, i, with_curve=i % 2 == 0), out / job.name)
    failed = {jobs[4].key: "TaskError: broken"}
    files = report.write(out, jobs, failed)
    assert [f for f in files if not f.endswith(".png")] == ["summary.csv", "summary.md", "jaccard.csv", "jaccard.svg",
                                                             "faithfulness-induction.svg"]
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].split(",") == list(report.COLUMNS) and len(lines) == 7
    assert lines[1].startswith("induction-2l,induction,eap,0,resample,top_n=20,") and ",0.8,0.2,1.5,done," in lines[1]
    assert "failed,TaskError: broken" in lines[5] and ",not run," in lines[6]
    md = (out / "summary.md").read_text()
    assert "6 jobs: 4 done, 1 failed, 1 not run." in md
    for name in ("jaccard.svg", "faithfulness-induction.svg"):
        ET.parse(out / name)                                  # well-formed SVG
    matrix = (out / "jaccard.csv").read_text().splitlines()
    assert len(matrix) == 5 and matrix[1].split(",")[1] == "1.0000"
    assert main(["compare", str(out), "--json"]) == 0          # a sweep directory: its circuits
    assert len(json.loads(capsys.readouterr().out)) == 6       # 4 circuits, all pairs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 2
    assert "no circuit files" in capsys.readouterr().err


def test_done_means_the_file_matches_the_settings(tmp_path):
    from circuits import circuit as circuit_io
    job, other = grid.load(write(tmp_path, GRID))[:2]
    assert not runner.is_done(job, tmp_path)
    circuit_io.save(_fake_circuit(job, 0), tmp_path / job.name)
    assert runner.is_done(job, tmp_path)
    circuit_io.save(_fake_circuit(other, 0), tmp_path / job.name)     # someone else's settings
    assert not runner.is_done(job, tmp_path)


def test_the_grids_torch_free_lists_match_the_library():
    from circuits.patching import Ablation
    from circuits.tasks.task import Metric
    assert set(grid.METRICS) == {m.value for m in Metric}
    assert set(grid.ABLATIONS) == {a.value for a in Ablation}


def test_ray_missing_is_one_line_before_any_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)            # as if Ray were not installed
    out = tmp_path / "out"
    assert main(["sweep", str(write(tmp_path, GRID)), "-o", str(out), "--executor", "ray"]) == 2
    assert "--executor ray needs Ray: pip install 'circuits[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_default_workers_follow_cpus_memory_and_jobs():
    cpus = os.cpu_count()
    assert runner.default_workers(100, 1.0) == cpus
    assert runner.default_workers(1, 1.0) == 1
    assert runner.default_workers(100, 1.0, memory=10 ** 15) == 1          # a petabyte each: one at a time


# ---- scheduling, with a scripted pool (no processes) -----------------------------------------

class ScriptedPool:
    """Two slots whose workers finish their running job at every events() call; slot 1 dies once,
    at its first call holding two jobs (one running, one queued)."""

    def __init__(self):
        from circuits.sweep.pools import Event
        self.Event, self.size, self.resources = Event, 2, [None, None]
        self.held = {0: [], 1: []}
        self.ready, self.died, self.most_held = False, False, 0

    def submit(self, slot, job):
        self.held[slot].append(job)
        self.most_held = max(self.most_held, len(self.held[slot]))

    def events(self, timeout):
        from circuits.sweep.outcome import Outcome
        if not self.ready:
            self.ready = True
            return [self.Event(s, "ready", (100 + s, 0.5)) for s in (0, 1)]
        out = []
        for slot, jobs in self.held.items():
            if slot == 1 and not self.died and len(jobs) == 2:
                self.died = True
                jobs.clear()
                out.append(self.Event(1, "died", "worker process 101 exited with code -9"))
            elif jobs:
                job = jobs.pop(0)
                seconds = {"eap": 0.1, "clean-corrupted": 0.2, "eap-ig-inputs": 0.3}[job.settings["method"]]
                out.append(self.Event(slot, "result", Outcome(job.key, 100 + slot, seconds, 0.0, b"{}", {
                    "edges": 1, "faithfulness": 1.0})))
        return out

    def replace(self, slot):
        self.held[slot] = []


class Bar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass


def test_a_dead_worker_costs_its_running_job_one_attempt_and_returns_its_queued_one(tmp_path):
    jobs = grid.load(write(tmp_path, GRID))
    out = tmp_path / "out"
    out.mkdir()
    pool, result, log = ScriptedPool(), runner.SweepResult(jobs), runner.Log(out / runner.LOG)
    runner._schedule(pool, list(jobs), out, log, result, Bar())
    log.close()
    assert pool.died and pool.most_held == 2                     # a second job was queued behind the first
    assert sorted(result.done) == sorted(j.key for j in jobs) and not result.failed
    assert all((out / j.name).read_bytes() == b"{}" for j in jobs)
    events = [json.loads(line) for line in (out / runner.LOG).read_text().splitlines()]
    died = next(e for e in events if e["event"] == "worker-died")
    assert died["job"] and len(died["requeued"]) == 1
    retried = [e["job"] for e in events if e["event"] == "retry"]
    assert retried == [died["job"]]                              # the queued job spent no attempt
    starts = [e["job"] for e in events if e["event"] == "start"]     # a job starts when it runs, not when queued
    assert sorted(starts) == sorted([j.name for j in jobs] + [died["job"]])


def test_pick_prefers_the_slots_model_then_the_longest_expected_job(tmp_path):
    from collections import deque
    jobs = grid.load(write(tmp_path, GRID))
    ioi = next(j for j in jobs if j.settings["model"] == "ioi-3l").model_key
    expected = {runner._kind(j): {"eap": 0.1, "clean-corrupted": 0.2}.get(j.settings["method"], 0.05)
                for j in jobs if j.settings["method"] != "eap-ig-inputs" or j.settings["model"] == "ioi-3l"}
    pending = deque(jobs)
    first = runner._pick(pending, ioi, None, set(), expected)
    assert first.settings["model"] == "ioi-3l" and first.settings["method"] == "clean-corrupted"
    # on induction-2l, eap-ig-inputs has not been timed: it counts as the longest
    other = runner._pick(pending, None, None, {ioi}, expected)
    assert other.settings["model"] == "induction-2l" and other.settings["method"] == "eap-ig-inputs"
    assert len(pending) == len(jobs) - 2
