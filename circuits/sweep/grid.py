"""A sweep grid (TOML or JSON) → checked, de-duplicated Job records. Imports no torch.

    models  = ["induction-2l", "ioi-3l"]         # required; a scalar is a one-item list
    tasks   = ["induction", "ioi"]               # required; built-in names or task files
    methods = ["eap", "eap-ig-inputs"]           # required
    seeds = [0, 1]            ablations = ["resample"]        n = 64     metric = "logit-diff"
    top_n = [20, 50]          # selection alternatives: top_n, threshold, greedy,
                              # target_faithfulness (default: target_faithfulness 0.8)
    steps = 5   tau = 0.01   acdc_metric = "kl"   candidates = 40   prune = true
    batch_size = 32   device = "cpu"   curve = true    # curve: MIB faithfulness curve, CPR/CMD
    exclude = [{model = "induction-2l", task = "ioi"}]     # drop matching jobs of the product
    include = [{model = "tracr-reverse", task = "tracr", ablation = "zero"}]   # extra sub-grids
    [resources]  cpus = 1   gpus = 0   memory = "4GB"          # per job (Ray places by these)

A setting applies to the jobs whose method uses it (steps to the integrated-gradient methods,
tau to acdc/hybrid, selection to scoring methods); a setting no job uses is refused. Task file
paths are relative to the grid file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from circuits.sweep.values import (
    SEARCH_METHODS,
    GridError,
    Resources,
    as_float,
    as_int,
    as_list,
    check_method,
    check_model,
    check_task,
    choice,
    resources,
    suggest,
    takes_steps,
)

ABLATIONS = ("resample", "mean", "mean-pos", "zero")
METRICS = ("logit-diff", "prob-diff", "logprob", "kl", "mse")
SELECTION_KEYS = ("top_n", "threshold", "greedy", "target_faithfulness")
DEFAULT_TARGET = 0.8
DEFAULT_TAU = 0.01
DEFAULT_STEPS = 5

# plural axis name → job setting name; the other axes keep one name for both
AXES = {"models": "model", "tasks": "task", "methods": "method", "seeds": "seed", "ablations": "ablation",
        "n": "n", "metric": "metric", "steps": "steps", "tau": "tau", "acdc_metric": "acdc_metric",
        "candidates": "candidates", **{k: k for k in SELECTION_KEYS}}
SCALARS = ("prune", "batch_size", "device", "curve")
TOP_LEVEL = tuple(AXES) + SCALARS + ("exclude", "include", "resources")
SETTING_NAMES = tuple(AXES.values()) + SCALARS


@dataclass(frozen=True, eq=False)
class Job:
    settings: dict                     # canonical settings (JSON types); identity of the job
    key: str                           # hash of the settings
    name: str                          # circuit file name inside the sweep directory
    resources: Resources = field(default_factory=Resources)

    @property
    def model_key(self) -> tuple:
        """Jobs with the same model key can share a loaded model (random weights depend on the seed)."""
        s = self.settings
        return (s["model"], s["seed"] if s["model"].startswith("random:") else None, s["device"])

    def label(self) -> str:
        s = self.settings
        return f"{s['model']} / {Path(s['task']).name} / {s['method']} / seed {s['seed']}"


# ---- reading ---------------------------------------------------------------------------------

def read(path: str | Path) -> dict:
    """The grid file's table; malformed files are refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file")
    text = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f", line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
            raise GridError(f"{path}: not valid JSON ({getattr(err, 'msg', err)}{where})") from None
    else:
        import tomllib
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            kind = "TOML" if path.suffix.lower() == ".toml" else "TOML (or .json)"
            raise GridError(f"{path}: not valid {kind} ({err})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid is a table of settings, not a JSON {type(data).__name__}")
    return data


def load(path: str | Path) -> list[Job]:
    """Read, check and expand a grid file into its jobs (grid order, duplicates removed)."""
    path = Path(path)
    return expand(read(path), base=path.resolve().parent, source=str(path))


# ---- expansion -------------------------------------------------------------------------------

def _axis_values(name: str, values: list, where: str, base: Path) -> list:
    """Check each value of an axis; returns the canonical values."""
    out = []
    for i, v in enumerate(values):
        at = f"{where}[{i}]" if len(values) > 1 else where
        if name == "model":
            out.append(check_model(v, at))
        elif name == "task":
            out.append(check_task(v, at, base))
        elif name == "method":
            out.append(check_method(v, at))
        elif name == "seed":
            out.append(as_int(v, at))
        elif name == "ablation":
            out.append(choice(v, at, ABLATIONS, "ablation"))
        elif name in ("metric", "acdc_metric"):
            out.append(choice(v, at, METRICS, "metric"))
        elif name in ("n", "steps", "candidates", "top_n", "greedy"):
            out.append(as_int(v, at, low=1))
        elif name in ("tau", "threshold"):
            out.append(as_float(v, at))
        elif name == "target_faithfulness":
            out.append(as_float(v, at, 0.0, 1.0, open_low=True))
    return out


