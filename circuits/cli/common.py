"""What the command modules share: exit codes, argument types and checks, output helpers,
and loading the model and task named on the command line."""

from __future__ import annotations

import argparse
import json
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


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


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


def preflight(args) -> None:
    """Every check that needs no model, run before any heavy import so mistakes answer at once."""
    if getattr(args, "task", None) is not None:
        check_task_spec(args.task)
    check = getattr(args, "preflight_check", None)
    if check is not None:
        check(args)


def _load_model_and_task(args):
    from circuits.model import loader
    from circuits.tasks.builtin import build_task, is_builtin
    from circuits.tasks.files import load_file
    from circuits.tasks.task import Metric, TaskError
    check_task_spec(args.task)
    model = loader.load(args.model, seed=args.seed, device=args.device)
    metric = Metric(args.metric) if getattr(args, "metric", None) else None
    if is_builtin(args.task):
        if getattr(args, "counterfactual", None):
            raise TaskError("--counterfactual applies to MIB-format task files, not built-in tasks")
        task = build_task(args.task, model, n=args.n, seed=args.seed)
    else:
        task = load_file(args.task, model.tokenizer, metric=metric, vocab_size=model.arch.d_vocab,
                         counterfactual=getattr(args, "counterfactual", None))
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
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if task:
        p.add_argument("--metric", choices=["logit-diff", "prob-diff", "logprob", "kl", "mse"],
                       help="override the task's metric")
        p.add_argument("--n", type=positive_int, default=64, help="examples for a built-in task (default 64)")
        p.add_argument("--counterfactual", help="MIB task data: the counterfactual column to use as the "
                                                "corrupted prompt (default: MIB's, e.g. s2_io_flip_counterfactual)")
        p.add_argument("--batch-size", type=positive_int, default=None, help="examples per forward (memory)")


