"""`circuits verify | render | export | compare | tasks`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from circuits.cli.common import refuse_overwriting_inputs

EXPORT_FORMATS = ("json", "mib-json", "mib-pt", "graphml", "node-link", "dot")
EXPORT_SUFFIXES = {"json": (".json",), "mib-json": (".json",), "mib-pt": (".pt", ".pth"),
                   "graphml": (".graphml", ".xml"), "node-link": (".json",), "dot": (".dot", ".gv")}
DRAWING_SUFFIXES = (".svg", ".png", ".pdf", ".dot")


def _drawing_outputs(args) -> list:
    """A drawing and the DOT file written next to it."""
    if not args.output:
        return []
    dot = str(Path(args.output).with_suffix(".dot"))
    return [(args.output, DRAWING_SUFFIXES, "-o")] + ([(dot, None, "DOT file")] if dot != args.output else [])


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _labelled(name: str, roles: dict) -> str:
    return f"{name} ({roles[name]})" if roles.get(name) else name


def _roles_line(head_roles: dict) -> str:
    """The circuit's heads by role: 'induction 2 (a1.h1, a1.h3), previous-token 1 (a0.h1), 5 unlabelled'."""
    by_role: dict[str, list[str]] = {}
    for head, role in head_roles.items():
        by_role.setdefault(role or "", []).append(head)
    parts = [f"{role} {len(heads)} ({', '.join(heads[:4])}{', …' if len(heads) > 4 else ''})"
             for role, heads in sorted(by_role.items(), key=lambda kv: -len(kv[1])) if role]
    if "" in by_role:
        parts.append(f"{len(by_role[''])} unlabelled")
    return ", ".join(parts) or "no heads"


def _minimality_line(mini: dict, roles: dict | None = None) -> str:
    """Which components the circuit could do without, or that it needs every one."""
    roles = roles or {}
    if not mini["drop"]:
        return "no components to remove"
    est = mini.get("estimate")
    if est:
        lo, hi = est["interval_95"]
        names = mini["not_needed"]
        shown = ", ".join(_labelled(n, roles) for n in names[:6]) + (f", … ({len(names)})" if len(names) > 6 else "")
        return (f"sampled {est['sampled']} of {est['of']} components: {len(names)} not needed "
                f"(removing one costs < {mini['threshold']:g}); share not needed {est['share_not_needed']:.0%} "
                f"(95% interval {lo:.0%}-{hi:.0%})" + (f": {shown}" if names else ""))
    if not mini["not_needed"]:
        return f"every component needed (removing any one costs >= {mini['threshold']:g} faithfulness)"
    names = mini["not_needed"]
    shown = ", ".join(_labelled(n, roles) for n in names[:12]) + (f", … ({len(names)} in all; --json lists them)"
                                                                   if len(names) > 12 else "")
    return f"not needed: {shown} (removing one costs < {mini['threshold']:g} faithfulness)"


