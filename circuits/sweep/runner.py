"""Drive a sweep: lock the directory, skip the jobs already done, run the rest on a pool
(retrying a failure once), write each circuit as it arrives, then the summary and figures.

Only the driver writes into the directory, each circuit file atomically, so a killed worker or
Ctrl-C costs the jobs in flight and nothing else. `sweep-log.jsonl` records every event (worker
started, job started/done/failed/retried, worker died) with times and pids.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from circuits import files as files_mod
from circuits.errors import CircuitsError
from circuits.sweep import grid as grid_mod
from circuits.sweep.grid import Job

LOCK = "sweep.lock"
LOG = "sweep-log.jsonl"
MAX_ATTEMPTS = 2                       # a failing job is retried once
MAX_START_FAILURES = 3                 # a worker slot dying this often before it is ready stops the sweep


class SweepLocked(CircuitsError, RuntimeError):
    """Another live sweep is writing the directory."""


@dataclass
class SweepResult:
    jobs: list[Job]
    skipped: list[str] = field(default_factory=list)       # keys done before this run
    done: list[str] = field(default_factory=list)          # keys done in this run
    failed: dict[str, str] = field(default_factory=dict)   # key → error
    seconds: float = 0.0                                   # the whole command: grid read to summary written
    startup_seconds: float | None = None                   # Ray import and start/join
    stop_seconds: float | None = None                      # Ray stop (a local instance started for the sweep)
    worker_startup: dict[int, float] = field(default_factory=dict)   # pid → seconds importing before its jobs
    model_loads: dict[int, float] = field(default_factory=dict)      # pid → seconds loading models
    job_seconds: dict[str, float] = field(default_factory=dict)      # key → the job's own time (job.py)
    interrupted: bool = False
    workers: int = 0
    files: list[str] = field(default_factory=list)         # summary and figures written


# ---- the lock --------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def directory_lock(out: Path, note=print):
    """Refuse a second sweep on the same directory; take over the lock of a dead one."""
    path = out / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
                pid, host = int(other["pid"]), str(other.get("host", ""))
            except (OSError, ValueError, KeyError, TypeError):
                if time.time() - path.stat().st_mtime < 10:     # being written this moment
                    raise SweepLocked(f"{out} is locked by another sweep ({path} is being written)") from None
                other, pid, host = {}, -1, mine["host"]       # unreadable and old: a crashed writer
            if host == mine["host"] and not _alive(pid):
                path.unlink(missing_ok=True)
                note(f"note: removed the stale lock of sweep pid {pid} (no such process)")
                continue
            raise SweepLocked(f"{out} is being written by another sweep (pid {pid} on {host}, since "
                              f"{other.get('started', '?')}); wait for it, or delete {path} if it is gone")
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


# ---- what is done ----------------------------------------------------------------------------

def recorded_settings(path: Path) -> dict | None:
    """The sweep record in a circuit file's provenance, or None (no file, not ours, unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["provenance"]["sweep"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_done(job: Job, out: Path) -> bool:
    record = recorded_settings(out / job.name)
    return record is not None and record.get("key") == job.key and record.get("settings") == job.settings


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: str, **fields) -> None:
        self.file.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---- scheduling ------------------------------------------------------------------------------

def _kind(job: Job) -> tuple:
    """Jobs of one kind take about as long as each other (the key of the time estimates)."""
    s = job.settings
    return s["model"], s["task"], s["method"], s.get("n"), s.get("steps"), s["curve"]


def _pick(pending: deque, slot_model, slot_res, busy_models: set, expected: dict) -> Job | None:
    """The next job for a slot: among those on the model it holds (else on a model no other worker
    is on, else all that fit its resources), the one expected to take longest — a kind not timed
    yet counts as longest —, so that the sweep ends on its short jobs and no worker idles long
    while another finishes."""
    fits = [j for j in pending if slot_res is None or j.resources == slot_res]
    if not fits:
        return None
    group = ([j for j in fits if j.model_key == slot_model] or [j for j in fits if j.model_key not in busy_models]
             or fits)
    choice = max(group, key=lambda j: expected.get(_kind(j), math.inf))      # the first of equals
    pending.remove(choice)
    return choice


