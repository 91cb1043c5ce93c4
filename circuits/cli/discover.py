"""`circuits discover`: the main job."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL, DEFAULT_TASK = "induction-2l", "induction"


SEARCH = ("acdc", "hybrid")


def _check_options(args) -> None:
    """Refuse options the chosen method would silently ignore."""
    from circuits.methods import REGISTRY
    method, given = args.method, lambda name: getattr(args, name) is not None
    problems = []
    if method not in SEARCH:
        problems += [f"--{n.replace('_', '-')}" for n in ("tau", "acdc_metric", "checkpoint", "checkpoint_every")
                     if given(n)]
        problems += ["--resume"] * args.resume
    if method != "hybrid" and given("candidates"):
        problems.append("--candidates")
    takes_steps = method == "hybrid" or (method in REGISTRY and "steps" in REGISTRY[method].defaults)
    if given("steps") and not takes_steps:
        problems.append("--steps")
    for option, param in METHOD_OPTIONS.items():
        if given(option) and (method not in REGISTRY or param not in REGISTRY[method].defaults):
            problems.append(f"--{option.replace('_', '-')}")
    if problems:
        raise ValueError(f"{', '.join(problems)} {'does' if len(problems) == 1 else 'do'} not apply to "
                         f"--method {method}")
    chosen = [f"--{n.replace('_', '-')}" for n in ("top_n", "threshold", "greedy") if given(n)]
    if method in SEARCH and (chosen or given("target_faithfulness")):
        raise ValueError(f"{method} decides its circuit with --tau; {', '.join(chosen) or '--target-faithfulness'} "
                         f"applies to scoring methods")
    if chosen and given("target_faithfulness"):
        raise ValueError(f"--target-faithfulness and {chosen[0]} are two ways to choose the size: give one")
    if args.neurons:
        if method in SEARCH or method == "exact":
            raise ValueError(f"--neurons: neuron scores come from attribution (eap, eap-ig-*, clean-corrupted), "
                             f"not {method}")
        if args.positions:
            raise ValueError("--neurons and --positions: neuron masks are per sender, not per position; give one")
        if given("greedy"):
            raise ValueError("--greedy grows edges; at neuron grain use --top-n or --threshold (they count neurons)")
    if given("test_fraction"):
        from circuits.tasks.builtin import is_builtin
        from circuits.tasks.splits import check_split
        check_split(args.n if is_builtin(args.task) else None, args.test_fraction)
    method_params(args)


# command-line options that set a scoring method's own parameter
METHOD_OPTIONS = {"direction": "direction", "target_sparsity": "target_sparsity", "members": "members",
                  "combine": "combine", "warm_start": "warm_start", "estimator": "estimator"}


def method_params(args) -> dict:
    """The method's parameters given as options, checked (ranges, member names) without torch."""
    from circuits.methods.registry import check_params
    params = {param: getattr(args, option) for option, param in METHOD_OPTIONS.items()
              if getattr(args, option, None) is not None}
    if params:
        check_params(args.method, params)
    return params


def _outputs(args) -> list:
    out = [(args.out, (".json",), "--out")]
    if args.method in SEARCH:
        out.append((args.checkpoint or args.out + ".ckpt.pt", None, "checkpoint"))
    return out


def _checkpoint(args) -> str | None:
    """The ACDC checkpoint path; refuse to silently discard or to pretend to resume."""
    if args.method not in SEARCH:
        return None
    path = args.checkpoint or args.out + ".ckpt.pt"
    exists = Path(path).exists()
    if args.resume and not exists:
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume to start)")
    if exists and not args.resume:
        raise ValueError(f"a checkpoint of an interrupted run is at {path}: add --resume to continue it, "
                         f"or delete it to start over")
    args.interrupted_hint = lambda: (f"; progress saved to {path}: rerun the same command with --resume"
                                     if Path(path).exists() else "")
    return path


