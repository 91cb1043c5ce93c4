"""Circuit diagrams: DOT text (always), rendered to SVG or PNG by `graphviz-pure` (installed with
the package) or Graphviz's `dot`, and to PDF by `dot` only (graphviz-pure has no PDF output).

Layout: layered by depth, input at the bottom and logits at the top; heads are ellipses, MLPs
boxes, input and logits grey; edges into q/k/v are labelled; edge colour gives the score's sign
(blue: supports the behaviour, red: works against it) and width its size.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import torch

from circuits.circuit import Circuit
from circuits.errors import CircuitsError
from circuits.files import atomic_path, write_text
from circuits.graph import Channel

FORMATS = ("svg", "png", "pdf")
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
    return f'shape=ellipse, style=filled, fillcolor="{layer_colours[layer % len(layer_colours)]}"'


def to_dot(circuit: Circuit, title: str | None = None, node_colours: dict[str, str] | None = None,
           edge_colours: dict[str, str] | None = None) -> str:
    """DOT text of a circuit's edges. node_colours/edge_colours override fills and edge colours
    (used by comparison diffs)."""
    g = circuit.graph
    mask = circuit.mask & g.allowed
    rows, cols = torch.nonzero(mask, as_tuple=True)
    scores = circuit.scores
    if scores is not None:      # a NaN/inf score would be drawn as penwidth=nan: draw it as unscored
        scores = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)
    mags = scores[rows, cols].abs() if scores is not None and len(rows) else torch.ones(len(rows))
    top = float(mags.max()) if len(mags) and float(mags.max()) > 0 else 1.0
    nodes = set()
    lines = ["digraph circuit {", '  rankdir=BT; ranksep=0.6; nodesep=0.25; splines=true;',
             '  node [fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=9, arrowsize=0.5];']
    if title:
        lines.append(f'  labelloc=t; label="{title}";')
    edges = []
    for i, (s, r) in enumerate(zip(rows.tolist(), cols.tolist())):
        name = g.edge_name(s, r)
        rec = g.receivers[r]
        target_nodes = [g.nodes[n] for n in g.receiver_nodes(r)]
        sender = g.senders[s]
        nodes.add(sender)
        score = float(scores[s, r]) if scores is not None else 0.0
        colour = (edge_colours or {}).get(name) or (POSITIVE if score > 0 else NEGATIVE if score < 0 else NEUTRAL)
        width = 0.6 + 4.4 * float(mags[i]) / top
        label = rec.channel.value if rec.channel in (Channel.Q, Channel.K, Channel.V) else ""
        if label and g.arch.grouped and rec.channel is not Channel.Q:
            label = f"{label}{rec.index}"
        for t in target_nodes:
            nodes.add(t)
            attrs = [f'id="{edge_id(name)}"' if len(target_nodes) == 1 else f'id="{edge_id(name)}__{t.replace(".", "_")}"',
                     f'color="{colour}"', f"penwidth={width:.2f}", f'tooltip="{name} score {score:.4g}"']
            if label:
                attrs.append(f'label="{label}"')
            edges.append(f'  "{sender}" -> "{t}" [{", ".join(attrs)}];')
    palette = ["#bee3f8", "#c6f6d5", "#fed7e2", "#e9d8fd", "#fefcbf", "#b2f5ea"]
    by_rank: dict[int, list[str]] = {}
    for n in nodes:
        if n == "input":
            rank = 0
        elif n == "logits":
            rank = 2 * g.arch.n_layers + 2
        elif n.startswith("m"):
            layer = int(n[1:])
            rank = 2 * layer + (1 if g.arch.parallel else 2)
        else:
            rank = 2 * int(n[1:].split(".")[0]) + 1
        by_rank.setdefault(rank, []).append(n)
    for rank in sorted(by_rank):
        members = sorted(by_rank[rank])
        for n in members:
            style = _node_style(n, palette)
            if node_colours and n in node_colours:
                style += f', fillcolor="{node_colours[n]}"'
            lines.append(f'  "{n}" [id="node_{n.replace(".", "_")}", {style}];')
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in members) + " }")
    lines += edges
    lines.append("}")
    return "\n".join(lines) + "\n"


def renderer() -> list[str] | None:
    """The command that renders DOT: Graphviz `dot` when installed, else `graphviz-pure`."""
    for name in ("dot", "graphviz-pure"):
        path = shutil.which(name)
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
    if node == "input":
        return 0
    if node == "logits":
        return 2 * graph.arch.n_layers + 2
    if node.startswith("m"):
        return 2 * int(node[1:]) + (1 if graph.arch.parallel else 2)
    return 2 * int(node[1:].split(".")[0]) + 1


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
