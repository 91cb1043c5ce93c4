"""The viewer's page data and command, without a browser (tests/test_view_browser.py drives one)."""

import json
import os
import re

import pytest
import torch

from circuits import select
from circuits.cli.main import main
from circuits.circuit import Circuit
from circuits.graph import node_scores
from circuits.io import view
from tests.viewer_circuits import GPT2_SMALL, INDUCTION_2L, LLAMA_GQA, save, synthetic


def named(c, name="c.json"):
    return view.Named(name, c)


def test_edges_are_ranked_as_top_n_ranks_them():
    c = synthetic(GPT2_SMALL, 3000)
    data = view.circuit_data(named(c))
    g = c.graph
    e = data["edges"]
    assert len(e["s"]) == g.n_edges == 32491
    for n in (1, 17, 500, 3000, 20000):
        expected = select.top_n(g, c.scores, n)
        got = torch.zeros_like(expected)
        got[e["s"][:n], e["r"][:n]] = True
        assert torch.equal(got, expected), n
    assert sum(e["in"]) == c.n_edges
    assert data["n_nodes"] == len(c.node_names())
    assert data["node_scores"] == pytest.approx(node_scores(g, c.scores).tolist(), rel=1e-4, abs=1e-6)


def position_circuit(n_edges=40, seed=0, names=("A", "B", "END")):
    """A synthetic position-aware circuit on induction-2l's shape: [P, S, R] scores and mask."""
    from circuits.circuit import graph_from_summary
    g = graph_from_summary(INDUCTION_2L)
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(len(names), g.n_senders, g.n_receivers, generator=gen) ** 3) * g.allowed
    mask = select.prune(g, select.top_n(g, scores, n_edges))
    return Circuit(g, mask, scores.float(), {"model": "induction-2l"}, positions=names)


def test_position_edges_are_ranked_as_top_n_ranks_them():
    from circuits import positions
    c = position_circuit()
    g, P = c.graph, len(c.positions)
    data = view.page_data([named(c)])
    e = data["circuits"][0]["edges"]
    assert len(e["s"]) == len(e["p"]) == P * g.n_edges == data["circuits"][0]["total_edges"]
    for n in (1, 9, 40, 200, P * g.n_edges):
        expected = select.top_n(g, c.scores, n)
        got = torch.zeros_like(expected)
        got[e["p"][:n], e["s"][:n], e["r"][:n]] = True
        assert torch.equal(got, expected), n
    assert sum(e["in"]) == c.n_edges
    assert data["layouts"][0]["positions"] == list(c.positions)
    assert data["circuits"][0]["n_nodes"] == int(positions.node_mask_by_position(g, c.mask).sum())
    for got_p, sp in zip(data["circuits"][0]["node_scores"], c.scores):      # per position
        assert got_p == pytest.approx(node_scores(g, sp).tolist(), rel=1e-4, abs=1e-6)
    # circuits at different position grains are not overlaid
    other = position_circuit(names=("A", "END"))
    with pytest.raises(view.ViewError, match="different position grains"):
        view.page_data([named(c, "a.json"), named(other, "b.json")])


def test_roles_from_the_circuit_file_then_from_a_builtin_model():
    g_circuit = synthetic(INDUCTION_2L, 20, model="induction-2l")
    roles, source = view.roles_of(g_circuit.provenance, g_circuit.graph)
    assert roles["a0.h1"]["role"] == "previous-token" and roles["a1.h3"]["role"] == "induction"
    assert "meta.json" in source
    prov = {"model": "induction-2l", "roles": {"a1.h2": {"role": "name mover", "attends": "IO"}, "a9.h9": "bogus"}}
    roles, source = view.roles_of(prov, g_circuit.graph)
    assert roles == {"a1.h2": {"role": "name mover", "attends": "IO"}} and source == "circuit file (roles)"
    assert view.roles_of({"model": "random:gpt2-small"}, g_circuit.graph) == ({}, None)
    nodes, _ = view._layout(g_circuit.graph, roles)
    assert next(n for n in nodes if n["id"] == "a1.h2")["attends"] == "IO"


def test_curve_from_provenance_or_a_verify_report():
    points = [{"percent": 1, "edges": 324, "faithfulness": 0.5}, {"percent": 0.1, "edges": 32, "faithfulness": float("nan")},
              {"edges": 3249, "faithfulness": 0.9}]
    assert view.curve_of({"curve": {"points": points}}) == [{"edges": 324, "faithfulness": 0.5, "percent": 1},
                                                             {"edges": 3249, "faithfulness": 0.9}]
    assert view.curve_of({}, {"curve": {"points": points[:1]}})[0]["edges"] == 324
    assert view.curve_of({"faithfulness_curve": "nonsense"}) is None