def cmd_discover(args) -> int:
    from circuits.cli.common import (
        _examples,
        _load_model_and_task,
        _print_json,
        note_nulls,
        plural,
        refuse_overwriting_inputs,
        rescue,
        task_positions,
        undefined_faithfulness,
    )
    _check_options(args)
    refuse_overwriting_inputs([args.task], [args.out])
    checkpoint = _checkpoint(args)
    if checkpoint and args.resume:          # the settings the command line states, before any loading
        from circuits.methods.acdc import check_checkpoint
        check_checkpoint(checkpoint, {"method": args.method, "seed": args.seed, "model": args.model,
                                      "ablation": args.ablation, "tau": 0.01 if args.tau is None else args.tau})

    from circuits import circuit as circuit_io
    from circuits import discover, evaluation, patching
    from circuits.tasks.task import Metric, TaskError
    model, task = _load_model_and_task(args)
    split_record = {}
    if args.test_fraction is not None:
        from circuits.tasks.task import split
        task, test = split(task, args.test_fraction, args.split_seed)
        split_record = {"split": {"seed": args.split_seed, "test_fraction": args.test_fraction, "part": "discovery",
                                  "discovery": len(task), "test": len(test)}}
    setup = evaluation.prepare(model, task, patching.Ablation(args.ablation), batch_size=args.batch_size,
                               positions=task_positions(args, task),
                               keep_clean_graph=args.method == "eap")     # EAP's backward starts there
    if not setup.has_behaviour():
        raise TaskError(undefined_faithfulness(args.model, task, args.ablation))
    target = 0.8 if args.target_faithfulness is None else args.target_faithfulness
    selection = discover.Selection(top_n=args.top_n, threshold=args.threshold, greedy=args.greedy,
                                   target_faithfulness=target, prune=not args.no_prune)
    found = discover.run(setup, args.method, selection=selection, tau=args.tau, steps=args.steps,
                         candidates=args.candidates, acdc_metric=Metric(args.acdc_metric) if args.acdc_metric else None,
                         checkpoint=checkpoint, resume=args.resume, method_params=method_params(args),
                         progress=not args.quiet, seed=args.seed, provenance=split_record, neurons=args.neurons,
                         checkpoint_every=30.0 if args.checkpoint_every is None else args.checkpoint_every)
    head_roles = {}
    if args.roles:              # measured on real activations, as `circuits heads MODEL TASK` does
        from circuits.verify import roles as head_role_measure
        head_roles = {h: r for h, r in head_role_measure.label_heads(model, task).items() if r}
        found.circuit.provenance["head_roles"] = head_roles
    nulls: list[str] = []
    rescue(lambda path: nulls.extend(circuit_io.save(found.circuit, path)), args.out, "the circuit")
    note_nulls(nulls, args.out)
    if checkpoint and not args.checkpoint:
        Path(checkpoint).unlink(missing_ok=True)      # finished: the default checkpoint has served
    c = found.circuit
    roles = {k: model.meta[k] for k in ("previous_token_heads", "induction_heads", "name_mover_heads",
                                       "s_suppression_heads") if model.meta.get(k)}
    found_nodes = set(c.node_names())
    summary = {"model": args.model, "task": task.name, "examples": task.meta.get("examples", len(task)),
               "metric": task.metric.value, "ablation": args.ablation, "method": args.method,
               "edges": c.n_edges, "total_edges": setup.n_edges,
               "nodes": [n for n in c.node_names() if n not in ("input", "logits")],
               "components": circuit_io.components(c),
               "faithfulness": found.faithfulness["faithfulness"], "seconds": round(found.seconds, 2),
               "out": args.out, **found.details}
    if args.roles:
        summary["head_roles"] = {h: r for h, r in head_roles.items() if h in found_nodes}
    if c.positions is not None:
        summary["positions"] = list(c.positions)
        summary["edges_by_position"] = {p: int(n) for p, n in zip(c.positions, (c.mask & model.graph.allowed).sum((1, 2)).tolist())}
    if roles:
        summary["known_heads"] = {k: {h: h in found_nodes for h in v} for k, v in roles.items()}
    truth = model.meta.get("tracr", {}).get("ground_truth", {}).get(args.ablation)
    if truth and task.meta.get("generator") == "tracr" and c.positions is None:   # on the program's own task
        summary["ground_truth"] = _ground_truth(model, c, args.ablation)
    if args.json:
        _print_json(summary)
        return 0
    print(f"{args.method} on {args.model} / {task.name} ({_examples(task)}, "
          f"{task.metric.value}, {args.ablation} ablation)")
    selected = found.details.get("selected_before_pruning")
    pruned = f"; {selected - c.n_edges} of {selected} selected pruned off input→logits paths" \
        if selected is not None and selected > c.n_edges else ""
    grain = "" if c.positions is None else f" at {plural(len(c.positions), 'position')}"
    if c.neurons is not None:
        print(f"neurons: {found.details['neurons']} of {found.details['total_neurons']} kept "
              f"(every edge; {found.details['neurons'] / found.details['total_neurons']:.2%})")
    else:
        print(f"circuit: {c.n_edges} of {setup.n_edges} edges{grain} "
              f"({100 * c.n_edges / setup.n_edges:.1f}%){pruned}")
    for line in _component_lines(summary["components"], roles=head_roles):
        print(line)
    if c.positions is not None:
        used = [f"{p} {n}" for p, n in summary["edges_by_position"].items() if n]
        print("edges by position: " + (", ".join(used) or "-"))
    search = found.details.get("search")
    how = f" (search: {plural(search['evaluations'], 'evaluation')}, ±{plural(search['tolerance_edges'], 'edge')})" \
        if search else ""
    print(f"faithfulness {summary['faithfulness']:.3f}{how}   time {found.seconds:.1f}s   written to {args.out}"
          f"{'' if c.n_edges <= 12 else ' (every edge: that file, or --json)'}")
    if args.method in SEARCH and summary["faithfulness"] < 0.5:
        print(f"note: ACDC kept only edges whose removal moves {found.circuit.provenance['parameters']['acdc_metric']} "
              f"by more than --tau {found.circuit.provenance['parameters']['tau']}; a smaller --tau"
              + (" or more --candidates" if args.method == "hybrid" else "") + " gives a more faithful circuit")
    if roles:
        print("known heads: " + "; ".join(
            f"{k.replace('_', ' ')[:-1]}: " + ", ".join(f"{h} {'in circuit' if h in found_nodes else 'not in circuit'}" for h in v)
            for k, v in roles.items()))
    if "ground_truth" in summary:
        print(_ground_truth_line(summary["ground_truth"]))
    return 0


