"""One sweep job inside a worker: the same library calls as `circuits discover`, with the model
kept loaded for the worker's next job.

A job's own time (`Outcome.seconds`) is everything a standalone `circuits discover` does for it
except starting Python, importing, and loading the model (shared by the worker's jobs and timed
apart, `Outcome.load_seconds`: the model's libraries are imported on first use, so the first
load carries their import): building the task, preparing the evaluation, the method, the
selection, the faithfulness (and curve when asked), and encoding the circuit file. Writing the
file is the sweep process's (a few ms: one atomic, fsynced write of these bytes)."""

from __future__ import annotations

import os
import time
import traceback

import torch

from circuits import circuit as circuit_io
from circuits import discover, evaluation, patching
from circuits.circuit import Circuit
from circuits.model import loader
from circuits.sweep.grid import Job
from circuits.sweep.outcome import Outcome
from circuits.tasks.builtin import build_task, is_builtin
from circuits.tasks.files import load_file
from circuits.tasks.task import Metric, TaskError


class ModelCache:
    """The worker's one loaded model; a job on another model replaces it (memory stays one model)."""

    def __init__(self):
        self.key, self.model = None, None

    def get(self, job: Job) -> tuple[loader.Model, float]:
        """(model, seconds spent loading it now: 0 when reused)."""
        if job.model_key == self.key:
            return self.model, 0.0
        self.key, self.model = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        s = job.settings
        self.model = loader.load(s["model"], seed=s["seed"], device=s["device"])
        self.key = job.model_key
        return self.model, time.perf_counter() - t0


def undefined_faithfulness(s: dict, task) -> str:
    return (f"faithfulness is undefined: {s['model']} scores task {task.name} the same with every edge "
            f"ablated ({s['ablation']}) as clean, so there is no behaviour to explain")


def run(job: Job, model: loader.Model, load_seconds: float) -> tuple[Circuit, dict]:
    """The circuit of one job, as `circuits discover` finds it, with the sweep's record in its
    provenance ("sweep": settings, key, and the faithfulness curve when asked)."""
    s = job.settings
    t0 = time.perf_counter()
    metric = Metric(s["metric"]) if s.get("metric") else None
    if is_builtin(s["task"]):
        task = build_task(s["task"], model, n=s["n"], seed=s["seed"])
    else:
        task = load_file(s["task"], model.tokenizer, metric=metric, vocab_size=model.arch.d_vocab)
    if metric is not None:
        task = task.with_metric(metric)
    # exactly as `circuits discover` prepares it (EAP's backward starts from the kept clean graph)
    setup = evaluation.prepare(model, task, patching.Ablation(s["ablation"]), batch_size=s.get("batch_size"),
                               keep_clean_graph=s["method"] == "eap")
    if not setup.has_behaviour():
        raise TaskError(undefined_faithfulness(s, task))
    selection = discover.Selection(top_n=s.get("top_n"), threshold=s.get("threshold"), greedy=s.get("greedy"),
                                   target_faithfulness=s.get("target_faithfulness", 0.8), prune=s["prune"])
    found = discover.run(setup, s["method"], selection=selection, tau=s.get("tau"), steps=s.get("steps"),
                         candidates=s.get("candidates"),
                         acdc_metric=Metric(s["acdc_metric"]) if s.get("acdc_metric") else None,
                         seed=s["seed"])
    c = found.circuit
    record = {"key": job.key, "settings": s}
    if s["curve"]:
        from circuits.verify import checks
        points = checks.faithfulness_curve(setup, c.scores)
        cpr, cmd = checks.cpr_cmd(points)
        record["curve"] = {"points": [vars(p) for p in points], "CPR": cpr, "CMD": cmd}
    record["job_seconds"] = round(time.perf_counter() - t0, 3)
    record["model_load_seconds"] = round(load_seconds, 3)
    circuit = Circuit(c.graph, c.mask, c.scores, {**c.provenance, "sweep": record})
    stats = {"edges": c.n_edges, "total_edges": c.graph.n_edges, "faithfulness": found.faithfulness["faithfulness"]}
    return circuit, stats


def attempt(job: Job, cache: ModelCache) -> Outcome:
    """Run a job; any exception becomes the outcome's one-line error (the worker lives on)."""
    load_seconds = 0.0
    t0 = time.perf_counter()
    torch.manual_seed(job.settings["seed"])       # as `discover` leaves it after loading the model
    try:
        model, load_seconds = cache.get(job)
        circuit, stats = run(job, model, load_seconds)
        data = circuit_io.dumps(circuit)[0].encode("utf-8")
        return Outcome(job.key, os.getpid(), time.perf_counter() - t0 - load_seconds, load_seconds, data, stats)
    except Exception as err:                       # noqa: BLE001 - recorded, the sweep goes on
        where = traceback.extract_tb(err.__traceback__)[-1]
        line = str(err).splitlines()[0] if str(err) else ""
        text = f"{type(err).__name__}: {line}" if line else type(err).__name__
        if not isinstance(err, (TaskError, ValueError, FileNotFoundError)):
            text += f" (at {os.path.basename(where.filename)}:{where.lineno})"
        return Outcome(job.key, os.getpid(), time.perf_counter() - t0 - load_seconds, load_seconds, error=text)
