"""`circuits heads MODEL [TASK]`: every head's role, measured on real activations."""

from __future__ import annotations

import argparse


def _strength(row: dict, role: str) -> float:
    key = {"previous-token": "previous_token", "duplicate-token": "duplicate_token", "induction": "induction"}
    if role in key:
        return row[key[role]]
    return {"mover": row.get("direct_answer", 0.0), "negative-mover": -row.get("direct_answer", 0.0),
            "suppressor": -row.get("direct_wrong", 0.0)}[role]


def role_lines(result, per_role: int = 6) -> list[str]:
    """One line per role: how many heads carry it as their label, the strongest first."""
    by_role: dict[str, list[str]] = {}
    for head, label in result.labels.items():
        if label:
            by_role.setdefault(label, []).append(head)
    lines = []
    for role, heads in sorted(by_role.items()):
        heads.sort(key=lambda h: -_strength(result.rows[h], role))
        shown = ", ".join(f"{h} {_strength(result.rows[h], role):.2f}" for h in heads[:per_role])
        more = f", +{len(heads) - per_role} more" if len(heads) > per_role else ""
        lines.append(f"  {role:<16}{len(heads):>4}  {shown}{more}")
    return lines or ["  no head meets a role's thresholds"]


def cmd_heads(args) -> int:
    from circuits.cli.common import _load_model_and_task, _print_json, plural, torch_dtype
    from circuits.model import loader
    from circuits.verify import roles

    if args.task is None:
        model, task = loader.load(args.model, seed=args.seed, device=args.device, dtype=torch_dtype(args)), None
    else:
        model, task = _load_model_and_task(args)
    result = roles.measure(model, task, n_diagnostic=args.sequences, seed=args.seed,
                           batch_size=args.batch_size or 16)
    ablated = {}
    top = []
    if task is not None:
        top = sorted(result.rows, key=lambda h: -abs(result.rows[h]["direct_metric"]))[: args.top]
        if args.ablate:
            from circuits import evaluation, patching
            setup = evaluation.prepare(model, task, patching.Ablation.RESAMPLE, batch_size=args.batch_size)
            ablated = roles.node_ablation(setup, top)
            for h, v in ablated.items():
                result.rows[h]["node_ablation"] = v
    if args.json:
        _print_json(result.as_dict())
        return 0
    a = model.arch
    print(f"{args.model}: {plural(a.n_layers * a.n_heads, 'head')}; diagnostics on "
          f"{plural(args.sequences, 'BOS + r + r sequence')} of random tokens")
    if task is None:
        print(f"roles (score >= {roles.THRESHOLDS['attention_score']}, active heads only):")
        print("\n".join(role_lines(result)))
        return 0
    f = result.facts
    print(f"{task.name}: {plural(len(task), 'example')}, logit diff clean {f['clean_logit_diff']:.2f}, "
          f"corrupted {f['corrupted_logit_diff']:.2f}")
    print("roles:")
    print("\n".join(role_lines(result)))
    print(f"top {len(top)} by direct effect (head->logits ablated), END attends to:")
    for h in top:
        r = result.rows[h]
        confirm = f"  ablated: {r['node_ablation']:+.2f} of gap" if "node_ablation" in r else ""
        print(f"  {h:<7} {result.labels[h] or '-':<15} {r['end_top']} {r['end_top_weight']:.2f} "
              f"(answer {r['end_to_answer']:.2f}, wrong {r['end_to_wrong']:.2f})  "
              f"metric {r['direct_metric']:+.2f}, answer {r['direct_answer']:+.2f}, wrong {r['direct_wrong']:+.2f}{confirm}")
    return 0


def add_heads(sub, add_common) -> None:
    from circuits.cli.common import non_negative_int, positive_int
    p = sub.add_parser(
        "heads", help="each head's role: previous-token, induction, duplicate-token; with a task, mover/suppressor",
        epilog="examples:\n  circuits heads induction-2l\n  circuits heads ioi-3l ioi --ablate\n\n"
               "Roles and thresholds: README, 'Head roles'. --json prints every measure of every head.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("task", nargs="?", help="optional task: where the answer position attends, direct effects")
    p.add_argument("--sequences", type=positive_int, default=16,
                   help="random repeated-token sequences for the diagnostics (default 16)")
    p.add_argument("--top", type=non_negative_int, default=8, help="heads listed by direct effect (default 8)")
    p.add_argument("--ablate", action="store_true",
                   help="confirm the listed heads by exact node ablation (share of the clean-empty gap lost)")
    add_common(p)
    p.set_defaults(func=cmd_heads)