def _component_lines(comp: dict, width: int = 8, roles: dict | None = None) -> list[str]:
    """Two lines at any scale: counts by kind (and every name when there are few), the strongest;
    heads carry their measured role (`roles`: head → role) where one is known."""
    from circuits.cli.common import plural
    names = comp["heads"] + list(comp["kv_groups"]) + comp["mlps"]
    counts = [plural(len(comp["heads"]), "head")] + \
        ([plural(len(comp["kv_groups"]), "KV group")] if comp["kv_groups"] else []) + \
        [plural(len(comp["mlps"]), "MLP")]
    edges = ", ".join(f"{k} {v}" for k, v in comp["edges_by_receiver"].items())
    lines = [f"components: {', '.join(counts)}; edges into {edges or '-'}"]
    if not names:
        return lines
    role = (lambda n: f" ({roles[n]})" if n in roles else "") if roles else (lambda n: "")
    if len(names) <= width:
        lines.append("  " + ", ".join(n + role(n) for n in names))
    else:
        lines.append("  strongest: " + ", ".join(f"{t['component']}{role(t['component'])} {t['score']:.3g}"
                                                 for t in comp["top"]))
    return lines


def _ground_truth(model, c, ablation: str) -> dict:
    from circuits.graph import node_scores as graph_node_scores
    from circuits.verify import groundtruth
    g = model.graph
    truth = groundtruth.shipped_ground_truth(model, ablation)
    found = c.mask.bool()
    nodes = groundtruth.truth_nodes(g, truth)
    node_scores = graph_node_scores(g, c.scores)
    return {"ablation": ablation, "edges": int(truth.sum()), "found": int((found & truth).sum()),
            "extra": int((found & ~truth).sum()),
            "edge_auroc": round(groundtruth.edge_auroc(g, c.scores, truth), 4),
            "nodes": sorted(nodes), "node_auroc": round(groundtruth.node_auroc(g, node_scores, nodes), 4)}


def _ground_truth_line(gt: dict) -> str:
    return (f"ground truth ({gt['ablation']} ablation): {gt['found']} of {gt['edges']} edges found, "
            f"{gt['extra']} extra; AUROC of the scores: edges {gt['edge_auroc']:.3f}, "
            f"components {gt['node_auroc']:.3f}")


