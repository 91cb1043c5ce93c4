"""Drive a sweep: lock the directory, skip the jobs already done, run the rest on a pool
(retrying a failure once), write each circuit as it arrives, then the summary and figures.

Only the driver writes into the directory, each circuit file atomically, so a killed worker or
Ctrl-C costs the jobs in flight and nothing else. `sweep-log.jsonl` records every event (worker
started, job started/done/failed/retried, worker died) with times and pids.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    seconds: float = 0.0
    startup_seconds: float | None = None                   # Ray start/join
    worker_startup: list[float] = field(default_factory=list)
    job_seconds: dict[str, float] = field(default_factory=dict)
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

def _pick(pending: deque, slot_model, slot_res, busy_models: set) -> Job | None:
    """The next job for a slot: one on the model it holds, else one whose model no other worker
    is on, else the first that fits its resources."""
    fits = [j for j in pending if slot_res is None or j.resources == slot_res]
    if not fits:
        return None
    choice = (next((j for j in fits if j.model_key == slot_model), None)
              or next((j for j in fits if j.model_key not in busy_models), None) or fits[0])
    pending.remove(choice)
    return choice


def _save(circuit, path: Path) -> None:
    from circuits import (
        circuit as circuit_io,  # torch: imported once the workers are busy
    )
    circuit_io.save(circuit, path)


def _schedule(pool, todo: list[Job], out: Path, log: Log, result: SweepResult, bar) -> None:
    pending = deque(todo)
    attempts: Counter = Counter()
    inflight: dict[int, tuple[Job, float]] = {}
    slot_model: dict[int, tuple] = {}
    pids: dict[int, int] = {}
    deaths_before_ready: Counter = Counter()     # a worker that cannot even start is not retried forever

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

    def submit_free() -> None:
        busy = {slot_model.get(s) for s in inflight}
        for slot in range(pool.size):
            if slot in inflight or not pending:
                continue
            job = _pick(pending, slot_model.get(slot), pool.resources[slot], busy)
            if job is None:
                continue
            pool.submit(slot, job)
            inflight[slot] = (job, time.perf_counter())
            slot_model[slot] = job.model_key
            busy.add(job.model_key)
            log("start", job=job.name, slot=slot, pid=pids.get(slot), attempt=attempts[job.key] + 1)

    try:
        while pending or inflight:
            submit_free()
            finished = []
            for ev in pool.events(timeout=0.5):
                if ev.kind == "ready":
                    pid, startup = ev.payload
                    pids[ev.slot] = pid
                    deaths_before_ready[ev.slot] = 0
                    if startup is not None:
                        result.worker_startup.append(startup)
                    log("worker", slot=ev.slot, pid=pid, startup_seconds=startup and round(startup, 3))
                    continue
                job, _ = inflight.pop(ev.slot, (None, 0.0))
                if ev.kind == "died":
                    log("worker-died", slot=ev.slot, pid=pids.get(ev.slot), reason=ev.payload,
                        job=job.name if job else None)
                    slot_model.pop(ev.slot, None)
                    if ev.slot not in pids:
                        deaths_before_ready[ev.slot] += 1
                        if deaths_before_ready[ev.slot] >= MAX_START_FAILURES:
                            from circuits.sweep.pools import ExecutorError
                            raise ExecutorError(f"the sweep's workers cannot start: {ev.payload}")
                    pids.pop(ev.slot, None)
                    pool.replace(ev.slot)
                    if job is not None:
                        failure(job, str(ev.payload))
                    continue
                outcome = ev.payload
                if job is None or outcome.key != job.key:
                    continue                       # a reply from before a replacement
                if outcome.error is not None:
                    failure(job, outcome.error)
                    continue
                finished.append((job, outcome))
            submit_free()                  # the workers get their next jobs before the files are written
            for job, outcome in finished:
                _save(outcome.circuit, out / job.name)
                result.done.append(job.key)
                result.job_seconds[job.key] = outcome.seconds
                log("done", job=job.name, seconds=round(outcome.seconds, 3), pid=outcome.pid,
                    edges=outcome.stats["edges"], faithfulness=outcome.stats["faithfulness"])
                show()
                bar.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
        log("interrupted", in_flight=[j.name for j, _ in inflight.values()])
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
    from circuits.sweep import report
    jobs = grid_mod.load(grid_path) if jobs is None else jobs
    if executor == "ray":
        from circuits.sweep.pools import import_ray
        import_ray()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(jobs)
    t0 = time.perf_counter()
    with directory_lock(out, note=lambda m: echo(m, file=sys.stderr)):
        for leftover in out.glob("*.json.tmp"):
            leftover.unlink()                      # a write cut short by a crash; its job reruns
        result.skipped = [j.key for j in jobs if is_done(j, out)]
        todo = [j for j in jobs if j.key not in set(result.skipped)]
        log = Log(out / LOG)
        log("sweep-start", grid=str(grid_path), jobs=len(jobs), done_before=len(result.skipped),
            to_run=len(todo), executor=executor, pid=os.getpid())
        try:
            if todo:
                _run_todo(todo, out, log, result, executor, address, workers, quiet, echo)
        finally:
            result.seconds = time.perf_counter() - t0
            log("sweep-end", done=len(result.done), failed=len(result.failed), interrupted=result.interrupted,
                seconds=round(result.seconds, 3))
            log.close()
            result.files = report.write(out, jobs, result.failed)
    return result


def _run_todo(todo, out, log, result, executor, address, workers, quiet, echo) -> None:
    from tqdm import tqdm

    from circuits.sweep import pools
    groups = Counter(j.resources for j in todo)
    where = "local workers"
    if executor == "ray":
        session = pools.ray_session(address)
    else:
        session = _nothing()
    with session as startup:
        if executor == "ray":
            result.startup_seconds = startup
            capacity = pools.ray_capacity()
            for res in groups:
                pools.check_fits(res, capacity)
            sizes = {}
            for res, n in groups.items():
                fit = int(capacity.get("CPU", 1) // max(res.cpus, 1e-9))
                if res.gpus:
                    fit = min(fit, int(capacity.get("GPU", 0) // res.gpus))
                sizes[res] = max(1, min(n, workers or fit))
            pool = pools.RayPool(sizes)
            where = f"Ray actors ({'cluster ' + address if address else 'local Ray'}, started in {startup:.1f}s)"
        else:
            cpus = max(r.cpus for r in groups)
            memory = max((r.memory or 0) for r in groups) or None
            size = min(len(todo), workers or default_workers(len(todo), cpus, memory))
            pool = pools.LocalPool(size, threads=max(1, (os.cpu_count() or 1) // size))
        result.workers = pool.size
        echo(f"sweep: {len(result.jobs)} jobs ({len(result.skipped)} done before, {len(todo)} to run) "
             f"on {pool.size} {where} -> {out}")
        # the driver writes the circuit files (torch): import it while the workers start, not
        # when the first result arrives and the workers wait for their next jobs
        threading.Thread(target=importlib.import_module, args=("circuits.circuit",), daemon=True).start()
        bar = tqdm(total=len(todo), desc="sweep", unit="job", disable=quiet, dynamic_ncols=True)
        try:
            _schedule(pool, todo, out, log, result, bar)
        finally:
            bar.close()
            pool.close()          # every result is written: the workers hold nothing worth waiting for


@contextmanager
def _nothing():
    yield None
