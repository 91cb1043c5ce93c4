"""Verifier figures against hand computation; exports round-trip; rendering draws everything."""

import json
import re

import networkx as nx
import pytest
import torch
from conftest import load_model, random_task
from test_patching import micro_model

from circuits import circuit as circuit_io
from circuits import evaluation, methods, select
from circuits.graph import build
from circuits.io import compare, formats, render
from circuits.model.loader import Model
from circuits.tasks.task import from_pairs
from circuits.verify import checks


def micro_setup():
    w = micro_model()
    model = Model("micro", w, build(w.arch), None, None, {})
    task = from_pairs("micro", [[0, 1, 2]], [[2, 2, 0]], [[0]], [[1]])
    return model, evaluation.prepare(model, task)


def test_faithfulness_matches_hand_computation():
    model, setup = micro_setup()
    g = model.graph
    E = model.weights.W_E
    x, xc = E[[0, 1, 2]], E[[2, 2, 0]]
    m = lambda v: (v[0] - v[1]).item()                # logit diff: token 0 minus token 1
    m_full = m(x[2] + x.mean(0))                      # clean
    m_empty = m(xc[2] + xc.mean(0))                   # everything corrupted
    circuit = g.mask_from_edges(["a0.h0->logits", "input->a0.h0<v>"])
    m_circ = m(xc[2] + x.mean(0))                     # input->logits reads the corrupted input
    f = setup.faithfulness(circuit)
    assert f["model"] == pytest.approx(m_full)
    assert f["empty"] == pytest.approx(m_empty)
    assert f["circuit"] == pytest.approx(m_circ)
    assert f["faithfulness"] == pytest.approx((m_circ - m_empty) / (m_full - m_empty))
    assert setup.faithfulness(g.full_mask())["faithfulness"] == pytest.approx(1.0)


def test_minimality_and_completeness_on_the_micro_model():
    model, setup = micro_setup()
    g = model.graph
    full = g.full_mask()
    mini = checks.minimality(setup, full)
    # Without the head, the logits read only the input: f = (m(x2 + mean xc) - m_empty) / (...)
    E = model.weights.W_E
    x, xc = E[[0, 1, 2]], E[[2, 2, 0]]
    m = lambda v: (v[0] - v[1]).item()
    m_full, m_empty = m(x[2] + x.mean(0)), m(xc[2] + xc.mean(0))
    f_no_head = (m(x[2] + xc.mean(0)) - m_empty) / (m_full - m_empty)
    assert mini["drop"]["a0.h0"] == pytest.approx(1 - f_no_head)
    comp = checks.completeness(setup, full)
    assert comp["worst_gap"] == pytest.approx(0.0, abs=1e-6)   # the full model is complete


def test_minimality_samples_large_circuits_and_states_the_error():
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model, n=4))
    g = model.graph
    comps = checks._components(g, g.full_mask())
    every = checks.minimality(setup, g.full_mask(), sample=0)
    assert every["tested"] == every["components"] == len(comps) and "estimate" not in every
    part = checks.minimality(setup, g.full_mask(), sample=3, seed=1)
    assert part["tested"] == 3 and part["components"] == len(comps) > 3
    assert set(part["drop"]) <= set(every["drop"])
    for name, drop in part["drop"].items():                  # the same measurement, on a sample
        assert drop == pytest.approx(every["drop"][name], abs=1e-5)
    est = part["estimate"]
    k = len(part["not_needed"])
    assert est["share_not_needed"] == pytest.approx(k / 3)
    lo, hi = est["interval_95"]
    assert 0 <= lo <= k / 3 <= hi <= 1 and hi - lo > 0.3     # three samples say little, and it says so
    assert checks.wilson(50, 100)[0] == pytest.approx(0.4038, abs=1e-3)