def _schedule(pool, todo: list[Job], out: Path, log: Log, result: SweepResult, bar) -> None:
    pending = deque(todo)
    attempts: Counter = Counter()
    # the jobs each slot holds, in the order its worker runs them: the first is running
    held: dict[int, deque[Job]] = {slot: deque() for slot in range(pool.size)}
    slot_model: dict[int, tuple] = {}
    pids: dict[int, int] = {}
    deaths_before_ready: Counter = Counter()     # a worker that cannot even start is not retried forever
    timed: dict[tuple, list[float]] = {}         # kind → own times of its finished jobs
    expected: dict[tuple, float] = {}            # kind → their mean

    def show() -> None:
        bar.set_postfix_str(f"done {len(result.done)}, failed {len(result.failed)}")

    def failure(job: Job, error: str) -> None:
        attempts[job.key] += 1
        if attempts[job.key] < MAX_ATTEMPTS:
            log("retry", job=job.name, error=error)
            pending.append(job)
        else:
            log("failed", job=job.name, error=error, attempts=attempts[job.key])
            result.failed[job.key] = error
            show()
            bar.update(1)

    def started(slot: int) -> None:
        """The slot's first job is running now (its worker takes it as soon as the one before ends)."""
        if held[slot]:
            job = held[slot][0]
            log("start", job=job.name, slot=slot, pid=pids.get(slot), attempt=attempts[job.key] + 1)

    def submit_free() -> None:
        # every idle worker gets a job, then each a second one queued behind it, so it never waits
        # for this process between jobs; near the end (fewer jobs left than workers) no second
        # one, so that no worker idles while another has a job queued
        for depth in (1, 2):
            for slot in range(pool.size):
                if len(held[slot]) >= depth or not pending or (depth == 2 and len(pending) < pool.size):
                    continue
                busy = {slot_model.get(s) for s in held if held[s] and s != slot}
                job = _pick(pending, slot_model.get(slot), pool.resources[slot], busy, expected)
                if job is None:
                    continue
                pool.submit(slot, job)
                held[slot].append(job)
                slot_model[slot] = job.model_key
                if len(held[slot]) == 1:
                    started(slot)

    try:
        while pending or any(held.values()):
            submit_free()
            finished = []
            for ev in pool.events(timeout=0.5):
                if ev.kind == "ready":
                    pid, startup = ev.payload
                    pids[ev.slot] = pid
                    deaths_before_ready[ev.slot] = 0
                    result.worker_startup[pid] = startup
                    log("worker", slot=ev.slot, pid=pid, startup_seconds=round(startup, 3))
                    continue
                if ev.kind == "died":
                    jobs = list(held[ev.slot])
                    held[ev.slot].clear()
                    log("worker-died", slot=ev.slot, pid=pids.get(ev.slot), reason=ev.payload,
                        job=jobs[0].name if jobs else None, requeued=[j.name for j in jobs[1:]])
                    slot_model.pop(ev.slot, None)
                    if ev.slot not in pids:
                        deaths_before_ready[ev.slot] += 1
                        if deaths_before_ready[ev.slot] >= MAX_START_FAILURES:
                            from circuits.sweep.pools import ExecutorError
                            raise ExecutorError(f"the sweep's workers cannot start: {ev.payload}")
                    pids.pop(ev.slot, None)
                    pool.replace(ev.slot)
                    pending.extendleft(reversed(jobs[1:]))      # queued, never started: no attempt spent
                    if jobs:
                        failure(jobs[0], str(ev.payload))
                    continue
                outcome = ev.payload
                if not held[ev.slot] or outcome.key != held[ev.slot][0].key:
                    continue                       # a reply from before a replacement
                job = held[ev.slot].popleft()
                started(ev.slot)
                if outcome.load_seconds:
                    result.model_loads[outcome.pid] = result.model_loads.get(outcome.pid, 0.0) + outcome.load_seconds
                if outcome.error is not None:
                    failure(job, outcome.error)
                    continue
                finished.append((job, outcome))
            submit_free()                  # the workers get their next jobs before the files are written
            for job, outcome in finished:
                files_mod.write_bytes(out / job.name, outcome.data)
                result.done.append(job.key)
                result.job_seconds[job.key] = outcome.seconds
                times = timed.setdefault(_kind(job), [])
                times.append(outcome.seconds)
                expected[_kind(job)] = sum(times) / len(times)
                log("done", job=job.name, seconds=round(outcome.seconds, 3), pid=outcome.pid,
                    model_load_seconds=round(outcome.load_seconds, 3) if outcome.load_seconds else None,
                    edges=outcome.stats["edges"], faithfulness=outcome.stats["faithfulness"])
                show()
                bar.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
        log("interrupted", in_flight=[q[0].name for q in held.values() if q],
            queued=[j.name for q in held.values() for j in list(q)[1:]])
        raise


