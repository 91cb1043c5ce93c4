"""Circuit diagrams: DOT text (always), rendered to SVG or PNG by `graphviz-pure` (installed with
the package) or Graphviz's `dot`, and to PDF by `dot` only (graphviz-pure has no PDF output).

Layout: one row per layer (heads, then the MLP above them), input at the bottom and logits at
the top, each row labelled; heads are ellipses, MLPs boxes, KV groups (GQA) diamonds, input and
logits grey; edge colour gives the score's sign (blue: supports the behaviour, red: works against
it) and width its size; a legend says so.

Two levels: edge level draws every edge (q/k/v labelled); node level, the default above
`EDGE_LEVEL_MAX` edges, draws one arrow per pair of components (the edges between them summed)
and only the `max_edges` strongest, so a circuit of thousands of edges stays readable and fast
to lay out.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from circuits.circuit import Circuit
from circuits.errors import CircuitsError
from circuits.files import atomic_path, write_text
from circuits.graph import Channel

FORMATS = ("svg", "png", "pdf")
LEVELS = ("auto", "node", "edge")
EDGE_LEVEL_MAX = 80          # auto: above this many edges, draw components (node level)
NODE_LEVEL_EDGES = 60        # node level: arrows drawn by default (the strongest)
POSITIVE, NEGATIVE, NEUTRAL = "#2b6cb0", "#c53030", "#555555"


class RenderError(CircuitsError, RuntimeError):
    """No renderer available, or the renderer failed."""


def edge_id(name: str) -> str:
    """A DOT/SVG-safe id for an edge name."""
    return name.replace("->", "__").replace("<", "_").replace(">", "").replace(".", "_")


def _node_style(name: str, layer_colours: list[str]) -> str:
    if name in ("input", "logits"):
        return 'shape=box, style="filled,rounded", fillcolor="#e2e8f0"'
    if name.startswith("m"):
        return 'shape=box, style=filled, fillcolor="#fbd38d"'
    layer = int(name[1:].split(".")[0])
    if ".kv" in name:
        return f'shape=diamond, style=filled, fillcolor="{layer_colours[layer % len(layer_colours)]}", fontsize=9'
    return f'shape=ellipse, style=filled, fillcolor="{layer_colours[layer % len(layer_colours)]}"'


def _row(g, node: str) -> int:
    """Row of a node: input 0, layer L's heads (and KV groups) 2L+1, its MLP 2L+2, logits last."""
    if node == "input":
        return 0
    if node == "logits":
        return 2 * g.arch.n_layers + 2
    if node.startswith("m"):
        return 2 * int(node[1:]) + (1 if g.arch.parallel else 2)
    return 2 * int(node[1:].split(".")[0]) + 1


def _target(g, r: int) -> str:
    """The component an edge into receiver r ends at: its head or MLP; under GQA a k/v input
    is its KV group's (`a3.kv1`), shared by the group's query heads."""
    rec = g.receivers[r]
    if g.arch.grouped and rec.channel in (Channel.K, Channel.V):
        return f"a{rec.layer}.kv{rec.index}"
    return rec.node


def _kv_label(g, node: str) -> str:
    per = g.arch.n_heads // g.arch.n_kv_heads
    layer, group = node[1:].split(".kv")
    heads = range(int(group) * per, (int(group) + 1) * per)
    return f"{node}\\n(h{heads[0]}-h{heads[-1]})"


