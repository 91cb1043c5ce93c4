"""Executors: a local process pool and a pool of Ray actors, behind one small interface.

A pool has numbered slots, one worker each, holding one loaded model. The runner submits jobs to
a slot (a worker may hold a second job queued behind its running one, so it never waits for the
runner between jobs; a worker runs its jobs in the order given) and reads events: ("ready",
(pid, seconds)) when a worker has started (the seconds since the pool asked for it: a fresh
Python importing torch and circuits), ("result", Outcome) when a job ended (the Outcome
carries the job's error, if any), ("died", reason) when the worker itself is gone — killed, out
of memory — and the runner replaces it. A slot's results come back in the order of its jobs,
each before the slot's death, so knowing which jobs each slot holds is what lets a dead worker
cost only its running job (the ones queued behind it go back to the runner's queue).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from circuits.errors import CircuitsError
from circuits.sweep.grid import Resources


class ExecutorError(CircuitsError, RuntimeError):
    """The executor cannot run this sweep (Ray missing, unreachable, or too small for a job)."""


@dataclass
class Event:
    slot: int
    kind: str                 # "ready" | "result" | "died"
    payload: object = None


# ---- local processes -------------------------------------------------------------------------

def _local_worker(conn, threads: int) -> None:
    """A worker process: import once, then run jobs until told to stop. Ctrl-C goes to the
    driver only (it decides what to stop), so a terminal's interrupt cannot cut a job's reply."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    from tqdm import tqdm
    torch.set_num_threads(threads)
    # the jobs' (silent) bars would take a multiprocessing lock, a semaphore the exit below leaks
    tqdm.set_lock(threading.RLock())
    from circuits.sweep import job as job_mod
    conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    cache = job_mod.ModelCache()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            job = None
        if job is None:
            # nothing to save: skip the interpreter's teardown (torch's takes a second or more)
            conn.close()
            os._exit(0)
        # plain pickle: multiprocessing's own would move tensors through shared-memory handles
        conn.send_bytes(pickle.dumps(("result", job_mod.attempt(job, cache))))


class LocalPool:
    """`size` worker processes (spawned: the driver may hold torch threads, which fork copies badly)."""

    def __init__(self, size: int, threads: int):
        import multiprocessing as mp
        self.ctx = mp.get_context("spawn")
        self.threads = threads
        self.resources = [None] * size        # local slots take any job
        self.procs, self.conns = [None] * size, [None] * size
        # when each worker was asked for: the pool's start for the first ones (started one after
        # another, the last waits for the others), its replacement for a later one
        self.started = [time.perf_counter()] * size
        for slot in range(size):
            self._start(slot)

    @property
    def size(self) -> int:
        return len(self.procs)

    def _start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_local_worker, args=(child, self.threads), daemon=True,
                                name=f"circuits-sweep-{slot}")
        proc.start()
        child.close()
        self.procs[slot], self.conns[slot] = proc, parent

    def submit(self, slot: int, job) -> None:
        self.conns[slot].send(job)

    def events(self, timeout: float) -> list[Event]:
        from multiprocessing.connection import wait
        owner = {}
        for slot, (proc, conn) in enumerate(zip(self.procs, self.conns)):
            if proc is not None:
                owner[conn] = owner[proc.sentinel] = slot
        out = []
        for slot in sorted({owner[r] for r in wait(list(owner), timeout)}):
            proc, conn = self.procs[slot], self.conns[slot]
            try:
                if conn.poll():
                    kind, payload = pickle.loads(conn.recv_bytes())
                    if kind == "ready":
                        payload = (payload, time.perf_counter() - self.started[slot])
                    out.append(Event(slot, kind, payload))
                    continue
            except (EOFError, OSError):
                pass
            if not proc.is_alive():
                proc.join()
                out.append(Event(slot, "died", f"worker process {proc.pid} exited with code {proc.exitcode}"))
                self.procs[slot] = None           # reported once; the runner replaces it
        return out

    def replace(self, slot: int) -> None:
        self.started[slot] = time.perf_counter()
        old = self.procs[slot]
        if old is not None and old.is_alive():
            old.kill()
            old.join()
        self.conns[slot].close()
        self._start(slot)

    def close(self) -> None:
        """Ask the workers to exit (they hold no unsaved state), without waiting for the system to
        tear their processes down (tens of ms each): a thread reaps them, killing what has not
        exited a second later."""
        for proc, conn in zip(self.procs, self.conns):
            if proc is not None:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        procs = [p for p in self.procs if p is not None]
        threading.Thread(target=_reap, args=(procs, list(self.conns)), daemon=True,
                         name="circuits-sweep-reaper").start()