def test_gqa_kv_inputs_are_drawn_once_under_their_group():
    c = synthetic(LLAMA_GQA, 200, model="random:llama-gqa")
    data = view.page_data([named(c)])
    recs = data["layouts"][0]["receivers"]
    kv = [r for r in recs if r["channel"] == "k"]
    assert all(len(r["targets"]) == 3 and "kv_group" in r for r in kv)
    heads = {n["id"]: n for n in data["layouts"][0]["nodes"]}
    assert heads["a2.h4"]["kv_group"] == {"group": 1, "heads": ["h3", "h4", "h5"]}


def test_page_is_self_contained(tmp_path):
    c = synthetic(GPT2_SMALL, 500)
    page = view.view([named(c)], tmp_path / "c.html")
    assert (tmp_path / "c.html").read_text(encoding="utf-8") == page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)\s*=", page, re.I)     # nothing fetched
    assert "sigma" in page and "graphology" in page
    payload = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(payload)
    assert data["schema"] == "circuits.view" and data["circuits"][0]["n_edges"] == c.n_edges


def test_notebook_view_is_an_iframe():
    c = synthetic(INDUCTION_2L, 20, model="induction-2l")
    out = view.Viewer(c)._repr_html_()
    assert out.startswith("<iframe srcdoc=") and "&lt;script" in out and "<script" not in out


def test_view_command_writes_the_page(tmp_path, capsys):
    a = save(synthetic(INDUCTION_2L, 20, model="induction-2l"), tmp_path / "a.json")
    b = save(synthetic(INDUCTION_2L, 25, seed=1, model="induction-2l"), tmp_path / "b.json")
    assert main(["view", str(a), str(b), "-o", str(tmp_path / "o.html")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "overlay" in out
    assert (tmp_path / "o.html").stat().st_size > 100_000
    # a `verify --out` report gives the page its faithfulness curve
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"curve": {"points": [{"percent": 10, "edges": 11, "faithfulness": 0.4}]}}))
    assert main(["view", str(a), "--report", str(report), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="circuit-data">(.*?)</script>', page, re.S).group(1))
    assert data["circuits"][0]["curve"] == [{"edges": 11, "faithfulness": 0.4, "percent": 10}]
    assert "no faithfulness curve" in _error(capsys, ["view", str(a), "--report", str(a), "-o", str(tmp_path / "s.html")])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuits: error: ") and "\n" not in err, err
    return err


def test_bad_input_one_line_errors(tmp_path, capsys):
    good = save(synthetic(INDUCTION_2L, 20, model="induction-2l"), tmp_path / "good.json")
    other = save(synthetic(GPT2_SMALL, 50), tmp_path / "other.json")
    same_shape = save(synthetic(INDUCTION_2L, 20, model="random:gpt2-tiny-ish"), tmp_path / "same_shape.json")
    not_circuit = tmp_path / "task.json"
    not_circuit.write_text(json.dumps({"clean": "a", "corrupted": "b"}))
    assert "not a circuits file" in _error(capsys, ["view", str(not_circuit), "-o", str(tmp_path / "x.html")])
    err = _error(capsys, ["view", str(good), str(other), "-o", str(tmp_path / "x.html")])
    assert "different model" in err and "--align" in err
    err = _error(capsys, ["view", str(good), str(same_shape), "-o", str(tmp_path / "x.html")])
    assert "induction-2l" in err and "--align" in err
    assert "does not exist" in _error(capsys, ["view", str(good), "-o", str(tmp_path / "no" / "such" / "x.html")])
    assert "is a directory" in _error(capsys, ["view", str(good), "-o", str(tmp_path)])
    assert "is a file, not a folder" in _error(capsys, ["view", str(good), "-o", str(good / "x.html")])
    if os.geteuid() != 0:                      # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "no permission" in _error(capsys, ["view", str(good), "-o", str(locked / "x.html")])
    assert "it is the input file" in _error(capsys, ["view", str(good), "-o", str(good)])
    assert not (tmp_path / "x.html").exists()
    # with --align: same shape overlays by name, different shapes side by side
    assert main(["view", str(good), str(same_shape), "--align", "-o", str(tmp_path / "x.html")]) == 0
    assert main(["view", str(good), str(other), "--align", "-o", str(tmp_path / "y.html")]) == 0
    assert "side-by-side" in capsys.readouterr().out


def test_unscored_circuit_is_shown_as_saved():
    c = synthetic(INDUCTION_2L, 20, model="induction-2l")
    bare = Circuit(c.graph, c.mask, None, c.provenance)
    data = view.circuit_data(named(bare))
    assert not data["has_scores"] and len(data["edges"]["s"]) == bare.n_edges and data["node_scores"] is None