def _scalar(name: str, v, where: str):
    if name in ("prune", "curve"):
        if not isinstance(v, bool):
            raise GridError(f"{where}: expected true or false, got {v!r}")
        return v
    if name == "batch_size":
        return as_int(v, where, low=1)
    if not isinstance(v, str) or not v:
        raise GridError(f"{where}: expected a torch device such as 'cpu' or 'cuda', got {v!r}")
    return v


def _entry_axes(table: dict, where: str, base: Path, *, top: bool) -> dict[str, list]:
    """{setting name: checked values} of the axes a table names (plural or singular keys)."""
    axes = {}
    for key, value in table.items():
        if key in ("exclude", "include", "resources") or key in SCALARS:
            continue
        name = AXES.get(key) or (key if key in AXES.values() and not top else None)
        if name is None:
            allowed = TOP_LEVEL if top else SETTING_NAMES
            raise GridError(f"{where}: unknown setting {key!r}{suggest(key, allowed)}")
        if name in axes:
            raise GridError(f"{where}: {key!r} given twice (as {name} and its plural)")
        at = f"{where}.{key}" if where else key
        axes[name] = _axis_values(name, as_list(value, at), at, base)
    return axes


def _settings(combo: dict, scalars: dict) -> dict:
    """One job's canonical settings: only what its method uses, defaults made explicit."""
    task, task_sha = combo["task"]
    method = combo["method"]
    s = {"model": combo["model"], "task": task, "method": method, "seed": combo["seed"],
         "ablation": combo["ablation"]}
    if task_sha is None:
        s["n"] = combo["n"]                 # built-in tasks are generated with n examples
    else:
        s["task_sha256"] = task_sha          # a changed file is a different job
    if combo.get("metric") is not None:
        s["metric"] = combo["metric"]
    if method in SEARCH_METHODS:
        s["tau"] = combo.get("tau", DEFAULT_TAU)
        if combo.get("acdc_metric") is not None:
            s["acdc_metric"] = combo["acdc_metric"]
        if method == "hybrid" and combo.get("candidates") is not None:
            s["candidates"] = combo["candidates"]
    else:
        key, value = combo["selection"]
        s[key] = value
    if takes_steps(method):
        s["steps"] = combo.get("steps", DEFAULT_STEPS)
    s["prune"] = scalars["prune"]
    if scalars.get("batch_size") is not None:
        s["batch_size"] = scalars["batch_size"]
    s["device"] = scalars["device"]
    s["curve"] = scalars["curve"]
    return s


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def job_name(s: dict, key: str) -> str:
    """Readable and unique: model.task.method.seedN.ablation.selection.HASH.json"""
    sel = next((f"{short}{s[k]:g}" for k, short in (("top_n", "top"), ("threshold", "thr"), ("greedy", "greedy"),
                                                     ("target_faithfulness", "f"), ("tau", "tau")) if k in s), "")
    parts = [Path(s["model"].replace("random:", "random-")).name, Path(s["task"]).stem, s["method"],
             f"seed{s['seed']}", s["ablation"], sel, key[:8]]
    return ".".join(_slug(p) for p in parts if p) + ".json"


