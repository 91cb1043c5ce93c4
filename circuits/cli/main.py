"""The command line: thin wrappers over the library functions, errors without stack traces."""

from __future__ import annotations

import os
import sys

from circuits.cli.common import (
    ABLATIONS,
    EXIT_ERROR,
    EXIT_OK,
    OneLineParser,
    _add_common,
    _circuit_mask,
    _examples,
    _load_model_and_task,
    _print_json,
    ablation_for,
    note_other_model,
    plural,
    preflight,
)


def cmd_models(args) -> int:
    from circuits.model import gguf, loader
    rows = [(name, meta.get("description", "")) for name, meta in loader.builtin_models().items()]
    rows += [(name, f"{p.description}{'' if gguf.installed(name) else f' (needs: {p.install})'}")
             for name, p in gguf.PACKAGED.items()]
    rows += [(f"random:{k}", v[0]) for k, v in loader.RANDOM_ARCHS.items()]
    if args.json:
        _print_json([{"spec": a, "description": b} for a, b in rows])
    else:
        width = max(len(a) for a, _ in rows)
        for a, b in rows:
            print(f"{a:<{width}}  {b}")
        print("\nAlso: a local checkpoint directory, a GGUF file (PATH.gguf), or a hub id such as gpt2 "
              "(needs the network).")
    return EXIT_OK


def cmd_graph(args) -> int:
    from circuits.model import loader
    model = loader.load(args.model, seed=args.seed, device=args.device)
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


def cmd_evaluate(args) -> int:
    import torch

    from circuits import evaluation, patching
    from circuits.tasks.task import metric_values
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


def parser() -> OneLineParser:
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
                       epilog="example: circuits evaluate random:gpt2-small tasks/examples/ioi-mini.jsonl "
                              "--circuit empty")
    p.add_argument("model")
    p.add_argument("task", help="task file (JSONL/CSV) or built-in task name")
    p.add_argument("--circuit", default="full", help="circuit file, 'full' or 'empty' (default full)")
    p.add_argument("--ablation", choices=ABLATIONS,
                   help="default: the circuit file's own ablation, else resample")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    from circuits.cli.discover import add_discover
    from circuits.cli.heads import add_heads
    from circuits.cli.tools import add_tools
    add_discover(sub, _add_common)
    add_tools(sub, _add_common)
    add_heads(sub, _add_common)
    return ap


def main(argv=None) -> int:
    import signal
    args = parser().parse_args(argv)
    from circuits.errors import CircuitsError
    user_errors = (CircuitsError, FileNotFoundError, ValueError)

    def terminated(signum, frame):
        raise KeyboardInterrupt        # so `kill` saves an ACDC checkpoint like Ctrl-C does
    previous = signal.signal(signal.SIGTERM, terminated) if argv is None else None
    try:
        preflight(args)
        return args.func(args)
    except user_errors as err:
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