def _reap(procs, conns) -> None:
    deadline = time.monotonic() + 1.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


# ---- Ray actors ------------------------------------------------------------------------------

class SweepActor:
    """One Ray actor: one loaded model at a time, reused across the jobs it is given."""

    def __init__(self, threads: int):
        import torch
        torch.set_num_threads(threads)
        from circuits.sweep import job as job_mod
        self.cache = job_mod.ModelCache()

    def ready(self) -> int:
        return os.getpid()

    def run(self, job):
        from circuits.sweep import job as job_mod
        return job_mod.attempt(job, self.cache)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'circuits[ray]' (or pip install ray)") from None
    return ray


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):
    """Join a cluster (address), reuse a Ray already started in this process, or start a local
    instance that stops with the sweep. Yields the seconds it took to be ready."""
    ray = import_ray()
    t0 = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        try:
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}   # our log says what happened
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ExecutorError(f"could not start or join {where}: {str(err).splitlines()[0]}") from None
    try:
        yield time.perf_counter() - t0
    finally:
        if owned:
            ray.shutdown()


def ray_capacity() -> dict:
    ray = import_ray()
    return dict(ray.cluster_resources())


def check_fits(res: Resources, capacity: dict) -> None:
    """Refuse a job that no node of the cluster could ever hold (it would wait forever)."""
    need = {"CPU": res.cpus, "GPU": res.gpus, "memory": res.memory or 0}
    names = {"CPU": "CPUs", "GPU": "GPUs", "memory": "bytes of memory"}
    for kind, amount in need.items():
        if amount and capacity.get(kind, 0) < amount:
            raise ExecutorError(f"each job asks for {amount:g} {names[kind]} (grid [resources]); the Ray cluster "
                                f"has {capacity.get(kind, 0):g}")


def _reason(err: Exception) -> str:
    """Ray's error text in one line: its first line, and the underlying exception (its last line)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    return lines[0][:160] + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")


class RayPool:
    """Ray actors, `sizes[resources]` of each kind; Ray places them by their resources."""

    def __init__(self, sizes: dict[Resources, int]):
        ray = import_ray()
        self.ray = ray
        self.resources: list[Resources] = [r for r, n in sizes.items() for _ in range(n)]
        self.actors: list = [None] * len(self.resources)
        self.started = [time.perf_counter()] * len(self.resources)     # as in LocalPool
        self.refs: dict = {}                 # object ref → (slot, "ready" | "result")
        for slot in range(len(self.resources)):
            self._start(slot)

    @property
    def size(self) -> int:
        return len(self.actors)

    def _start(self, slot: int) -> None:
        res = self.resources[slot]
        cls = self.ray.remote(SweepActor).options(max_restarts=0, max_task_retries=0, **res.ray_options())
        actor = cls.remote(max(1, int(res.cpus)))
        self.actors[slot] = actor
        self.refs[actor.ready.remote()] = (slot, "ready")

    def submit(self, slot: int, job) -> None:
        self.refs[self.actors[slot].run.remote(job)] = (slot, "result")

    def events(self, timeout: float) -> list[Event]:
        if not self.refs:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if not ready:
            return []
        # everything finished by now, in the order submitted: a dead actor's finished jobs come
        # back before its death
        done = set(self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)[0]) | set(ready)
        out = []
        for ref in [r for r in self.refs if r in done]:
            if ref not in self.refs:
                continue                      # dropped with its dead actor below
            slot, kind = self.refs.pop(ref)
            try:
                value = self.ray.get(ref)
                if kind == "ready":
                    value = (value, time.perf_counter() - self.started[slot])
                out.append(Event(slot, kind, value))
            except self.ray.exceptions.RayError as err:
                for other in [r for r, (s, _) in self.refs.items() if s == slot]:
                    del self.refs[other]     # the rest of a dead actor's calls will not come back
                out.append(Event(slot, "died", f"Ray actor died ({type(err).__name__}: {_reason(err)})"))
        return out

    def replace(self, slot: int) -> None:
        self.started[slot] = time.perf_counter()
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:                     # noqa: BLE001 - already gone
            pass
        for other in [r for r, (s, _) in self.refs.items() if s == slot]:
            del self.refs[other]
        self._start(slot)

    def close(self) -> None:
        """Kill the actors (Ray does it in the background; they hold no unsaved state)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:                 # noqa: BLE001
                pass
        self.refs.clear()