def settings_key(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()


def _matches(rule: dict[str, list], s: dict) -> bool:
    """Every setting the rule names has one of its values (task values are (spec, sha) pairs)."""
    return all(s.get(name) in ([v[0] for v in values] if name == "task" else values)
               for name, values in rule.items())


def _selection_alternatives(axes: dict) -> list[tuple[str, float | int]]:
    alts = [(k, v) for k in SELECTION_KEYS for v in axes.get(k, [])]
    return alts or [("target_faithfulness", DEFAULT_TARGET)]


def _product(axes: dict[str, list], scalars: dict) -> list[dict]:
    names = ["model", "task", "method", "seed", "ablation", "n", "metric", "steps", "tau", "acdc_metric",
             "candidates"]
    defaults = {"seed": [0], "ablation": ["resample"], "n": [64], "metric": [None], "steps": [None],
                "tau": [None], "acdc_metric": [None], "candidates": [None]}
    lists = [axes.get(n, defaults.get(n)) for n in names] + [_selection_alternatives(axes)]
    out = []
    for values in itertools.product(*lists):
        combo = {n: v for n, v in zip(names, values) if v is not None}
        combo["selection"] = values[-1]
        out.append(_settings(combo, scalars))
    return out


def expand(data: dict, base: Path = Path("."), source: str = "grid") -> list[Job]:
    """The jobs of a grid table; every problem is a GridError naming the entry."""
    def fail(msg):
        raise GridError(f"{source}: {msg}")
    try:
        axes = _entry_axes(data, "", base, top=True)
        for required in ("models", "tasks", "methods"):
            if AXES[required] not in axes:
                fail(f"{required} is missing (a grid lists models, tasks and methods at least)")
        scalars = {"prune": True, "batch_size": None, "device": "cpu", "curve": False}
        for key in SCALARS:
            if key in data:
                scalars[key] = _scalar(key, data[key], key)
        res = resources(data["resources"], "resources") if "resources" in data else Resources()
        if "device" not in data and res.gpus > 0:
            scalars["device"] = "cuda"           # a job that asks for a GPU runs on it
        methods = axes["method"]
        _refuse_unused(axes, methods, data.get("include", []))

        product = _product(axes, scalars)
        excludes = _rules(data, "exclude", base)
        for i, rule in enumerate(excludes):
            if not any(_matches(rule, s) for s in product):
                fail(f"exclude[{i}] matches no job of the grid (check its names)")
        settings = [s for s in product if not any(_matches(rule, s) for rule in excludes)]
        jobs_res = [res] * len(settings)
        for i, (rule, table) in enumerate(zip(_rules(data, "include", base), data.get("include", []))):
            merged = {**axes, **rule}
            if any(k in rule for k in SELECTION_KEYS):       # its own selection replaces the grid's
                merged = {k: v for k, v in merged.items() if k not in SELECTION_KEYS or k in rule}
            r = resources(table["resources"], f"include[{i}].resources") if "resources" in table else res
            on_gpu = {"device": "cuda"} if r.gpus > 0 and "device" not in data else {}
            extra = _product(merged, {**scalars, **on_gpu})
            settings += extra
            jobs_res += [r] * len(extra)
    except GridError as err:
        if str(err).startswith(f"{source}: "):
            raise
        raise GridError(f"{source}: {err}") from None
    jobs, seen = [], set()
    for s, r in zip(settings, jobs_res):
        key = settings_key(s)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(s, key, job_name(s, key), r))
    if not jobs:
        raise GridError(f"{source}: the grid has no jobs: every combination is excluded")
    return jobs


def _rules(data: dict, kind: str, base: Path) -> list[dict[str, list]]:
    entries = data.get(kind, [])
    if not isinstance(entries, list):
        raise GridError(f"{kind}: expected a list of tables, e.g. {kind} = [{{model = \"...\", task = \"...\"}}]")
    rules = []
    for i, entry in enumerate(entries):
        where = f"{kind}[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise GridError(f"{where}: expected a non-empty table of settings, got {entry!r}")
        bad = [k for k in entry if k in SCALARS or k in ("exclude", "include")]
        if bad:
            raise GridError(f"{where}: {bad[0]!r} applies to the whole grid, not to one {kind} entry")
        if kind == "exclude" and "resources" in entry:
            raise GridError(f"{where}: resources belong to include entries or the grid")
        rules.append(_entry_axes({k: v for k, v in entry.items() if k != "resources"}, where, base, top=False))
    return rules


def _refuse_unused(axes: dict, methods: list[str], includes) -> None:
    """A setting that no method of the grid uses is a mistake: say so instead of ignoring it."""
    if isinstance(includes, list):
        for entry in includes:
            if isinstance(entry, dict):
                extra = entry.get("method", entry.get("methods", []))
                methods = methods + (extra if isinstance(extra, list) else [extra])
    scoring = [m for m in methods if m not in SEARCH_METHODS]
    uses = {"steps": any(takes_steps(m) for m in methods if isinstance(m, str)),
            "tau": any(m in SEARCH_METHODS for m in methods), "acdc_metric": any(m in SEARCH_METHODS for m in methods),
            "candidates": "hybrid" in methods, **{k: bool(scoring) for k in SELECTION_KEYS}}
    who = {"steps": "eap-ig-inputs, eap-ig-activations and hybrid", "tau": "acdc and hybrid",
           "acdc_metric": "acdc and hybrid", "candidates": "hybrid",
           **{k: "scoring methods (not acdc/hybrid)" for k in SELECTION_KEYS}}
    for name, used in uses.items():
        if name in axes and not used:
            raise GridError(f"{name}: applies to {who[name]}, and no method of the grid is one")