def cmd_verify(args) -> int:
    from circuits import circuit as circuit_io
    from circuits import evaluation, patching
    from circuits.cli.common import (
        EXIT_BAR,
        _load_model_and_task,
        _print_json,
        ablation_for,
        note_other_model,
        plural,
        task_positions,
        undefined_faithfulness,
    )
    from circuits.tasks.task import TaskError
    from circuits.verify import checks

    if args.out:
        refuse_overwriting_inputs([args.circuit, args.task], [args.out])
    if args.test_fraction is not None:
        from circuits.tasks.builtin import is_builtin
        from circuits.tasks.splits import check_split
        check_split(args.n if is_builtin(args.task) else None, args.test_fraction)
    model, task = _load_model_and_task(args)
    held_out = None
    if args.test_fraction is not None:
        from circuits.tasks.task import split
        _, task = split(task, args.test_fraction, args.split_seed)
        held_out = {"seed": args.split_seed, "test_fraction": args.test_fraction, "test": len(task)}
    circ = circuit_io.load(args.circuit, model.graph)
    note_other_model(args, circ.provenance)
    args.ablation = ablation_for(args, circ.provenance)
    if args.positions and circ.positions is None:
        raise ValueError(f"--positions: {args.circuit} is not position-aware (discover it with --positions)")
    setup = evaluation.prepare(model, task, patching.Ablation(args.ablation), batch_size=args.batch_size,
                               positions=task_positions(args, task, circ.positions))
    if not setup.has_behaviour():
        raise TaskError(undefined_faithfulness(args.model, task, args.ablation))
    mask = circ.mask & model.graph.allowed
    progress = not args.quiet
    # head roles: the circuit file's (discover --roles), else measured here with --roles
    roles = dict(circ.provenance.get("head_roles") or {})
    if args.roles and not roles:
        from circuits.verify import roles as head_role_measure
        roles = {h: r for h, r in head_role_measure.label_heads(model, task).items() if r}
    t0 = time.perf_counter()
    empty, full = checks.baselines(setup)
    m_c = setup.metric(mask, neurons=circ.neurons).mean().item()
    per_eval = (time.perf_counter() - t0) / 2        # the empty circuit and this one
    tested, n_comps = checks.minimality_plan(model.graph, mask, args.minimality_sample, args.seed)
    plan = {"curve": len(checks.RANKINGS) * len(checks.MIB_PERCENTS) if circ.scores is not None else 0,
            "completeness": 2 * len(checks.completeness_subsets(model.graph, mask, args.subsets, args.seed)),
            "minimality": len(tested) + 1,
            "ablations": 2 * (len(checks.SENSITIVITY_ABLATIONS) - 1) + 1}
    evals = sum(plan.values()) + 4 * (len(checks.SENSITIVITY_ABLATIONS) - 1)   # + preparing other ablations
    if progress:
        sample = f" (a sample of {len(tested)} of {n_comps} components)" if len(tested) < n_comps else ""
        print(f"verify: {sum(plan.values())} circuit evaluations: " + ", ".join(f"{k} {v}" for k, v in plan.items())
              + f"{sample}; about {_duration(evals * per_eval)} at {per_eval:.1f}s each", file=sys.stderr)
    report = {"circuit": args.circuit, "model": args.model, "task": task.name, "metric": task.metric.value,
              "ablation": args.ablation, "edges": int(mask.sum()), "total_edges": setup.n_edges,
              "faithfulness": {"normalized": evaluation.normalized_faithfulness(m_c, empty, full),
                               "raw": m_c, "empty": empty, "model": full}}
    if roles:
        heads = [n for n in circ.node_names() if re.fullmatch(r"a\d+\.h\d+", n)]
        report["head_roles"] = {h: roles.get(h) for h in heads}
    if circ.positions is not None:
        report["positions"] = list(circ.positions)
    if circ.neurons is not None:          # the other checks below are at edge grain
        report["neurons"] = int(circ.neurons.sum())
    skipped = report["skipped"] = {}
    if held_out:
        report["held_out"] = held_out
    recorded = circ.provenance.get("split")
    if recorded and (held_out is None or (recorded.get("seed"), recorded.get("test_fraction")) !=
                     (held_out["seed"], held_out["test_fraction"])):
        print(f"note: the circuit was found on the discovery part of a split (seed {recorded.get('seed')}, test "
              f"fraction {recorded.get('test_fraction')}); --test-fraction {recorded.get('test_fraction')} "
              f"--split-seed {recorded.get('seed')} verifies on its held-out part", file=__import__("sys").stderr)
    if circ.scores is not None:
        report["curve"] = checks.mib_scores(setup, circ.scores, progress=progress).as_dict()
    else:
        skipped["curve"] = "the circuit file has no edge scores to rank edges by"
    if args.subsets == 0:
        skipped["completeness"] = "--subsets 0"
    report["completeness"] = checks.completeness(setup, mask, n_subsets=args.subsets, seed=args.seed,
                                                 progress=progress)
    report["minimality"] = checks.minimality(setup, mask, sample=args.minimality_sample, seed=args.seed,
                                             progress=progress)
    report["ablation_sensitivity"] = checks.ablation_sensitivity(setup, mask, progress=progress)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.stability > 0:
        method = circ.provenance.get("method")
        params = circ.provenance.get("parameters", {})
        if method in (None, "acdc", "hybrid"):
            why = (f"the circuit was found by {method}, which decides edges by threshold, not by ranking "
                   f"scores; stability re-runs a scoring method" if method else
                   "the circuit file records no method to re-run")
            skipped["stability"] = why
            report["stability"] = {"skipped": why}
        else:
            n = int(mask.sum())
            from circuits import methods, select
            spec = methods.get(method)
            kwargs = {k: v for k, v in params.items() if k in spec.defaults}

            def rediscover(boot):
                return select.prune(boot.graph, select.top_n(boot.graph, spec.score(boot, **kwargs), n))
            report["stability"] = checks.stability(setup, mask, rediscover, n_boot=args.stability, seed=args.seed)
    if args.out:
        from circuits.cli.common import note_nulls
        from circuits.files import json_safe, write_text
        nulls: list[str] = []
        write_text(args.out, json.dumps(json_safe(report, replaced=nulls), indent=1, default=str, allow_nan=False))
        note_nulls(nulls, args.out)
    if args.json:
        _print_json(report)
    else:
        f = report["faithfulness"]
        print(f"{args.circuit}: {report['edges']} of {report['total_edges']} edges, {task.name}, "
              f"{task.metric.value}, {args.ablation} ablation")
        print(f"  faithfulness        {f['normalized']:.4f}  (raw {f['raw']:.4g}; empty {f['empty']:.4g}, model {f['model']:.4g})")
        if held_out:
            print(f"  held out            {plural(held_out['test'], 'test example')} (split seed {held_out['seed']}, "
                  f"test fraction {held_out['test_fraction']:g})")
        if "curve" in report:
            c = report["curve"]
            for key, label in (("by_signed_score", "by signed score"), ("by_abs_score", "by |score|     ")):
                print(f"  curve {label} " + "  ".join(f"{p['percent']:g}%:{p['faithfulness']:.2f}"
                                                     for p in c[key]["points"]))
            print(f"  CPR {c['CPR']:.4f} (by signed score)   CMD {c['CMD']:.4f} (by |score|)   MIB's pairing; "
                  f"by |score|: CPR {c['by_abs_score']['CPR']:.4f}, by signed: CMD {c['by_signed_score']['CMD']:.4f}")
        comp = report["completeness"]
        print(f"  completeness        worst gap {_fmt(comp['worst_gap'])}, median {_fmt(comp['median_gap'])}"
              + (f"  (worst: knock out {', '.join(_labelled(n, roles) for n in comp['worst']['knocked_out'])})"
                 if comp["worst"] else ""))
        print(f"  minimality          {_minimality_line(report['minimality'], roles)}")
        if "head_roles" in report:
            print(f"  heads by role       {_roles_line(report['head_roles'])}")
        print("  ablation            " + "  ".join(f"{k} {v:.3f}" for k, v in report["ablation_sensitivity"].items()))
        if "stability" in report and "mean_jaccard" in report["stability"]:
            print(f"  stability           mean Jaccard {report['stability']['mean_jaccard']:.3f} "
                  f"over {plural(report['stability']['bootstraps'], 'bootstrap')}")
        for name, why in skipped.items():
            print(f"  {name + ' skipped':<19} {why}")
        if args.stability == 0:
            print("  stability           not run (--stability N: rediscover on N bootstrap resamples)")
    if args.min_faithfulness is not None and report["faithfulness"]["normalized"] != report["faithfulness"]["normalized"]:
        print("circuits: faithfulness is undefined (NaN), so --min-faithfulness cannot be met",
              file=__import__("sys").stderr)
        return EXIT_BAR
    if args.min_faithfulness is not None and not report["faithfulness"]["normalized"] >= args.min_faithfulness:
        print(f"circuits: faithfulness {report['faithfulness']['normalized']:.4f} is below "
              f"--min-faithfulness {args.min_faithfulness}", file=__import__("sys").stderr)
        return EXIT_BAR
    return 0