def test_cpr_cmd_follow_the_mib_trapezoid():
    fs = [0.0, 0.1, 0.3, 0.2, 0.5, 0.7, 0.9, 1.1, 1.0, 1.0]
    points = [checks.CurvePoint(p, 0, f) for p, f in zip(checks.MIB_PERCENTS, fs)]
    cpr, cmd = checks.cpr_cmd(points)
    xs = [p / 100 for p in checks.MIB_PERCENTS]
    want_cpr = sum((xs[i + 1] - xs[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(9))
    want_cmd = sum((xs[i + 1] - xs[i]) * (abs(1 - fs[i]) + abs(1 - fs[i + 1])) / 2 for i in range(9))
    assert cpr == pytest.approx(want_cpr) and cmd == pytest.approx(want_cmd)
    ones = [checks.CurvePoint(p, 0, 1.0) for p in checks.MIB_PERCENTS]
    assert checks.cpr_cmd(ones) == (pytest.approx(0.999), pytest.approx(0.0))


def test_curve_ends_at_full_model():
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model))
    scores = methods.get("eap").score(setup)
    points = checks.faithfulness_curve(setup, scores)
    assert points[-1].edges == model.graph.n_edges
    assert points[-1].faithfulness == pytest.approx(1.0)


def circuit_with_scores():
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model))
    scores = methods.get("eap").score(setup)
    mask = select.prune(model.graph, select.top_n(model.graph, scores, 20))
    return model, circuit_io.Circuit(model.graph, mask, scores, {"model": "random:gpt2-tiny", "method": "eap"})


def same(a, b):
    assert torch.equal(a.mask & a.graph.allowed, b.mask & b.graph.allowed)
    assert torch.allclose(a.scores * a.graph.allowed, b.scores * b.graph.allowed)


def test_own_json_round_trip(tmp_path):
    model, c = circuit_with_scores()
    circuit_io.save(c, tmp_path / "c.json")
    back = circuit_io.load(tmp_path / "c.json", model.graph)
    same(c, back)
    assert back.provenance["method"] == "eap"
    no_model = circuit_io.load(tmp_path / "c.json")
    assert torch.equal(no_model.mask, back.mask)



def test_circuit_load_refuses_binary_and_non_object_files_in_one_line(tmp_path):
    model, c = circuit_with_scores()
    formats.save_mib_pt(c, tmp_path / "c.pt")
    with pytest.raises(circuit_io.CircuitFileError, match=re.escape(f"{tmp_path / 'c.pt'}: binary content")):
        circuit_io.load(tmp_path / "c.pt")
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(circuit_io.CircuitFileError, match="a JSON list, not an object"):
        circuit_io.load(tmp_path / "a.json")
    data = circuit_io.to_dict(c)
    data["edges"][next(iter(data["edges"]))] = {"score": "high", "in_graph": True}
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(circuit_io.CircuitFileError, match="score: 'high' is not of type"):
        circuit_io.load(tmp_path / "b.json")