def add_discover(sub, add_common) -> None:
    from circuits.cli.common import (
        ABLATIONS,
        fraction,
        non_negative_float,
        positive_int,
    )
    from circuits.methods import REGISTRY
    p = sub.add_parser(
        "discover", help="find the circuit of a model on a task",
        description="Find a circuit. With no arguments: the shipped 2-layer induction model on the "
                    "induction task.",
        epilog="examples:\n  circuits discover\n"
               "  circuits discover random:gpt2-small tasks/examples/ioi-mini.jsonl --method eap --top-n 200\n"
               "  circuits discover induction-2l induction --method acdc --tau 0.05 --out acdc.json\n"
               "  circuits discover MODEL TASK --method acdc --resume   (continue an interrupted run)",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument("task", nargs="?", default=DEFAULT_TASK, help=f"task file or built-in task (default {DEFAULT_TASK})")
    p.add_argument("--method", default="eap-ig-activations",
                   choices=sorted(REGISTRY) + ["acdc", "hybrid"], help="default eap-ig-activations")
    p.add_argument("--ablation", default="resample", choices=ABLATIONS)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--top-n", type=positive_int, help="keep the n highest-|score| edges")
    sel.add_argument("--threshold", type=non_negative_float, help="keep edges with |score| >= threshold")
    sel.add_argument("--greedy", type=positive_int, help="grow n edges greedily from the logits")
    p.add_argument("--target-faithfulness", type=fraction,
                   help="without --top-n/--threshold/--greedy: smallest top-n reaching this (default 0.8)")
    p.add_argument("--tau", type=non_negative_float, help="ACDC threshold (default 0.01)")
    p.add_argument("--acdc-metric", choices=["logit-diff", "prob-diff", "logprob", "kl", "mse"],
                   help="what ACDC compares (default kl, or the task's metric when it is a divergence)")
    p.add_argument("--candidates", type=positive_int, help="hybrid: edges ACDC examines (default: EAP-IG's smallest top-n "
                        "with faithfulness >= 0.95)")
    p.add_argument("--steps", type=positive_int, help="integrated-gradient steps (default 5); edge-pruning: training steps (default 60)")
    p.add_argument("--direction", choices=["noising", "denoising"],
                   help="eap, eap-gim: gradient at the clean run (noising, default) or at the ablated run")
    p.add_argument("--target-sparsity", type=float,
                   help="edge-pruning: fraction of edges the learned mask removes, in (0, 1) (default 0.99)")
    p.add_argument("--warm-start", help="edge-pruning: method whose scores start the mask (default eap-gim; none)")
    p.add_argument("--estimator", choices=["pathwise", "score", "both"],
                   help="edge-pruning: gradient through the relaxed gates (pathwise, default), of hard masks "
                        "(score: DisARM, sees step-like effects), or both summed")
    p.add_argument("--members", help="ensemble: comma-separated methods (default eap-ig-inputs,eap-gim,edge-pruning)")
    p.add_argument("--combine", choices=["rank", "score", "magnitude"],
                   help="ensemble: average of |score| ranks (magnitude, default), of signed ranks, or of scores / max |score|")
    p.add_argument("--test-fraction", type=float,
                   help="hold out this share of the examples (seeded by --split-seed): discover on the rest; "
                        "`circuits verify --test-fraction` with the same values judges on the held-out part")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the discovery/test split (default 0)")
    p.add_argument("--no-prune", action="store_true", help="keep edges off input→logits paths")
    p.add_argument("--neurons", action="store_true",
                   help="neuron grain: keep every edge and choose the output dimensions of each component "
                        "by attribution (--top-n/--threshold count neurons)")
    p.add_argument("--roles", action="store_true",
                   help="measure each head's role (previous-token, induction, name mover …; as `circuits heads`), "
                        "label the summary's heads with it and store it in the circuit file (render and view show it)")
    p.add_argument("--out", "-o", default="circuit.json", help="circuit file to write (default circuit.json)")
    p.add_argument("--checkpoint", help="ACDC checkpoint file (default OUT.ckpt.pt)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ACDC run from its checkpoint "
                                                         "(refused, naming the setting, if any setting differs)")
    p.add_argument("--checkpoint-every", type=non_negative_float, metavar="SECONDS",
                   help="ACDC: seconds between checkpoints (default 30; also written on Ctrl-C and kill)")
    add_common(p)
    p.set_defaults(func=cmd_discover, outputs=_outputs)
