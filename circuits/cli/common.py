"""What the command modules share: exit codes, argument types and checks, output helpers,
and loading the model and task named on the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_BAR = 0, 2, 1
ABLATIONS = ["resample", "mean", "mean-pos", "zero"]


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line (with where to look), like every other error."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _print_json(obj) -> None:
    """JSON on stdout; NaN/inf (not JSON) are printed as null and named on stderr."""
    from circuits.files import json_safe
    replaced: list[str] = []
    print(json.dumps(json_safe(obj, replaced=replaced), indent=1, allow_nan=False))
    note_nulls(replaced)


def note_nulls(replaced: list[str], where: str = "the JSON output") -> None:
    if replaced:
        shown = ", ".join(replaced[:4]) + (f" and {len(replaced) - 4} more" if len(replaced) > 4 else "")
        print(f"note: {shown} undefined (NaN or infinite): written as null in {where}", file=sys.stderr)


def plural(n: int, noun: str) -> str:
    """'1 example', '2 examples' (every noun the CLI counts takes a plain -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _examples(task) -> str:
    """'64 examples', or '1 example (4 answer-token rows)' for multi-token answers."""
    n = task.meta.get("examples", len(task))
    text = plural(n, "example")
    if n != len(task):
        text += f" ({len(task)} answer-token rows)"
    dropped = task.meta.get("dropped")
    if dropped:
        text += "; dropped " + ", ".join(f"{v} ({k})" for k, v in dropped.items())
    return text


def check_task_spec(spec: str) -> None:
    """A task spec names a built-in task or an existing file; checked before anything heavy."""
    import difflib

    from circuits.tasks.builtin import TASKS, is_builtin
    if not is_builtin(spec) and not Path(spec).exists():
        close = difflib.get_close_matches(spec, list(TASKS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise FileNotFoundError(f"unknown task {spec!r}: neither a built-in task nor a file; {hint}"
                                f"built-in tasks: {', '.join(TASKS)} (circuits tasks)")


TASK_FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def check_model_spec(spec: str) -> None:
    """A model spec that is no built-in name, `random:`/`hf:` spec or existing path fails here,
    in a fraction of a second and without the network (the hub is used only when asked: hf:ID)."""
    import difflib

    from circuits.tasks.builtin import TASKS
    builtin_dir = Path(__file__).resolve().parent.parent / "builtin"
    from circuits.model.gguf import PACKAGED        # packaged GGUF models (smollm2-135m); torch-free
    names = sorted(d.name for d in builtin_dir.iterdir() if (d / "meta.json").is_file()) if builtin_dir.is_dir() else []
    names += sorted(PACKAGED)
    path = Path(spec).expanduser()
    if spec in TASKS or (path.is_file() and path.suffix.lower() in TASK_FILE_SUFFIXES):
        raise ValueError(f"{spec!r} is a task, not a model: the model comes first "
                         f"(circuits COMMAND MODEL TASK, e.g. circuits discover induction-2l induction)")
    if spec in names or path.exists():
        return
    scheme = spec.split(":", 1)[0] if ":" in spec.split("/", 1)[0] else None
    if scheme is not None:                    # random:<arch>, hf:<id> and other loaders' schemes
        return
    close = difflib.get_close_matches(spec, names, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(f"unknown model {spec!r}: {hint}not a built-in model ({', '.join(names)}), not "
                     f"random:<arch>, not an existing local directory; to download it from the Hugging "
                     f"Face hub, write hf:{spec}")


def announce_rows(args, large: int = 1 << 20) -> None:
    """A large task file's row count at once (counting line breaks takes ~0.1 s per 50 MB),
    before the model loads; the reading progress bar follows."""
    path = Path(args.task)
    if getattr(args, "quiet", False) or not path.is_file() or path.stat().st_size < large:
        return
    from circuits.files import row_count
    rows = row_count(path)
    if rows is not None:
        limit = getattr(args, "limit", None)
        print(f"{path.name}: {rows:,} rows" + (f" (reading the first {min(rows, limit):,}: --limit)" if limit else ""),
              file=sys.stderr)


def preflight(args) -> None:
    """Every check that needs no model, run before any heavy import so mistakes answer at once:
    the model and task specs, and every output path (see `outputs`)."""
    from circuits.files import check_output
    if getattr(args, "model", None) is not None:
        check_model_spec(args.model)
    if getattr(args, "task", None) is not None:
        check_task_spec(args.task)
        announce_rows(args)
    written = outputs(args)
    inputs = [getattr(args, name, None) for name in ("task", "circuit", "file")] + list(getattr(args, "circuits", None) or [])
    refuse_overwriting_inputs([i for i in inputs if i], [path for path, _, _ in written])
    for path, suffixes, what in written:
        check_output(path, suffixes, what)
    check = getattr(args, "preflight_check", None)
    if check is not None:
        check(args)


def outputs(args) -> list[tuple[str, tuple[str, ...] | None, str]]:
    """(path, suffixes it may have, what it is) of every file the command will write."""
    find = getattr(args, "outputs", None)
    return find(args) if find is not None else []


def rescue(write, path: str | Path, what: str = "the result") -> None:
    """Write an expensive result with `write(path)`; when that fails (disk full, permissions, …)
    write it to a fallback path instead and fail with one line naming both."""
    import tempfile
    import time

    from circuits.files import OutputError
    try:
        write(path)
        return
    except OutputError as err:
        first = str(err)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{Path(path).stem}-{stamp}-{os.getpid()}{Path(path).suffix}"
    for directory in (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "circuits" / "rescued",
                      Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write(directory / name)
        except (OSError, OutputError):
            continue
        raise OutputError(f"{first}; {what} was saved to {directory / name} instead")
    raise OutputError(f"{first}; no fallback location was writable either, so {what} is lost")


# --dtype choices: torch dtype names (the CLI parses arguments before importing torch)
DTYPES = ("float32", "float64", "bfloat16", "float16")


def torch_dtype(args):
    """The torch dtype --dtype names, or None (the model's own: float32)."""
    name = getattr(args, "dtype", None)
    if name is None:
        return None
    import torch
    return getattr(torch, name)


def _load_model_and_task(args):
    from circuits.model import loader
    from circuits.tasks.builtin import build_task, is_builtin
    from circuits.tasks.files import load_file
    from circuits.tasks.task import Metric, TaskError
    check_task_spec(args.task)
    model = loader.load(args.model, seed=args.seed, device=args.device, dtype=torch_dtype(args))
    metric = Metric(args.metric) if getattr(args, "metric", None) else None
    if is_builtin(args.task):
        if getattr(args, "counterfactual", None):
            raise TaskError("--counterfactual applies to MIB-format task files, not built-in tasks")
        if getattr(args, "limit", None):
            raise TaskError("--limit caps the rows of a task file; a built-in task takes --n")
        task = build_task(args.task, model, n=args.n, seed=args.seed)
    else:
        task = load_file(args.task, model.tokenizer, metric=metric, vocab_size=model.arch.d_vocab,
                         counterfactual=getattr(args, "counterfactual", None),
                         limit=getattr(args, "limit", None), progress=not getattr(args, "quiet", False))
    if metric is not None:
        task = task.with_metric(metric)
    return model, task


def refuse_overwriting_inputs(inputs: list[str], outputs: list[str | Path]) -> None:
    """Refuse an output that is one of the input files (also by another spelling or a link)
    before anything is written: it would replace the input."""
    for out in outputs:
        for inp in inputs:
            if Path(out).exists() and Path(inp).exists() and os.path.samefile(out, inp):
                raise ValueError(f"refusing to write {out}: it is the input file {inp}; choose another output path")


def _circuit_mask(args, model):
    """(mask, label, provenance) of --circuit: a file, 'full' or 'empty'."""
    from circuits import circuit as circuit_io
    if args.circuit in (None, "full"):
        return model.graph.full_mask(), "full", {}
    if args.circuit == "empty":
        return model.graph.empty_mask(), "empty", {}
    circ = circuit_io.load(args.circuit, model.graph)
    return circ.mask, args.circuit, circ.provenance


def circuit_arg(args, model, positions):
    """(Circuit, label) of --circuit: a file, or 'full'/'empty' at the setup's grain."""
    from circuits import circuit as circuit_io
    g = model.graph
    if args.circuit in (None, "full", "empty"):
        label = args.circuit or "full"
        mask = g.full_mask() if label == "full" else g.empty_mask()
        names = None if positions is None else positions.names
        if names is not None:
            mask = mask.expand(len(names), -1, -1).clone()
        return circuit_io.Circuit(g, mask, positions=names), label
    return circuit_io.load(args.circuit, g), args.circuit


def task_positions(args, task, circuit_positions=None):
    """The task's token positions when --positions is given or the circuit is position-aware;
    a position-aware circuit must name the task's positions."""
    from circuits import positions as pos
    if not getattr(args, "positions", False) and circuit_positions is None:
        return None
    found = pos.of_task(task)
    if circuit_positions is not None and tuple(circuit_positions) != found.names:
        raise pos.PositionError(f"the circuit's positions ({', '.join(circuit_positions[:8])}"
                                f"{', …' if len(circuit_positions) > 8 else ''}) are not task {task.name}'s "
                                f"({', '.join(found.names[:8])}{', …' if found.n > 8 else ''})")
    return found


def ablation_for(args, provenance: dict) -> str:
    """--ablation if given, else the one the circuit was found under (faithfulness depends on it)."""
    return args.ablation or provenance.get("ablation") or "resample"


def note_other_model(args, provenance: dict) -> None:
    """Allowed (the same circuit across checkpoints is a real question), but not unnoticed."""
    found_on = provenance.get("model")
    if found_on and found_on != args.model:
        print(f"note: the circuit was found on {found_on}; applying it to {args.model}", file=sys.stderr)


def undefined_faithfulness(model_spec: str, task, ablation: str) -> str:
    return (f"faithfulness is undefined: {model_spec} scores task {task.name} the same with every edge "
            f"ablated ({ablation}) as clean, so there is no behaviour to explain. Does the model "
            f"perform this task? (`circuits evaluate` shows the metric of each run)")


def _add_common(p, task: bool = True) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for random models and generated tasks")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="load the weights in this precision (default: float32; a GGUF is dequantized to float32 "
                        "once and cached, then cast)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if task:
        p.add_argument("--limit", type=positive_int, help="read at most this many rows of a task file")
        p.add_argument("--metric", choices=["logit-diff", "prob-diff", "logprob", "kl", "mse"],
                       help="override the task's metric")
        p.add_argument("--n", type=positive_int, default=64, help="examples for a built-in task (default 64)")
        p.add_argument("--counterfactual", help="MIB task data: the counterfactual column to use as the "
                                                "corrupted prompt (default: MIB's, e.g. s2_io_flip_counterfactual)")
        p.add_argument("--batch-size", type=positive_int, default=None, help="examples per forward (memory)")
        p.add_argument("--positions", action="store_true",
                       help="position-aware edges: one per token position (the task's position labels, "
                            "else every token of equal-length prompts)")