def to_dot(circuit: Circuit, title: str | None = None, node_colours: dict[str, str] | None = None,
           edge_colours: dict[str, str] | None = None, level: str = "auto",
           max_edges: int | None = None) -> str:
    """DOT text of a circuit. level: "edge" (every edge), "node" (one arrow per pair of
    components) or "auto" (node above EDGE_LEVEL_MAX edges). max_edges: draw only that many of
    the strongest arrows (default: all at edge level, NODE_LEVEL_EDGES at node level).
    node_colours/edge_colours override fills and edge colours (comparison diffs; edge level)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    g = circuit.graph
    mask = circuit.mask & g.allowed
    n_edges = int(mask.sum())
    roles = {h: r for h, r in circuit.provenance.get("head_roles", {}).items() if r}
    if level == "auto":
        level = "node" if n_edges > EDGE_LEVEL_MAX and edge_colours is None else "edge"
    rows, cols = torch.nonzero(mask, as_tuple=True)
    scores = circuit.scores
    if scores is not None:      # a NaN/inf score would be drawn as penwidth=nan: draw it as unscored
        scores = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)
    values = scores[rows, cols].float() if scores is not None else torch.zeros(len(rows))
    # arrows: (sender, target) -> (signed sum, |sum| weight, channels, edge names)
    arrows: dict[tuple[str, str], list] = {}
    for i, (s, r) in enumerate(zip(rows.tolist(), cols.tolist())):
        rec = g.receivers[r]
        ch = rec.channel.value if rec.channel in (Channel.Q, Channel.K, Channel.V) else ""
        if level == "node":
            key = (g.senders[s], _target(g, r))
            a = arrows.setdefault(key, [0.0, 0.0, set(), []])
            a[0] += float(values[i])
            a[1] += abs(float(values[i])) if scores is not None else 1.0
            a[2].add(ch)
            a[3].append(g.edge_name(s, r))
        else:
            name = g.edge_name(s, r)
            if ch and g.arch.grouped and ch != "q":
                ch = f"{ch}{rec.index}"
            targets = [g.nodes[n] for n in g.receiver_nodes(r)]
            for t in targets:
                eid = edge_id(name) if len(targets) == 1 else f"{edge_id(name)}__{t.replace('.', '_')}"
                arrows[(g.senders[s], t, eid)] = [float(values[i]), abs(float(values[i])) if scores is not None else 1.0,
                                                  {ch}, [name]]
    total_arrows = len(arrows)
    limit = max_edges if max_edges is not None else (NODE_LEVEL_EDGES if level == "node" else None)
    kept = sorted(arrows.items(), key=lambda kv: -kv[1][1])[:limit] if limit is not None else list(arrows.items())
    top = max((a[1] for _, a in kept), default=0.0) or 1.0
    nodes: set[str] = set()
    edges = []
    for key, (signed, weight, chans, names) in kept:
        sender, target = key[0], key[1]
        nodes.update((sender, target))
        colour = (edge_colours or {}).get(names[0]) if len(names) == 1 else None
        colour = colour or (POSITIVE if signed > 0 else NEGATIVE if signed < 0 else NEUTRAL)
        width = 0.6 + 4.4 * weight / top
        label = "".join(sorted(c for c in chans if c))
        if level == "node":
            eid = edge_id(f"{sender}->{target}")
            tip = f"{sender}->{target}: {len(names)} edge{'s' * (len(names) != 1)}, score {signed:.4g}"
            if len(names) > 1:
                label = f"{label} {len(names)}".strip()
        else:
            eid = key[2]
            tip = f"{names[0]} score {signed:.4g}"
        attrs = [f'id="{eid}"', f'color="{colour}"', f"penwidth={width:.2f}", f'tooltip="{tip}"']
        if label:
            attrs.append(f'label="{label}"')
        edges.append(f'  "{sender}" -> "{target}" [{", ".join(attrs)}];')
    lines = ["digraph circuit {", '  rankdir=BT; ranksep=0.5; nodesep=0.2; splines=true; newrank=true;',
             '  node [fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=9, arrowsize=0.5];']
    lines.append(f'  labelloc=t; fontname="Helvetica"; fontsize=11; label="{_legend(title, level, len(kept), total_arrows, n_edges, g.arch.grouped)}";')
    palette = ["#bee3f8", "#c6f6d5", "#fed7e2", "#e9d8fd", "#fefcbf", "#b2f5ea"]
    by_row: dict[int, list[str]] = {}
    for n in nodes:
        by_row.setdefault(_row(g, n), []).append(n)
    row_names = []
    for row in sorted(by_row):
        members = sorted(by_row[row], key=lambda n: (len(n), n))
        # a label at the left of each row names the layer; invisible edges keep rows in order
        tag = f"row{row}"
        text = "" if row in (0, 2 * g.arch.n_layers + 2) else \
            f"L{(row - 1) // 2}" + (" mlp" if row % 2 == 0 and not g.arch.parallel else "")
        lines.append(f'  "{tag}" [shape=plaintext, label="{text}", fontcolor="#718096", fontsize=10];')
        row_names.append(tag)
        for n in members:
            style = _node_style(n, palette)
            if node_colours and n in node_colours:
                style += f', fillcolor="{node_colours[n]}"'
            label = f', label="{_kv_label(g, n)}"' if ".kv" in n else ""
            if n in roles:                    # measured head role (discover --roles, heads)
                label = f', label="{n}\\n{roles[n]}"'
            lines.append(f'  "{n}" [id="node_{n.replace(".", "_")}", {style}{label}];')
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in [tag] + members) + " }")
    for lo, hi in zip(row_names, row_names[1:]):
        lines.append(f'  "{lo}" -> "{hi}" [style=invis];')
    lines += edges
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend(title: str | None, level: str, shown: int, total: int, n_edges: int, grouped: bool) -> str:
    parts = [title] if title else []
    if level == "node":
        what = (f"{shown} strongest of {total} connections between components ({n_edges} edges)"
                if shown < total else f"{total} connections between components ({n_edges} edges)")
        parts.append(what + "; label: receiving inputs and edge count")
    else:
        parts.append(f"{shown} strongest of {total} edges" if shown < total else f"{total} edges")
    parts.append("blue supports the behaviour, red works against it; width: |score|")
    parts.append("ellipse head, box MLP" + (", diamond KV group (k/v input shared by its query heads)" if grouped else ""))
    return "\\n".join(parts)


def renderer() -> list[str] | None:
    """The command that renders DOT: Graphviz `dot` when installed, else `graphviz-pure`; each
    looked for on the PATH, then next to this Python (a virtual environment that is not activated
    has its scripts there, off the PATH)."""
    here = str(Path(sys.executable).parent)
    for name in ("dot", "graphviz-pure"):
        path = shutil.which(name) or shutil.which(name, path=here)
        if path:
            return [path]
    return None


@functools.lru_cache(maxsize=None)
def renderer_formats(cmd: tuple[str, ...]) -> frozenset[str] | None:
    """The output formats a renderer lists when asked for an unknown one (`-T?`; Graphviz and
    graphviz-pure both answer 'Format: "?" not recognized. Use one of: …'), or None if it does not say."""
    try:
        done = subprocess.run([*cmd, "-T?"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    _, found, listed = (done.stderr + done.stdout).partition("Use one of:")
    # Graphviz may list variants such as png:cairo
    return frozenset(f.split(":")[0] for f in listed.split()) if found else None


def _check_format(cmd: list[str], fmt: str, dot_path: Path, out: Path) -> None:
    """Refuse, before running it, a format the renderer cannot write, naming those it can."""
    formats = renderer_formats(tuple(cmd))
    if formats is None or fmt in formats:
        return
    name = Path(cmd[0]).name
    can = " and ".join(f".{f}" for f in FORMATS if f in formats) or "none of " + ", ".join(FORMATS)
    hint = "" if name == "dot" else f"; Graphviz (`apt-get install graphviz`) can: dot -T{fmt} {dot_path} -o {out}"
    raise RenderError(f"{name} cannot draw .{fmt} (it draws {can}); the DOT file is at {dot_path}{hint}")


def render(dot_text: str, out: str | Path) -> Path:
    """Write `out` (.svg/.png/.pdf) and, always, the DOT text next to it (`out` with .dot)."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    dot_path = out.with_suffix(".dot")
    write_text(dot_path, dot_text)
    if fmt == "dot":
        return dot_path
    if fmt not in FORMATS:
        raise RenderError(f"cannot render to .{fmt}; choose one of {', '.join(FORMATS)} or .dot")
    cmd = renderer()
    if cmd is None:
        raise RenderError(f"no DOT renderer found; the DOT file is at {dot_path}. Install one: "
                          f"`pip install graphviz-pure` (pure, no system packages; SVG and PNG) or "
                          f"Graphviz (`apt-get install graphviz`; also PDF)")
    _check_format(cmd, fmt, dot_path, out)
    with atomic_path(out) as tmp:       # the renderer writes a temporary file; it replaces `out` once whole
        done = subprocess.run(cmd + [f"-T{fmt}", str(dot_path), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RenderError(f"{Path(cmd[0]).name} failed on {dot_path}: {done.stderr.strip()[:500]}")
        if not tmp.stat().st_size:
            raise RenderError(f"{Path(cmd[0]).name} wrote nothing for {out}; the DOT file is at {dot_path}")
    return out


# ---- position-aware circuits: one column per token position ----------------------------------

def _depth_rank(graph, node: str) -> int:
    """Row of a node in the diagram: input 0, then per layer heads and MLP, logits last."""
    return _row(graph, node)


def to_dot_positions(circuit: Circuit, title: str | None = None) -> str:
    """DOT text of a position-aware circuit: positions as columns (one cluster each, in token
    order), components as rows by depth, as in `to_dot`; node names are `name@position`."""
    g, names = circuit.graph, circuit.positions
    svg_id = lambda text: edge_id(text).replace("@", "_at_")
    mask = circuit.mask & g.allowed
    ps, rows, cols = torch.nonzero(mask, as_tuple=True)
    scores = circuit.scores
    mags = scores[ps, rows, cols].abs() if scores is not None and len(rows) else torch.ones(len(rows))
    top = float(mags.max()) if len(mags) and float(mags.max()) > 0 else 1.0
    palette = ["#bee3f8", "#c6f6d5", "#fed7e2", "#e9d8fd", "#fefcbf", "#b2f5ea"]
    lines = ["digraph circuit {", '  rankdir=BT; ranksep=0.6; nodesep=0.25; splines=true; newrank=true;',
             '  node [fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=9, arrowsize=0.5];']
    if title:
        lines.append(f'  labelloc=t; label="{title}";')
    nodes: dict[int, set[str]] = {}
    edges = []
    for i, (p, s, r) in enumerate(zip(ps.tolist(), rows.tolist(), cols.tolist())):
        rec, sender = g.receivers[r], g.senders[s]
        name = f"{sender}@{names[p]}->{rec.name}@{names[p]}"
        score = float(scores[p, s, r]) if scores is not None else 0.0
        colour = POSITIVE if score > 0 else NEGATIVE if score < 0 else NEUTRAL
        label = rec.channel.value if rec.channel in (Channel.Q, Channel.K, Channel.V) else ""
        nodes.setdefault(p, set()).add(sender)
        for t in (g.nodes[n] for n in g.receiver_nodes(r)):
            nodes[p].add(t)
            attrs = [f'id="{svg_id(name)}__{svg_id(t)}"', f'color="{colour}"',
                     f"penwidth={0.6 + 4.4 * float(mags[i]) / top:.2f}", f'tooltip="{name} score {score:.4g}"']
            if label:
                attrs.append(f'label="{label}"')
            edges.append(f'  "{sender}@{names[p]}" -> "{t}@{names[p]}" [{", ".join(attrs)}];')
    by_rank: dict[int, list[str]] = {}
    for p in sorted(nodes):
        lines.append(f'  subgraph "cluster_{names[p]}" {{ label="{names[p]}"; color="#cbd5e0";')
        for n in sorted(nodes[p]):
            node_id = f"{n}@{names[p]}"
            lines.append(f'    "{node_id}" [id="node_{svg_id(node_id)}", label="{n}", {_node_style(n, palette)}];')
            by_rank.setdefault(_depth_rank(g, n), []).append(node_id)
        lines.append("  }")
    for rank in sorted(by_rank):
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in by_rank[rank]) + " }")
    lines += edges
    lines.append("}")
    return "\n".join(lines) + "\n"
