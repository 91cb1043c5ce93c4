"""What a worker hands back for a job (torch-free: the sweep process reads it without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outcome:
    """The circuit file's bytes (the sweep process writes them) or the job's error."""

    key: str
    pid: int
    seconds: float                     # the job's own time (circuits/sweep/job.py), model loading excluded
    load_seconds: float = 0.0          # loading the model, when this job loaded it
    data: bytes | None = None          # the circuit file, UTF-8 JSON
    stats: dict | None = None          # edges, total_edges, faithfulness
    error: str | None = None