def default_workers(n_jobs: int, cpus: float, memory: int | None = None) -> int:
    """One worker per `cpus` CPUs of this machine, no more than its memory holds at `memory`
    bytes each (when the grid says), at most one per job."""
    n = int((os.cpu_count() or 1) // max(cpus, 1e-9))
    if memory:
        n = min(n, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // memory))
    return max(1, min(n_jobs, n))


def run(grid_path: str | Path, out_dir: str | Path, *, executor: str = "local", address: str | None = None,
        workers: int | None = None, quiet: bool = False, jobs: list[Job] | None = None,
        echo=print) -> SweepResult:
    """Run (or resume) the sweep of a grid file into out_dir. Every grid problem is raised before
    any job starts; job failures are recorded, not raised. Ctrl-C writes the summary, then re-raises."""
    t0 = time.perf_counter()
    from circuits.sweep import report
    jobs = grid_mod.load(grid_path) if jobs is None else jobs
    ray_import = None
    if executor == "ray":
        from circuits.sweep.pools import import_ray
        t = time.perf_counter()
        import_ray()
        ray_import = time.perf_counter() - t       # Ray's start-up begins with its import
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(jobs, startup_seconds=ray_import)
    with directory_lock(out, note=lambda m: echo(m, file=sys.stderr)):
        for leftover in out.glob("*.json.tmp"):
            leftover.unlink()                      # a write cut short by a crash; its job reruns
        result.skipped = [j.key for j in jobs if is_done(j, out)]
        todo = [j for j in jobs if j.key not in set(result.skipped)]
        log = Log(out / LOG)
        log("sweep-start", grid=str(grid_path), jobs=len(jobs), done_before=len(result.skipped),
            to_run=len(todo), executor=executor, pid=os.getpid())
        def summarize() -> None:
            if not result.files:
                result.files = report.write(out, jobs, result.failed)

        try:
            if todo:
                _run_todo(todo, out, log, result, executor, address, workers, quiet, echo, summarize)
        finally:
            try:
                summarize()
            finally:
                result.seconds = time.perf_counter() - t0
                log("sweep-end", done=len(result.done), failed=len(result.failed),
                    interrupted=result.interrupted, seconds=round(result.seconds, 3))
                log.close()
    return result


def _run_todo(todo, out, log, result, executor, address, workers, quiet, echo, summarize) -> None:
    from circuits.sweep import pools
    groups = Counter(j.resources for j in todo)
    where = "local workers"
    session = pools.ray_session(address) if executor == "ray" else _nothing()
    closed = None
    try:
        with session as startup:
            if executor == "ray":
                result.startup_seconds = (result.startup_seconds or 0.0) + startup
                pool = pools.RayPool(_ray_sizes(groups, pools.ray_capacity(), workers))
                where = f"Ray actors ({'cluster ' + address if address else 'local Ray'}, started in {startup:.1f}s)"
            else:
                cpus = max(r.cpus for r in groups)
                memory = max((r.memory or 0) for r in groups) or None
                size = min(len(todo), workers or default_workers(len(todo), cpus, memory))
                pool = pools.LocalPool(size, threads=max(1, (os.cpu_count() or 1) // size))
            result.workers = pool.size
            from tqdm import tqdm         # once the workers are starting
            echo(f"sweep: {len(result.jobs)} jobs ({len(result.skipped)} done before, {len(todo)} to run) "
                 f"on {pool.size} {where} -> {out}")
            bar = tqdm(total=len(todo), desc="sweep", unit="job", disable=quiet, dynamic_ncols=True)
            try:
                _schedule(pool, todo, out, log, result, bar)
            finally:
                bar.close()
                try:
                    summarize()   # on the CPUs the idle workers leave free
                finally:
                    pool.close()  # every result is written: the workers hold nothing worth waiting for
                    closed = time.perf_counter()
    finally:
        if executor == "ray" and closed is not None:
            result.stop_seconds = time.perf_counter() - closed


def _ray_sizes(groups: Counter, capacity: dict, workers: int | None) -> dict:
    """Actors per kind of job resources: as many as the cluster fits, at most one per job (and
    --workers)."""
    from circuits.sweep import pools
    sizes = {}
    for res in groups:
        pools.check_fits(res, capacity)
    for res, n in groups.items():
        fit = int(capacity.get("CPU", 1) // max(res.cpus, 1e-9))
        if res.gpus:
            fit = min(fit, int(capacity.get("GPU", 0) // res.gpus))
        sizes[res] = max(1, min(n, workers or fit))
    return sizes


@contextmanager
def _nothing():
    yield None
