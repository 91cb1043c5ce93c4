"""Checks of a sweep grid's single values (models, tasks, methods, numbers, resources): each
returns the canonical value or raises `GridError` naming the entry. Imports no torch; the
registries it consults are imported where a check needs them."""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from circuits.errors import CircuitsError

SEARCH_METHODS = ("acdc", "hybrid")
RESOURCE_KEYS = ("cpus", "gpus", "memory")


class GridError(CircuitsError, ValueError):
    """A grid file that cannot be run; the message names the file and the entry."""


@dataclass(frozen=True)
class Resources:
    """What one job needs; Ray places actors by it, the local pool sizes itself by cpus."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None          # bytes

    def ray_options(self) -> dict:
        opts = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            opts["memory"] = self.memory
        return opts


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def as_list(value, where: str) -> list:
    if isinstance(value, list):
        if not value:
            raise GridError(f"{where} is empty: the product would have no jobs")
        return value
    if isinstance(value, dict):
        raise GridError(f"{where}: expected a value or a list of values, got a table")
    return [value]


def as_int(v, where, low=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise GridError(f"{where}: expected an integer, got {v!r}")
    if low is not None and v < low:
        raise GridError(f"{where}: must be at least {low}, got {v}")
    return v


def as_float(v, where, low=0.0, high=None, open_low=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GridError(f"{where}: expected a number, got {v!r}")
    if v < low or (open_low and v == low) or (high is not None and v > high):
        span = f"({low}, {high}]" if open_low else f">= {low}" if high is None else f"[{low}, {high}]"
        raise GridError(f"{where}: must be {span}, got {v}")
    return float(v)


def choice(v, where, choices, what):
    if not isinstance(v, str) or v not in choices:
        raise GridError(f"{where}: unknown {what} {v!r}{suggest(str(v), choices)} "
                        f"(choose from {', '.join(choices)})")
    return v


def _builtin_models() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "builtin"
    return sorted(d.name for d in root.iterdir() if (d / "meta.json").is_file()) if root.is_dir() else []


def _hub_cached(spec: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(spec, "config.json")
    return isinstance(found, str)


def check_model(spec, where: str) -> str:
    """Refuse a spec that cannot load, without loading anything (random: names need the loader)."""
    if not isinstance(spec, str) or not spec:
        raise GridError(f"{where}: expected a model spec (a string), got {spec!r}")
    builtin = _builtin_models()
    if spec in builtin:
        return spec
    if spec.startswith("random:"):
        from circuits.model.loader import (
            RANDOM_ARCHS,  # the names live beside their builders
        )
        arch = spec.split(":", 1)[1]
        if arch not in RANDOM_ARCHS:
            raise GridError(f"{where}: unknown random architecture {arch!r}{suggest(arch, RANDOM_ARCHS)} "
                            f"(choose from {', '.join(RANDOM_ARCHS)})")
        return spec
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    if spec.startswith((".", "/", "~")):
        raise GridError(f"{where}: {spec}: no such model directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) or _hub_cached(spec):
        return spec                    # a hub id: org/name, or one already in the local cache
    raise GridError(f"{where}: unknown model {spec!r}{suggest(spec, builtin)} (built-in: {', '.join(builtin)}; "
                    f"or random:<arch>, a checkpoint directory, or a hub id written org/name)")


def check_task(spec, where: str, base: Path) -> tuple[str, str | None]:
    """(task spec for the job, sha256 of the file or None for a built-in task)."""
    from circuits.tasks.builtin import TASKS
    if not isinstance(spec, str) or not spec:
        raise GridError(f"{where}: expected a task name or file, got {spec!r}")
    if spec in TASKS:
        return spec, None
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise GridError(f"{where}: unknown task {spec!r}: neither a built-in task nor a file "
                        f"(relative to the grid){suggest(spec, TASKS)}; built-in: {', '.join(TASKS)}")
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_method(v, where: str) -> str:
    from circuits.methods.registry import REGISTRY
    return choice(v, where, sorted(REGISTRY) + list(SEARCH_METHODS), "method")


def takes_steps(method: str) -> bool:
    from circuits.methods.registry import REGISTRY
    return method == "hybrid" or (method in REGISTRY and "steps" in REGISTRY[method].defaults)


def _memory(v, where) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*", str(v), re.IGNORECASE)
    if not m:
        raise GridError(f"{where}: expected bytes or a size like '4GB', got {v!r}")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def resources(table, where: str) -> Resources:
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a table with {', '.join(RESOURCE_KEYS)}")
    for k in table:
        if k not in RESOURCE_KEYS:
            raise GridError(f"{where}: unknown resource {k!r}{suggest(k, RESOURCE_KEYS)} "
                            f"(choose from {', '.join(RESOURCE_KEYS)})")
    return Resources(cpus=as_float(table.get("cpus", 1), f"{where}.cpus", 0.0, open_low=True) if "cpus" in table else 1.0,
                     gpus=as_float(table.get("gpus", 0), f"{where}.gpus"),
                     memory=_memory(table["memory"], f"{where}.memory") if "memory" in table else None)