def _render_outputs(output: str) -> list[Path]:
    """What render.render writes: the drawing and the DOT file next to it."""
    return [Path(output), Path(output).with_suffix(".dot")]


def cmd_render(args) -> int:
    from circuits import circuit as circuit_io
    from circuits.cli.common import plural
    from circuits.io import render
    refuse_overwriting_inputs([args.circuit], _render_outputs(args.output))
    circ = circuit_io.load(args.circuit)
    title = args.title or f"{circ.provenance.get('model', '')} {circ.provenance.get('method', '')} ({plural(circ.n_edges, 'edge')})"
    if circ.positions is None:
        dot = render.to_dot(circ, title=title.strip(), level=args.level, max_edges=args.max_edges)
    else:
        if args.level != "auto" or args.max_edges is not None:
            raise ValueError(f"--level/--max-edges: {args.circuit} is position-aware; it is drawn edge by "
                             f"edge, one column per position (drop these options)")
        dot = render.to_dot_positions(circ, title=title.strip())
    out = render.render(dot, args.output)
    print(f"wrote {out}" + (f" and {Path(args.output).with_suffix('.dot')}" if out.suffix != ".dot" else ""))
    return 0


def cmd_export(args) -> int:
    from circuits import circuit as circuit_io
    from circuits.cli.common import note_nulls
    from circuits.files import write_text
    from circuits.io import formats, render
    refuse_overwriting_inputs([args.circuit], [args.output])
    circ = circuit_io.load(args.circuit)
    if args.sum_positions:
        if circ.positions is None:
            raise ValueError(f"--sum-positions: {args.circuit} is not position-aware (it has no positions to sum)")
        circ = circuit_io.position_summed(circ)
    fmt = args.format
    writers = {"json": circuit_io.save, "mib-json": formats.save_mib_json, "mib-pt": formats.save_mib_pt,
               "graphml": formats.save_graphml, "node-link": formats.save_node_link,
               "dot": lambda c, p: write_text(
                   p, render.to_dot(c) if c.positions is None else render.to_dot_positions(c))}
    nulls = writers[fmt](circ, args.output)
    note_nulls(nulls or [], args.output)
    print(f"wrote {args.output} ({fmt})")
    return 0


