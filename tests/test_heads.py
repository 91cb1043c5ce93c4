"""Head roles on models whose roles are known: induction-2l (a0.h1 previous-token; a1.h3, a1.h1
induction) and ioi-3l (name movers and the S-suppression head in its meta.json)."""

import re

import torch
from conftest import load_model

from circuits.cli.main import main
from circuits.model import components as C
from circuits.tasks.builtin import build_task
from circuits.verify import roles


def test_attention_pattern_is_the_one_attend_uses():
    for spec in ("random:llama-tiny", "random:native-llama-tiny"):     # GQA; both rotary layouts
        m = load_model(spec)
        arch, lw, w = m.arch, m.weights.layers[0], m.weights
        x = torch.randn(2, 6, arch.d_model)
        q, k, v = (C.project(x, W, b) for W, b in ((lw.W_Q, lw.b_Q), (lw.W_K, lw.b_K), (lw.W_V, lw.b_V)))
        if w.rot_cos is not None:
            q, k = C.rotate(arch, q, w.rot_cos[:6], w.rot_sin[:6]), C.rotate(arch, k, w.rot_cos[:6], w.rot_sin[:6])
        pattern = C.attention_pattern(arch, q, k)                                   # [N, H, P, P]
        v_rep = v.repeat_interleave(arch.n_heads // arch.n_kv_heads, dim=2)
        z = torch.einsum("nhqk,nkhe->nqhe", pattern, v_rep)
        assert torch.allclose(z, C.attend(arch, q, k, v), atol=1e-5), spec


def test_induction_2l_roles():
    m = load_model("induction-2l")
    result = roles.measure(m)
    labels = result.labels
    for head in m.meta["previous_token_heads"]:              # a0.h1
        assert labels[head] == "previous-token"
    for head in m.meta["induction_heads"]:                   # a1.h3, a1.h1
        assert labels[head] == "induction"
        assert result.rows[head]["induction"] > 0.9
    # a0.h2 and a0.h3 attend to the previous token too but write (almost) nothing: no label
    assert labels["a0.h2"] is None and labels["a0.h3"] is None
    assert result.rows["a0.h2"]["previous_token"] > 0.4 and result.rows["a0.h2"]["active_ratio"] < 0.1


def test_ioi_3l_roles_match_its_meta():
    m = load_model("ioi-3l")
    result = roles.measure(m, build_task("ioi", m, n=32))
    movers = set(m.meta["mechanism"]["roles"]["name_mover_heads"])
    suppression = set(m.meta["mechanism"]["roles"]["s_suppression_heads"])
    assert set(result.heads_with("mover")) == movers
    assert set(result.heads_with("suppressor")) == suppression
    assert result.heads_with("negative-mover") == []
    (s_head,) = suppression
    assert result.rows[s_head]["end_top"] == "wrong" and result.rows[s_head]["end_to_wrong"] > 0.9
    assert result.rows[s_head]["direct_metric"] > 0.5 * result.facts["clean_logit_diff"]


def test_heads_cli(capsys):
    assert main(["heads", "induction-2l"]) == 0
    out = capsys.readouterr().out
    assert "induction" in out and "a1.h1" in out and "previous-token" in out and len(out.splitlines()) <= 10
    assert main(["heads", "ioi-3l", "ioi", "--n", "16", "--top", "3", "--ablate", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "suppressor" in out and "a2.h2" in out and "ablated:" in out and len(out.splitlines()) <= 12


def test_compare_aligns_circuits_by_head_role():
    from circuits.circuit import Circuit
    from circuits.io import compare
    a_model, b_model = load_model("ioi-3l"), load_model("induction-2l")
    a = Circuit(a_model.graph, a_model.graph.mask_from_edges(["a1.h0->logits", "a2.h2->logits", "input->a1.h0<v>",
                                                               "input->a2.h2<v>"]), None, {})
    b = Circuit(b_model.graph, b_model.graph.mask_from_edges(["a0.h1->a1.h3<k>", "a1.h3->logits"]), None, {})
    labels_a = {"a1.h0": "mover", "a2.h2": "suppressor"}
    labels_b = roles.label_heads(b_model)
    report = compare.compare(a, b, "ioi", "ind", labels_a, labels_b)
    r = report.figures["roles"]
    assert r["mover"]["a"] == {"heads": ["a1.h0"], "count": 1, "mean_depth": 0.5} and r["mover"]["b"] is None
    assert r["induction"]["b"]["heads"] == ["a1.h3"] and r["induction"]["b"]["mean_depth"] == 0.75
    assert r["previous-token"]["b"]["heads"] == ["a0.h1"]
    text = compare.format_report(report)
    assert "head roles" in text and "suppressor" in text


def test_discover_labels_heads_with_roles_in_summary_file_and_diagram(tmp_path, capsys):
    """`discover --roles`: the summary names each head's role, the circuit file keeps them and the
    diagram labels the heads (induction-2l: a0.h1 previous-token, a1.h3/a1.h1 induction)."""
    import json

    from circuits import circuit as circuit_io
    from circuits.io import render
    out = tmp_path / "c.json"
    assert main(["discover", "induction-2l", "induction", "--method", "eap", "--top-n", "30",
                 "--roles", "--quiet", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a0.h1 (previous-token)" in text and "a1.h3 (induction)" in text
    circ = circuit_io.load(out)
    assert circ.provenance["head_roles"]["a1.h1"] == "induction"
    assert 'label="a1.h3\\ninduction"' in render.to_dot(circ)
    assert main(["discover", "induction-2l", "induction", "--method", "eap", "--top-n", "30", "--roles",
                 "--quiet", "--json", "-o", str(tmp_path / "d.json")]) == 0
    assert json.loads(capsys.readouterr().out)["head_roles"]["a0.h1"] == "previous-token"


def test_verify_labels_heads_with_roles(tmp_path, capsys):
    """`verify` names each head's role: from the circuit file (discover --roles), or measured with
    --roles; the report keeps them and the text groups the circuit's heads by role."""
    import json
    plain = tmp_path / "plain.json"
    assert main(["discover", "induction-2l", "induction", "--method", "eap", "--top-n", "30", "--quiet",
                 "-o", str(plain)]) == 0
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["verify", str(plain), "induction-2l", "induction", "--roles", "--subsets", "2",
                 "--minimality-sample", "4", "--quiet", "--out", str(report)]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith("heads by role"))
    induction = re.search(r"induction \d+ \(([^)]*)\)", line).group(1).split(", ")
    assert {"a1.h1", "a1.h3"} <= set(induction) and "previous-token 1 (a0.h1)" in line
    assert json.loads(report.read_text())["head_roles"]["a1.h3"] == "induction"
    assert main(["verify", str(plain), "induction-2l", "induction", "--subsets", "2", "--minimality-sample",
                 "4", "--quiet"]) == 0
    assert "heads by role" not in capsys.readouterr().out          # no roles asked, none in the file
