"""The interactive circuit viewer: one self-contained HTML page (no network when viewed).

The page draws the circuit with sigma.js on a graphology graph, both vendored under
`circuits/io/viewer/vendor/` (pinned; `tasks/vendor_viewer.sh` refreshes them from npm); sigma's
WebGL serves only hover picking, nodes and edges are drawn on CPU 2D canvases (several times
faster than WebGL without a GPU). Python prepares one JSON document (`page_data`) and inlines
it with the libraries into `viewer/template.html`; everything interactive (slider, pruning,
hover, path highlight, search, overlay) runs in the page's own script, `viewer/viewer.js`.

Layout: one row per layer (input at the bottom, logits at the top; a sequential model's MLP sits
half a row above its heads), heads in columns. Edges end at small q/k/v ports under the head they
feed; under grouped-query attention the k and v ports sit under the middle of their KV group, so
an edge into a shared k/v input is drawn once, as it is stored.

Edges are listed by |score|, highest first, ties in graph order — the order `select.top_n`
ranks them — so the page's top-n is a prefix of the list; it prunes a top-n set to input→logits
paths exactly as `select.prune` does (tested against it).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from circuits.circuit import Circuit
from circuits.errors import CircuitsError
from circuits import positions as pos
from circuits.graph import Channel, Graph, node_scores

VIEW_SCHEMA = "circuits.view"
VIEW_SCHEMA_VERSION = 1
# Above this many drawn edges the page draws the strongest ones and says how many it hides.
DEFAULT_MAX_DRAWN = 12000   # keeps a redraw near 0.1 s without a GPU (CLI: --max-drawn)

# Known-head lists in a built-in model's meta.json → the role they name.
META_ROLES = {"previous_token_heads": "previous-token", "induction_heads": "induction",
              "duplicate_token_heads": "duplicate-token", "name_mover_heads": "name mover",
              "s_suppression_heads": "S-suppression"}


class ViewError(CircuitsError, ValueError):
    """Circuits that cannot be shown together, or a page that cannot be written."""


@dataclass(frozen=True)
class Named:
    """A circuit and the name the page gives it (its file name)."""
    name: str
    circuit: Circuit


# ---- roles ---------------------------------------------------------------------------------

def _role_entry(value) -> dict | None:
    """A role as the circuit file may carry it: a string, or {"role": ..., other details}."""
    if isinstance(value, str) and value:
        return {"role": value}
    if isinstance(value, dict) and isinstance(value.get("role"), str):
        return {k: v for k, v in value.items() if isinstance(v, (str, int, float, bool, list, dict)) or v is None}
    return None


def roles_of(provenance: dict, graph: Graph) -> tuple[dict[str, dict], str | None]:
    """({head: {"role": ..., details}}, where they came from) — from the circuit file's
    provenance (`roles`, or `head_roles`), else from the known heads of a built-in model's
    meta.json; ({}, None) when neither says anything."""
    heads = set(graph.senders)
    for key in ("roles", "head_roles"):
        found = provenance.get(key)
        if isinstance(found, dict) and isinstance(found.get("heads"), dict):
            found = found["heads"]
        if isinstance(found, dict):
            roles = {h: e for h, v in found.items() if h in heads and (e := _role_entry(v))}
            if roles:
                return roles, f"circuit file ({key})"
    model = provenance.get("model")
    if isinstance(model, str) and model.replace("-", "").replace("_", "").isalnum():
        meta_path = resources.files("circuits") / "builtin" / model / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, None
        roles: dict[str, dict] = {}
        for key, role in META_ROLES.items():
            for h in meta.get(key) or []:
                if h in heads and h not in roles:
                    roles[h] = {"role": role}
        if roles:
            return roles, f"{model}'s meta.json (known heads)"
    return {}, None


# ---- curve -----------------------------------------------------------------------------------

def curve_of(provenance: dict, report: dict | None = None) -> list[dict] | None:
    """Faithfulness against circuit size, [{"edges", "faithfulness"}] by size, from a `verify
    --out` report or the circuit file's provenance (`curve` or `faithfulness_curve`: a list of
    points or {"points": [...]}); points need `edges` and a finite `faithfulness`."""
    sources = [report.get("curve") if report else None,
               provenance.get("curve"), provenance.get("faithfulness_curve")]
    for found in sources:
        if isinstance(found, dict):
            found = found.get("points")
        if not isinstance(found, list):
            continue
        points = []
        for p in found:
            if not isinstance(p, dict):
                continue
            e, f = p.get("edges"), p.get("faithfulness")
            if isinstance(e, (int, float)) and isinstance(f, (int, float)) and math.isfinite(f):
                points.append({"edges": int(e), "faithfulness": float(f),
                               **({"percent": p["percent"]} if isinstance(p.get("percent"), (int, float)) else {})})
        if points:
            return sorted(points, key=lambda p: p["edges"])
    return None


# ---- layout ---------------------------------------------------------------------------------

def _layout(graph: Graph, roles: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(nodes, receivers) of the page: positions in graph units (x: head column, y: layer row)."""
    a = graph.arch
    H, L = a.n_heads, a.n_layers
    per_group = H // a.n_kv_heads
    mid = (H - 1) / 2
    nodes = []
    for name in graph.nodes:
        if name == "input":
            node = {"id": name, "kind": "input", "layer": -1, "x": mid, "y": -1.0}
        elif name == "logits":
            node = {"id": name, "kind": "logits", "layer": L, "x": mid, "y": float(L)}
        elif name.startswith("m"):
            layer = int(name[1:])
            # sequential: half a row above its heads, whose output it reads; parallel: beside them
            node = {"id": name, "kind": "mlp", "layer": layer, "x": (mid + 0.5 * (H % 2)) if not a.parallel else H,
                    "y": layer + (0.0 if a.parallel else 0.5)}
        else:
            layer, head = (int(p) for p in name[1:].split(".h"))
            node = {"id": name, "kind": "head", "layer": layer, "head": head, "x": float(head), "y": float(layer)}
            if a.grouped:
                g = head // per_group
                node["kv_group"] = {"group": g, "heads": [f"h{h}" for h in range(g * per_group, (g + 1) * per_group)]}
            if name in roles:
                node.update(roles[name])
        nodes.append(node)
    index = {n["id"]: i for i, n in enumerate(nodes)}
    receivers = []
    for r, rec in enumerate(graph.receivers):
        targets = graph.receiver_nodes(r)
        item = {"name": rec.name, "channel": rec.channel.value, "targets": targets}
        if rec.channel in (Channel.Q, Channel.K, Channel.V):
            dx = {Channel.Q: -0.22, Channel.K: 0.0, Channel.V: 0.22}[rec.channel]
            if rec.channel is Channel.Q or not a.grouped:
                x = nodes[targets[0]]["x"]
            else:                           # under the middle of the KV group
                x = sum(nodes[t]["x"] for t in targets) / len(targets)
                dx *= 2.5
            item["port"] = [round(x + dx, 3), round(nodes[targets[0]]["y"] - 0.28, 3)]
            if a.grouped and rec.channel is not Channel.Q:
                item["kv_group"] = rec.index
        receivers.append(item)
    assert all(nodes[index[n]]["id"] == n for n in graph.nodes)
    return nodes, receivers