def test_mib_json_and_pt_layout_and_round_trip(tmp_path):
    model, c = circuit_with_scores()
    formats.save_mib_json(c, tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data) == {"cfg", "nodes", "edges"}
    assert data["cfg"]["n_layers"] == 2 and data["cfg"]["parallel_attn_mlp"] is False
    some = next(iter(data["edges"].values()))
    assert set(some) == {"score", "in_graph"}
    assert len(data["edges"]) == model.graph.n_edges
    same(c, formats.load_mib(tmp_path / "c.json", model.graph))
    formats.save_mib_pt(c, tmp_path / "c.pt")
    d = torch.load(tmp_path / "c.pt", weights_only=True)
    assert {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"} <= set(d)
    assert d["edges_scores"].shape == (model.graph.n_senders, model.graph.n_receivers)
    same(c, formats.load_mib(tmp_path / "c.pt", model.graph))



def test_mib_reader_tells_pt_from_json_by_content_not_name(tmp_path):
    model, c = circuit_with_scores()
    formats.save_mib_pt(c, tmp_path / "ex.mib-pt")
    same(c, formats.load_mib(tmp_path / "ex.mib-pt", model.graph))
    formats.save_mib_json(c, tmp_path / "json-named.pt")
    same(c, formats.load_mib(tmp_path / "json-named.pt", model.graph))


def _wrong_files(tmp_path, c):
    """One file per format, each given to every reader but its own."""
    files = {"mib": tmp_path / "c.mib.json", "mib-pt": tmp_path / "c.pt", "graphml": tmp_path / "c.graphml",
             "node-link": tmp_path / "c.nl.json", "circuits": tmp_path / "c.json",
             "text": tmp_path / "notes.txt", "array": tmp_path / "array.json", "other-pt": tmp_path / "other.pt"}
    formats.save_mib_json(c, files["mib"])
    formats.save_mib_pt(c, files["mib-pt"])
    formats.save_graphml(c, files["graphml"])
    formats.save_node_link(c, files["node-link"])
    circuit_io.save(c, files["circuits"])
    files["text"].write_text("hello\n")
    files["array"].write_text("[1, 2]")
    torch.save([1, 2], files["other-pt"])
    return files


@pytest.mark.parametrize("fmt,reader,own", [("mib", formats.load_mib, ("mib", "mib-pt")),
                                            ("graphml", formats.load_graphml, ("graphml",)),
                                            ("node-link", formats.load_node_link, ("node-link",))])
def test_readers_refuse_other_formats_naming_file_and_format(tmp_path, fmt, reader, own):
    model, c = circuit_with_scores()
    expected = {"mib": "an MIB circuit", "graphml": "GraphML", "node-link": "node-link"}[fmt]
    for kind, path in _wrong_files(tmp_path, c).items():
        if kind in own:
            continue
        with pytest.raises(circuit_io.CircuitFileError) as err:
            reader(path, model.graph)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, (kind, msg)
        assert expected in msg, (kind, msg)


@pytest.mark.parametrize("save,reader", [(formats.save_mib_json, formats.load_mib),
                                         (formats.save_mib_pt, formats.load_mib),
                                         (formats.save_graphml, formats.load_graphml),
                                         (formats.save_node_link, formats.load_node_link)])
def test_readers_refuse_a_circuit_of_another_model_naming_the_file(tmp_path, save, reader):
    _, c = circuit_with_scores()
    other = load_model("random:gpt2-small")
    path = tmp_path / "c.out"
    save(c, path)
    with pytest.raises(circuit_io.CircuitFileError, match=re.escape(f"{path}: ") + ".*n_layers=2"):
        reader(path, other.graph)


def test_mib_round_trips_grouped_query_models_with_per_head_names(tmp_path):
    """Under GQA a KV group's k/v edge is written once per query head (MIB's names) and read back
    as one edge: in the circuit when any head's copy is, with their mean score."""
    model = load_model("random:llama-tiny")
    g = model.graph
    assert g.arch.grouped
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) * g.allowed
    c = circuit_io.Circuit(g, select.top_n(g, scores, g.n_edges // 3), scores, {})
    per = g.arch.n_heads // g.arch.n_kv_heads
    data = formats.to_mib(c)
    kv_edges = sum(int(g.n_inputs[r]) for r, rec in enumerate(g.receivers) if rec.channel.value in "kv")
    assert len(data["edges"]) == g.n_edges + (per - 1) * kv_edges
    s, r = g.edge("input->a1.kv1<k>")
    for h in range(per, 2 * per):                  # the group's query heads share the edge
        assert data["edges"][f"input->a1.h{h}<k>"] == {"score": float(scores[s, r]), "in_graph": bool(c.mask[s, r])}
    assert not any(".kv" in name for name in data["edges"])
    formats.save_mib_json(c, tmp_path / "c.json")
    same(c, formats.load_mib(tmp_path / "c.json", g))
    formats.save_mib_pt(c, tmp_path / "c.pt")
    d = torch.load(tmp_path / "c.pt", weights_only=True)
    assert "a1.h3<v>" in d["dst_nodes"] and d["edges_scores"].shape == (g.n_senders, len(d["dst_nodes"]))
    same(c, formats.load_mib(tmp_path / "c.pt", g))
    # a file whose heads disagree: any head in the circuit puts the group in; scores averaged
    data["edges"]["input->a1.h2<k>"] = {"score": 1.0, "in_graph": True}
    data["edges"]["input->a1.h3<k>"] = {"score": 3.0, "in_graph": False}
    (tmp_path / "d.json").write_text(json.dumps(data))
    back = formats.load_mib(tmp_path / "d.json", g)
    assert bool(back.mask[s, r]) and float(back.scores[s, r]) == 2.0


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny"])
def test_graphml_node_link_networkx_round_trip(tmp_path, spec):
    model = load_model(spec)
    g = model.graph
    gen = torch.Generator().manual_seed(0)
    c = circuit_io.Circuit(g, torch.rand(g.n_senders, g.n_receivers, generator=gen) > 0.5,
                           torch.randn(g.n_senders, g.n_receivers, generator=gen), {"x": 1})
    assert isinstance(formats.to_networkx(c), nx.DiGraph)
    same(c, formats.from_networkx(formats.to_networkx(c), g))
    formats.save_graphml(c, tmp_path / "c.graphml")
    same(c, formats.load_graphml(tmp_path / "c.graphml", g))
    formats.save_node_link(c, tmp_path / "c.nl.json")
    same(c, formats.load_node_link(tmp_path / "c.nl.json", g))


def test_rendered_svg_of_the_default_circuit_draws_every_node_and_edge(tmp_path):
    """The embedded default's circuit, as `circuits discover` finds it, is really drawn."""
    from circuits import discover
    from circuits.tasks import builtin
    model = load_model("induction-2l")
    setup = evaluation.prepare(model, builtin.build_task("induction", model, n=32))
    c = discover.run(setup, "eap-ig-activations").circuit
    assert c.n_edges > 5
    out = render.render(render.to_dot(c, title="t"), tmp_path / "c.svg")
    svg = out.read_text()
    assert (tmp_path / "c.dot").is_file()
    drawn_nodes = set(re.findall(r'<g id="node_([^"]+)" class="node">', svg))
    assert {n.replace(".", "_") for n in c.node_names()} == drawn_nodes
    drawn_edges = set(re.findall(r'<g id="([^"]+)" class="edge">', svg))
    assert {render.edge_id(e) for e in c.edge_names()} == drawn_edges


def big_circuit():
    """A circuit of a real model's shape (smollm2-135m: 30 layers, 9 heads, 3 KV heads), 1,000+ edges."""
    g = circuit_io.graph_from_summary({"family": "llama", "n_layers": 30, "n_heads": 9, "n_kv_heads": 3,
                                       "has_mlp": True, "parallel": False})
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.allowed
    return circuit_io.Circuit(g, select.prune(g, select.top_n(g, scores, 3000)), scores, {})


def test_large_circuits_draw_components_and_the_strongest_connections():
    c = big_circuit()
    g = c.graph
    assert c.n_edges > 1000
    dot = render.to_dot(c, title="big")
    arrows = [line for line in dot.splitlines() if " -> " in line and "invis" not in line]
    assert len(arrows) == render.NODE_LEVEL_EDGES
    assert "connections between components" in dot and "diamond KV group" in dot      # the legend
    assert 'shape=diamond' in dot                                                      # KV groups are nodes
    assert re.search(r'label="L\d+"', dot)                                            # layer rows
    # the drawn arrows are the strongest pairs of components
    weight = {}
    for s, r in torch.nonzero(c.mask & g.allowed).tolist():
        rec = g.receivers[r]
        t = f"a{rec.layer}.kv{rec.index}" if rec.channel.value in "kv" else rec.node
        weight[(g.senders[s], t)] = weight.get((g.senders[s], t), 0.0) + abs(float(c.scores[s, r]))
    drawn = set(re.findall(r'^  "([^"]+)" -> "([^"]+)" \[id', dot, re.M))
    cutoff = sorted(weight.values(), reverse=True)[render.NODE_LEVEL_EDGES - 1]
    assert drawn == {k for k, v in weight.items() if v >= cutoff}
    few = render.to_dot(c, level="node", max_edges=5)
    assert len([x for x in few.splitlines() if " -> " in x and "invis" not in x]) == 5
    edges = render.to_dot(c, level="edge", max_edges=7)
    assert "7 strongest of" in edges


def test_renderer_is_found_next_to_this_python_off_the_path(tmp_path, monkeypatch):
    """A virtual environment that is not activated keeps its scripts next to sys.executable."""
    import sys
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    exe = bindir / "graphviz-pure"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    assert render.renderer() == [str(exe)]


def test_render_without_renderer_fails_clearly(tmp_path, monkeypatch):
    model, c = circuit_with_scores()
    monkeypatch.setattr(render, "renderer", lambda: None)
    with pytest.raises(render.RenderError, match="pip install graphviz-pure"):
        render.render(render.to_dot(c), tmp_path / "c.svg")
    assert (tmp_path / "c.dot").is_file()



def test_render_refuses_a_format_the_renderer_lacks_before_running_it(tmp_path, monkeypatch):
    """graphviz-pure (a dependency) has no PDF output: said up front, naming what it draws."""
    import shutil
    _, c = circuit_with_scores()
    monkeypatch.setattr(render, "renderer", lambda: [shutil.which("graphviz-pure")])
    with pytest.raises(render.RenderError) as err:
        render.render(render.to_dot(c), tmp_path / "c.pdf")
    msg = str(err.value)
    assert msg.startswith("graphviz-pure cannot draw .pdf (it draws .svg and .png)") and "\n" not in msg
    assert (tmp_path / "c.dot").is_file() and not (tmp_path / "c.pdf").exists()
    # refused before running: a renderer that would fail to start is never started
    monkeypatch.setattr(render, "renderer", lambda: [str(tmp_path / "no-such-dot")])
    monkeypatch.setattr(render, "renderer_formats", lambda cmd: frozenset({"svg"}))
    with pytest.raises(render.RenderError, match=r"no-such-dot cannot draw \.png \(it draws \.svg\)"):
        render.render(render.to_dot(c), tmp_path / "d.png")
    assert (tmp_path / "d.dot").is_file()


def test_compare_same_model_and_across_models():
    model, c = circuit_with_scores()
    other = circuit_io.Circuit(c.graph, select.top_n(c.graph, c.scores, 10), c.scores, {})
    r = compare.compare(c, other)
    assert r.comparable == "edges" and 0 < r.figures["edge_jaccard"] < 1
    big = load_model("random:llama-tiny")
    deep = circuit_io.Circuit(big.graph, big.graph.full_mask(), None, {})
    r2 = compare.compare(c, deep)
    assert r2.comparable == "relative-depth" and "no counterpart" in r2.figures["note"]
    assert "Jaccard" in compare.format_report(r) and "relative depth" in compare.format_report(r2)


def test_depth_profile_is_a_share_of_each_bin():
    """Across models, each bin shows the share (0..1) of the model's heads/MLPs the circuit uses;
    2 layers over 4 bins: bins 0-1 are layer 0, bins 2-3 layer 1."""
    _, c = circuit_with_scores()
    big = load_model("random:llama-tiny")
    full = circuit_io.Circuit(big.graph, big.graph.full_mask(), None, {})
    r = compare.compare(c, full)
    pa, pb = r.figures["depth_profile_a"], r.figures["depth_profile_b"]
    for share in pa["heads"] + pa["mlps"] + pb["heads"] + pb["mlps"]:
        assert 0.0 <= share <= 1.0
    assert pb == {"heads": [1.0] * 4, "mlps": [1.0] * 4}
    used = set(c.node_names())
    for b, layer in enumerate([0, 0, 1, 1]):
        assert pa["heads"][b] == pytest.approx(sum(f"a{layer}.h{h}" in used for h in range(4)) / 4)
        assert pa["mlps"][b] == float(f"m{layer}" in used)
    assert 0.0 <= r.figures["profile_distance"] <= 1.0
    for line in compare.format_report(r).splitlines()[2:6]:
        assert all(float(x) <= 1.0 for x in re.findall(r"\d+\.\d+", line.split(":", 1)[1]))
