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
    _examples,
    _load_model_and_task,
    _print_json,
    ablation_for,
    circuit_arg,
    note_other_model,
    outputs,
    plural,
    preflight,
    task_positions,
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
        print("\nAlso: a local checkpoint directory, a GGUF file (PATH.gguf), or hf:<hub id> such as hf:gpt2 "
              "(downloads; needs the network).")
    return EXIT_OK


def cmd_graph(args) -> int:
    from circuits import graph, positions
    from circuits.model import loader
    names = positions.names_from_spec(args.positions) if args.positions else None
    a = loader.architecture(args.model)
    g = graph.build(a)
    counts = g.counts() if names is None else positions.counts(g, names)
    counts["model"] = args.model
    if args.json:
        _print_json(counts)
        return EXIT_OK
    kv = f" ({plural(a.n_kv_heads, 'KV head')})" if a.grouped else ""
    print(f"{args.model}: {a.family}, {plural(a.n_layers, 'layer')}, {plural(a.n_heads, 'head')}{kv}, "
          f"d_model {a.d_model}{', parallel attention+MLP' if a.parallel else ''}")
    n = counts["nodes"]
    print(f"nodes     {n['total']:>8}  (input 1, heads {n['heads']}, MLPs {n['mlps']}, logits 1)")
    print(f"receivers {g.n_receivers:>8}  " +
          ", ".join(f"{k} {v}" for k, v in counts["receivers"].items() if v))
    print(f"edges     {counts['edges']['total']:>8}  " +
          ", ".join(f"{k} {v}" for k, v in counts["edges"]["by_receiver"].items()))
    if names is not None:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        print(f"positions {len(names):>8}  ({shown}): {counts['edges']['per_position']} edges at each")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from circuits import evaluation, patching
    model, task = _load_model_and_task(args)
    circ, label = circuit_arg(args, model, task_positions(args, task))
    mask, provenance = circ.mask, circ.provenance
    note_other_model(args, provenance)
    ablation = ablation_for(args, provenance)
    # chunk by chunk, nothing kept between chunks: memory follows --batch-size, not the rows
    means = evaluation.evaluate_streaming(model, task, patching.Ablation(ablation),
                                          {"circuit": mask, "empty": model.graph.empty_mask()},
                                          batch_size=args.batch_size, progress=not args.quiet,
                                          positions=task_positions(args, task, circ.positions),
                                          neurons=None if circ.neurons is None else {"circuit": circ.neurons})
    m_corr = means["corrupted"]
    f = {"model": means["clean"], "empty": means["empty"], "circuit": means["circuit"],
         "faithfulness": evaluation.normalized_faithfulness(means["circuit"], means["empty"], means["clean"])}
    # Multi-token answers have one row per answer token: the per-example value is the row mean
    # times rows per example (log-probability of the whole continuation).
    scale = len(task) / task.meta.get("examples", len(task))
    report = {"model": args.model, "task": task.name, "examples": task.meta.get("examples", len(task)),
              "metric": task.metric.value, "ablation": ablation, "circuit": label,
              "edges": circ.n_edges,
              "total_edges": model.graph.n_edges * (1 if circ.positions is None else len(circ.positions)),
              "clean": scale * f["model"], "corrupted": scale * m_corr, "empty_circuit": scale * f["empty"],
              "with_circuit": scale * f["circuit"], "faithfulness": f["faithfulness"]}
    if circ.positions is not None:
        report["positions"] = list(circ.positions)
    if circ.neurons is not None:
        report["neurons"] = int(circ.neurons.sum())
        report["total_neurons"] = circ.neurons.numel()
    if args.json:
        _print_json(report)
    else:
        print(f"{task.name}: {_examples(task)}, metric {task.metric.value}, {ablation} ablation")
        grain = "" if circ.positions is None else f" ({plural(len(circ.positions), 'position')})"
        kept = "" if circ.neurons is None else f", {report['neurons']} of {report['total_neurons']} neurons"
        print(f"circuit {label}: {report['edges']} of {report['total_edges']} edges{grain}{kept}")
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
    p.add_argument("model", help="model spec: built-in name, random:<arch>, checkpoint dir, or hf:<hub id>")
    p.add_argument("--positions", metavar="N|LABELS",
                   help="position-aware graph: N numbered positions or comma-separated labels "
                        "(every edge once per position)")
    p.add_argument("--json", action="store_true", help="print JSON")
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

    from circuits.cli.benchmark import add_benchmark
    from circuits.cli.discover import add_discover
    from circuits.cli.heads import add_heads
    from circuits.cli.sweep import add_sweep
    from circuits.cli.tools import add_tools
    from circuits.cli.view import add_view
    add_discover(sub, _add_common)
    add_benchmark(sub, _add_common)
    add_tools(sub, _add_common)
    add_sweep(sub, _add_common)
    add_view(sub, _add_common)
    add_heads(sub, _add_common)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`): handled like Ctrl-C (an ACDC run saves its checkpoint), exit 143."""


def main(argv=None) -> int:
    import signal
    args = parser().parse_args(argv)
    from circuits.errors import CircuitsError
    from circuits.files import OutputLock, cause
    user_errors = (CircuitsError, FileNotFoundError, ValueError)

    def terminated(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, terminated) if argv is None else None
    try:
        preflight(args)
        with OutputLock([path for path, _, _ in outputs(args)]):
            return args.func(args)
    except user_errors as err:
        print(f"circuits: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as stop:
        hint = getattr(args, "interrupted_hint", None)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"circuits: {what}{hint() if hint else ''}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:
        # the reader (e.g. `| head`) left: not an error; keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, MemoryError) as err:
        # the environment failed (disk, permissions, memory): one line naming the file and why
        where = getattr(err, "filename", None)
        print(f"circuits: error: {f'{where}: ' if where else ''}{cause(err) if isinstance(err, OSError) else 'out of memory'}"
              + ("; try a smaller --batch-size" if isinstance(err, MemoryError) else ""), file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
