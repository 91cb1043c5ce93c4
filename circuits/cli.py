"""The command line: thin wrappers over the library functions, errors without stack traces."""

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


def cmd_models(args) -> int:
    from circuits import models
    rows = [(name, meta.get("description", "")) for name, meta in models.builtin_models().items()]
    rows += [(f"random:{k}", v[0]) for k, v in models.RANDOM_ARCHS.items()]
    if args.json:
        _print_json([{"spec": a, "description": b} for a, b in rows])
    else:
        width = max(len(a) for a, _ in rows)
        for a, b in rows:
            print(f"{a:<{width}}  {b}")
        print("\nAlso: a local checkpoint directory, or a hub id such as gpt2 (needs the network).")
    return EXIT_OK


def cmd_graph(args) -> int:
    from circuits import models
    model = models.load(args.model, seed=args.seed, device=args.device)
    counts = model.graph.counts()
    counts["model"] = args.model
    if args.json:
        _print_json(counts)
        return EXIT_OK
    a = model.arch
    kv = f" ({plural(a.n_kv_heads, 'KV head')})" if a.grouped else ""
    print(f"{args.model}: {a.family}, {plural(a.n_layers, 'layer')}, {plural(a.n_heads, 'head')}{kv}, "
          f"d_model {a.d_model}{', parallel attention+MLP' if a.parallel else ''}")
    n = counts["nodes"]
    print(f"nodes     {n['total']:>8}  (input 1, heads {n['heads']}, MLPs {n['mlps']}, logits 1)")
    print(f"receivers {model.graph.n_receivers:>8}  " +
          ", ".join(f"{k} {v}" for k, v in counts["receivers"].items() if v))
    print(f"edges     {counts['edges']['total']:>8}  " +
          ", ".join(f"{k} {v}" for k, v in counts["edges"]["by_receiver"].items()))
    return EXIT_OK


def _load_model_and_task(args):
    import difflib
    from circuits import models, tasks
    from circuits.builtin_tasks import TASKS, build_task, is_builtin
    if not is_builtin(args.task) and not Path(args.task).exists():
        close = difflib.get_close_matches(args.task, list(TASKS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise tasks.TaskError(f"unknown task {args.task!r}: neither a built-in task nor a file; {hint}"
                              f"built-in tasks: {', '.join(TASKS)} (circuits tasks)")
    model = models.load(args.model, seed=args.seed, device=args.device)
    metric = tasks.Metric(args.metric) if getattr(args, "metric", None) else None
    if is_builtin(args.task):
        if getattr(args, "counterfactual", None):
            raise tasks.TaskError("--counterfactual applies to MIB-format task files, not built-in tasks")
        task = build_task(args.task, model, n=args.n, seed=args.seed)
    else:
        task = tasks.load_file(args.task, model.tokenizer, metric=metric, vocab_size=model.arch.d_vocab,
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


def cmd_evaluate(args) -> int:
    import torch
    from circuits import evaluation, patching
    from circuits.tasks import metric_values
    model, task = _load_model_and_task(args)
    mask, label, provenance = _circuit_mask(args, model)
    note_other_model(args, provenance)
    ablation = ablation_for(args, provenance)
    setup = evaluation.prepare(model, task, patching.Ablation(ablation), batch_size=args.batch_size)
    with torch.no_grad():
        corrupted_logits = patching.run(model.weights, model.graph, task.corrupted.to(model.weights.device),
                                        positions=task.positions).logits
    clean_logits = torch.cat([c.clean_logits for c in setup.chunks])
    m_corr = metric_values(task.metric, corrupted_logits, task, clean_logits).mean().item()
    f = setup.faithfulness(mask)
    # Multi-token answers have one row per answer token: the per-example value is the row mean
    # times rows per example (log-probability of the whole continuation).
    scale = len(task) / task.meta.get("examples", len(task))
    report = {"model": args.model, "task": task.name, "examples": task.meta.get("examples", len(task)),
              "metric": task.metric.value, "ablation": ablation, "circuit": label,
              "edges": int((mask & model.graph.allowed).sum()), "total_edges": model.graph.n_edges,
              "clean": scale * f["model"], "corrupted": scale * m_corr, "empty_circuit": scale * f["empty"],
              "with_circuit": scale * f["circuit"], "faithfulness": f["faithfulness"]}
    if args.json:
        _print_json(report)
    else:
        print(f"{task.name}: {_examples(task)}, metric {task.metric.value}, {ablation} ablation")
        print(f"circuit {label}: {report['edges']} of {report['total_edges']} edges")
        for key in ("clean", "corrupted", "empty_circuit", "with_circuit"):
            print(f"  {key:<14} {report[key]: .4f}")
        if f["faithfulness"] != f["faithfulness"]:
            print("  faithfulness   undefined: the model scores the same with every edge ablated as clean")
        else:
            print(f"  faithfulness   {report['faithfulness']: .4f}   (m(C) - m(empty)) / (m(model) - m(empty))")
    return EXIT_OK


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


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="circuits", description="Find, verify and export circuits in transformer LMs.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("models", help="list built-in and random models",
                       epilog="example: circuits models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("graph", help="node and edge counts of a model's graph",
                       epilog="example: circuits graph random:gpt2-small --json")
    p.add_argument("model", help="model spec: built-in name, random:<arch>, checkpoint dir, or hub id")
    _add_common(p, task=False)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("evaluate", help="metric and faithfulness of a circuit on a task",
                       epilog="example: circuits evaluate random:gpt2-small tasks/examples/ioi-mini.jsonl --circuit empty")
    p.add_argument("model")
    p.add_argument("task", help="task file (JSONL/CSV) or built-in task name")
    p.add_argument("--circuit", default="full", help="circuit file, 'full' or 'empty' (default full)")
    p.add_argument("--ablation", choices=ABLATIONS,
                   help="default: the circuit file's own ablation, else resample")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    from circuits.cli_discover import add_discover
    from circuits.cli_tools import add_tools
    add_discover(sub, _add_common)
    add_tools(sub, _add_common)
    return ap


def main(argv=None) -> int:
    import signal
    args = parser().parse_args(argv)
    from circuits.errors import USER_ERRORS

    def terminated(signum, frame):
        raise KeyboardInterrupt        # so `kill` saves an ACDC checkpoint like Ctrl-C does
    previous = signal.signal(signal.SIGTERM, terminated) if argv is None else None
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"circuits: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted_hint", None)
        print(f"circuits: interrupted{hint() if hint else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader (e.g. `| head`) left: not an error; keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