# ---- data ----------------------------------------------------------------------------------

def _short(x: float) -> float:
    return float(f"{x:.5g}")


def circuit_data(named: Named, report: dict | None = None) -> dict:
    """One circuit for the page: edges ranked like select.top_n, with scores and the saved mask.
    A position-aware circuit ([P, S, R]) ranks its position-edges the same way (position-major
    ties) and lists each one's position (`p`); its node scores are per position, [P][n_nodes]."""
    c = named.circuit
    g = c.graph
    allowed = g.allowed
    mask = c.mask & allowed
    n_ranked = int(allowed.sum()) * (mask.numel() // allowed.numel())
    if c.scores is not None:
        values = torch.where(allowed, c.scores.abs().float(), torch.tensor(float("-inf"))).flatten()
        order = torch.sort(values, descending=True, stable=True).indices[:n_ranked]
    else:                                   # no scores: only the saved edges, in graph order
        order = torch.nonzero(mask.flatten()).flatten()
    S, R = g.n_senders, g.n_receivers
    s_idx = (order % (S * R) // R).tolist()
    r_idx = (order % R).tolist()
    flat_mask = mask.flatten()
    edges = {"s": s_idx, "r": r_idx, "in": [int(v) for v in flat_mask[order].tolist()]}
    if c.positions is not None:
        edges["p"] = (order // (S * R)).tolist()
    if c.scores is not None:
        edges["score"] = [_short(v) for v in c.scores.flatten()[order].tolist()]
        if c.positions is None:
            nscores = [_short(v) for v in node_scores(g, c.scores).tolist()]
        else:
            nscores = [[_short(v) for v in node_scores(g, sp).tolist()] for sp in c.scores]
    else:
        nscores = None
    prov = c.provenance
    task = prov.get("task")
    return {
        "name": named.name,
        "model": prov.get("model"), "task": task.get("name") if isinstance(task, dict) else task,
        "method": prov.get("method"), "metric": prov.get("metric"), "ablation": prov.get("ablation"),
        "faithfulness": prov.get("faithfulness") if isinstance(prov.get("faithfulness"), (int, float))
        and math.isfinite(prov["faithfulness"]) else None,
        "n_edges": c.n_edges, "total_edges": n_ranked, "positions": list(c.positions) if c.positions else None,
        "n_nodes": int(g.node_mask(mask).sum()) if c.positions is None else int(pos.node_mask_by_position(g, mask).sum()),
        "has_scores": c.scores is not None, "edges": edges, "node_scores": nscores,
        "curve": curve_of(prov, report),
    }


def _same_model(a: Named, b: Named) -> str | None:
    """Why two circuits cannot be overlaid edge by edge, or None."""
    ga, gb = a.circuit.graph.arch, b.circuit.graph.arch
    shape = lambda x: (x.n_layers, x.n_heads, x.n_kv_heads, x.has_mlp, x.parallel)  # noqa: E731
    if shape(ga) != shape(gb):
        return (f"{a.name} and {b.name} are circuits of different model shapes "
                f"({ga.n_layers}×{ga.n_heads} vs {gb.n_layers}×{gb.n_heads} layers×heads)")
    pa, pb = a.circuit.positions, b.circuit.positions
    if pa != pb:
        return (f"{a.name} and {b.name} are circuits at different position grains "
                f"({'positions ' + ', '.join(pa) if pa else 'no positions'} vs "
                f"{'positions ' + ', '.join(pb) if pb else 'no positions'})")
    ma, mb = a.circuit.provenance.get("model"), b.circuit.provenance.get("model")
    if ma and mb and ma != mb:
        return f"{a.name} is a circuit of {ma}, {b.name} of {mb}"
    return None


def page_data(circuits: list[Named], align: bool = False, reports: list[dict | None] | None = None,
              max_drawn: int = DEFAULT_MAX_DRAWN, title: str | None = None) -> dict:
    """Everything the page shows, as one JSON-able dict. Several circuits must be of one model
    (same graph, same model spec) unless align=True; aligned circuits of the same shape overlay
    edge by edge (by name), of different shapes they are drawn side by side by relative depth."""
    if not circuits:
        raise ViewError("no circuit to view")
    reports = reports or [None] * len(circuits)
    first = circuits[0]
    mode = "single" if len(circuits) == 1 else "overlay"
    notes = []
    for other in circuits[1:]:
        why = _same_model(first, other)
        if why and not align:
            raise ViewError(f"{why}: pass --align to view them together")
        if why:
            shape_differs = other.circuit.graph.arch.n_layers != first.circuit.graph.arch.n_layers or \
                other.circuit.graph.n_edges != first.circuit.graph.n_edges or \
                other.circuit.graph.arch.n_kv_heads != first.circuit.graph.arch.n_kv_heads or \
                other.circuit.positions != first.circuit.positions
            if shape_differs:
                mode = "side-by-side"
                notes.append(f"{why}: heads and edges have no counterpart, so they are drawn side by side, "
                             f"layers at relative depth")
            else:
                notes.append(f"{why}: overlaid by edge name (--align)")
    graphs = [first.circuit.graph] if mode != "side-by-side" else [n.circuit.graph for n in circuits]
    layouts = []
    for i, g in enumerate(graphs):
        roles, source = roles_of(circuits[i].circuit.provenance, g)
        nodes, receivers = _layout(g, roles)
        layouts.append({"nodes": nodes, "receivers": receivers, "roles_source": source,
                        "arch": {"n_layers": g.arch.n_layers, "n_heads": g.arch.n_heads,
                                 "n_kv_heads": g.arch.n_kv_heads, "has_mlp": g.arch.has_mlp,
                                 "parallel": g.arch.parallel, "grouped": g.arch.grouped,
                                 "family": g.arch.family},
                        "n_senders": g.n_senders, "logits_col": g.logits_col,
                        # positions as columns: every node drawn once per position
                        "positions": list(circuits[i].circuit.positions) if circuits[i].circuit.positions else None})
    return {"schema": VIEW_SCHEMA, "schema_version": VIEW_SCHEMA_VERSION, "mode": mode,
            "title": title or " vs ".join(n.name for n in circuits),
            "max_drawn": int(max_drawn), "notes": notes, "layouts": layouts,
            "circuits": [circuit_data(n, r) for n, r in zip(circuits, reports)]}


# ---- the page ------------------------------------------------------------------------------

VIEWER = resources.files("circuits.io") / "viewer"
VENDOR = ("graphology.umd.min.js", "sigma.min.js")


def _script(text: str) -> str:
    """Inline script text: a literal `</script` inside would end the element early."""
    return text.replace("</script", "<\\/script")


def to_html(data: dict) -> str:
    """The self-contained page: template + vendored libraries + viewer script + data."""
    template = (VIEWER / "template.html").read_text(encoding="utf-8")
    libs = "\n".join(f"<script>/* {name} */\n{_script((VIEWER / 'vendor' / name).read_text(encoding='utf-8'))}\n</script>"
                     for name in VENDOR)
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return (template.replace("{{TITLE}}", html.escape(data["title"]))
            .replace("{{LIBRARIES}}", libs)
            .replace("{{DATA}}", _script(payload))
            .replace("{{VIEWER}}", _script((VIEWER / "viewer.js").read_text(encoding="utf-8"))))


def write_html(page: str, out: str | Path) -> Path:
    """Write atomically (a failed write leaves no half page); one-line error when it cannot."""
    out = Path(out)
    if out.is_dir():
        raise ViewError(f"{out}: is a directory; give a file name such as {out / 'circuit.html'}")
    if not out.parent.exists():
        raise ViewError(f"{out}: cannot write, folder {out.parent} does not exist")
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ViewError(f"{out}: cannot write ({err.strerror or err})") from None
    return out


def view(circuits: list[Named], out: str | Path | None = None, **kwargs) -> str:
    """The page's HTML (and written to `out` when given)."""
    page = to_html(page_data(circuits, **kwargs))
    if out is not None:
        write_html(page, out)
    return page


class Viewer:
    """Shows the page inline in a notebook (an iframe whose srcdoc is the page)."""

    def __init__(self, *circuits: Circuit | Named, height: int = 640, **kwargs):
        self.named = [c if isinstance(c, Named) else Named(f"circuit {i + 1}" if len(circuits) > 1 else "circuit", c)
                      for i, c in enumerate(circuits)]
        self.height = height
        self.kwargs = kwargs
        self.page = view(self.named, **kwargs)

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" style="width:100%;height:{self.height}px;'
                f'border:1px solid #ddd" sandbox="allow-scripts"></iframe>')

    def save(self, out: str | Path) -> Path:
        return write_html(self.page, out)


def load_named(paths: list[str]) -> list[Named]:
    """Circuit files → Named circuits, one-line errors for anything that is not one."""
    from circuits import circuit as circuit_io
    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):          # same file name in two folders: name them by path
        names = [str(p) for p in paths]
    return [Named(name, circuit_io.load(p)) for name, p in zip(names, paths)]