def cmd_import(args) -> int:
    from circuits import circuit as circuit_io
    from circuits.cli.common import plural
    from circuits.io import formats
    from circuits.model import loader
    refuse_overwriting_inputs([args.file], [args.output])
    model = loader.load(args.model, seed=args.seed)
    readers = {"mib": formats.load_mib, "graphml": formats.load_graphml, "node-link": formats.load_node_link}
    circ = readers[args.format](args.file, model.graph)
    circ = dataclasses.replace(circ, provenance={**circ.provenance, "model": args.model})   # neurons kept
    circuit_io.save(circ, args.output)
    print(f"wrote {args.output}: {plural(circ.n_edges, 'edge')}")
    return 0


_LABELS: dict = {}


def _head_labels(circ, args) -> dict:
    """Head-role labels for a circuit: from its file (provenance "head_roles") or measured on the
    model it names, with its task when that is a built-in one (else the task-free diagnostics)."""
    if "head_roles" in circ.provenance:
        return circ.provenance["head_roles"]
    from circuits.model import loader
    from circuits.tasks.builtin import build_task, is_builtin
    from circuits.verify import roles
    spec = circ.provenance.get("model")
    if not spec:
        raise ValueError("compare --roles needs the model each circuit was found on (provenance 'model')")
    task_name = (circ.provenance.get("task") or {}).get("name")
    key = (spec, task_name)
    if key not in _LABELS:
        model = loader.load(spec)
        task = build_task(task_name, model, n=args.n) if task_name and is_builtin(task_name) and task_name != "tracr" else None
        _LABELS[key] = roles.label_heads(model, task)
    return _LABELS[key]


def cmd_compare(args) -> int:
    from circuits import circuit as circuit_io
    from circuits.cli.common import _print_json
    from circuits.io import compare, render
    args.circuits = compare.circuit_paths(args.circuits)      # a sweep directory: its circuits
    if len(args.circuits) < 2:
        raise ValueError("compare needs at least two circuit files")
    if args.output:
        refuse_overwriting_inputs(args.circuits, _render_outputs(args.output))
    circuits = [circuit_io.load(p) for p in args.circuits]
    labels = [_head_labels(c, args) for c in circuits] if args.roles else [None] * len(circuits)
    reports = [compare.compare(circuits[i], circuits[j], args.circuits[i], args.circuits[j], labels[i], labels[j])
               for i in range(len(circuits)) for j in range(i + 1, len(circuits))]
    if args.json:
        _print_json([r.as_dict() for r in reports])
    else:
        print("\n\n".join(compare.format_report(r) for r in reports))
    if args.output:
        a, b = circuits[0], circuits[1]
        out = render.render(compare.diff_dot(a, b, title=f"{args.circuits[0]} (blue) vs {args.circuits[1]} (pink)"),
                            args.output)
        print(f"wrote {out}")
    return 0


def cmd_tasks(args) -> int:
    from circuits.cli.common import _print_json
    from circuits.tasks.builtin import TASKS, example_pair
    rows = []
    for name, spec in TASKS.items():
        rows.append({"name": name, "description": spec.description, "example": example_pair(name)})
    if args.json:
        _print_json(rows)
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}")
            ex = r["example"]
            if ex:
                print(f"{'':<{width}}  e.g. clean {ex['clean']!r} -> {ex['answer']!r}; corrupted {ex['corrupted']!r}")
        print("\nOr a JSONL/CSV file with fields clean, corrupted, answer, wrong (see README).")
    return 0


def add_tools(sub, add_common) -> None:
    from circuits.cli.common import ABLATIONS, finite_float, non_negative_int, positive_int
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("verify", help="faithfulness, curve (CPR/CMD), completeness, minimality, ablations, stability",
                       epilog="example: circuits verify circuit.json induction-2l induction --min-faithfulness 0.8",
                       formatter_class=fmt)
    p.add_argument("circuit")
    p.add_argument("model")
    p.add_argument("task")
    p.add_argument("--ablation", choices=ABLATIONS, help="default: the circuit file's own ablation, else resample")
    p.add_argument("--min-faithfulness", type=finite_float, help="exit 1 when normalized faithfulness is below this")
    p.add_argument("--subsets", type=non_negative_int, default=16,
                   help="completeness: random knock-out subsets (default 16)")
    p.add_argument("--minimality-sample", type=non_negative_int, default=40,
                   help="minimality: test at most this many components, a random sample above it, with the "
                        "share not needed and its 95%% interval (default 40; 0: every component)")
    p.add_argument("--stability", type=non_negative_int, default=0, help="bootstrap rediscoveries (default 0: skip)")
    p.add_argument("--test-fraction", type=float,
                   help="verify on the held-out part of the task's seeded split (as discover/benchmark --test-fraction)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the discovery/test split (default 0)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--roles", action="store_true",
                   help="label heads with their measured role (previous-token, induction, name mover …) when the "
                        "circuit file has none (discover --roles stores them)")
    add_common(p)
    p.set_defaults(func=cmd_verify, outputs=lambda a: [(a.out, (".json",), "--out")] if a.out else [])

    p = sub.add_parser("render", help="draw a circuit (SVG or PNG; PDF needs Graphviz's dot; the DOT file is always written)",
                       epilog="example: circuits render circuit.json -o circuit.svg\n\n"
                              "graphviz-pure (installed with the package) draws .svg and .png; a Graphviz\n"
                              "install (`dot` on the PATH, used first) also draws .pdf.", formatter_class=fmt)
    p.add_argument("circuit")
    p.add_argument("-o", "--output", default="circuit.svg",
                   help=".svg, .png, .pdf (Graphviz's dot only) or .dot; the DOT file is written next to it")
    p.add_argument("--title")
    p.add_argument("--level", choices=["auto", "node", "edge"], default="auto",
                   help="node: one arrow per pair of components (edges between them summed); edge: every "
                        "edge; auto (default): node level above 80 edges")
    p.add_argument("--max-edges", type=positive_int,
                   help="draw only the strongest arrows (default: 60 at node level, all at edge level)")
    p.set_defaults(func=cmd_render, outputs=_drawing_outputs)

    p = sub.add_parser("export", help="write a circuit in another format",
                       epilog="example: circuits export circuit.json --format mib-pt -o circuit.pt", formatter_class=fmt)
    p.add_argument("circuit")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--sum-positions", action="store_true",
                   help="write a position-aware circuit's plain view: edges kept at any position, scores "
                        "summed over positions (needed for the MIB formats, which have no positions)")
    p.set_defaults(func=cmd_export, outputs=lambda a: [(a.output, EXPORT_SUFFIXES[a.format], f"--format {a.format} output")])

    p = sub.add_parser("import", help="read an MIB/EAP-IG, GraphML or node-link circuit into a circuits file",
                       epilog="example: circuits import mib_circuit.pt --format mib --model random:gpt2-small -o c.json",
                       formatter_class=fmt)
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=["mib", "graphml", "node-link"])
    p.add_argument("--model", required=True, help="the model the circuit belongs to")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_import, outputs=lambda a: [(a.output, (".json",), "-o")])

    p = sub.add_parser("compare", help="compare circuits (methods, seeds, checkpoints, models)",
                       epilog="example: circuits compare eap.json acdc.json -o diff.svg\n"
                              "         circuits compare runs/      (every circuit of a sweep directory)",
                       formatter_class=fmt)
    p.add_argument("circuits", nargs="+", help="circuit files, or a directory of them (a sweep's output)")
    p.add_argument("-o", "--output", help="diff drawing of the first two (same model)")
    p.add_argument("--roles", action="store_true",
                   help="also align by head role (loads each circuit's model; measured as `circuits heads`)")
    p.add_argument("--n", type=int, default=32, help="--roles: examples of the circuit's built-in task (default 32)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare, outputs=_drawing_outputs)

    p = sub.add_parser("tasks", help="list built-in tasks", epilog="example: circuits tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)
