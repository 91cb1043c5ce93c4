"""`--positions` and `--neurons` on the command line; position-aware rendering and comparison."""

import json

import pytest
import torch

from circuits.cli.main import main


def _task_file(tmp_path, labelled=True, unequal=False, drop_label_row=None):
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        n = 7 + (i % 2 if unequal or labelled else 0)
        clean = torch.randint(1, 900, (n,), generator=g).tolist()
        corrupted = [t + 1 for t in clean[:3]] + clean[3:]
        row = {"clean": clean, "corrupted": corrupted, "answer": int(torch.randint(1, 900, (1,), generator=g)),
               "wrong": int(torch.randint(1, 900, (1,), generator=g))}
        if labelled and i != drop_label_row:
            row["positions"] = {"X": 2, "END": n - 1}
        rows.append(row)
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_graph_gpt2_small_at_16_positions(capsys):
    assert main(["graph", "random:gpt2-small", "--positions", "16", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["edges"]["total"] == 519_856 and counts["edges"]["per_position"] == 32_491


def test_discover_evaluate_verify_render_compare_at_position_grain(capsys, tmp_path):
    task = _task_file(tmp_path)
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert main(["discover", "random:gpt2-tiny", task, "--positions", "--method", "eap", "--top-n", "12",
                 "-o", a, "--json", "--quiet"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["positions"] == ["X", "END"] and found["total_edges"] == 2 * 110
    assert sum(found["edges_by_position"].values()) == found["edges"]
    assert main(["discover", "random:gpt2-tiny", task, "--positions", "--method", "eap-ig-inputs", "--top-n", "20",
                 "-o", b, "--quiet"]) == 0
    assert "edges by position:" in capsys.readouterr().out
    with open(a) as f:
        saved = json.load(f)
    assert saved["positions"] == ["X", "END"] and all("@" in e for e in saved["edges"])
    assert main(["evaluate", "random:gpt2-tiny", task, "--circuit", "full", "--positions", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faithfulness"] == pytest.approx(1.0, abs=1e-5) and report["total_edges"] == 220
    assert main(["evaluate", "random:gpt2-tiny", task, "--circuit", a, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == ["X", "END"]
    assert main(["verify", a, "random:gpt2-tiny", task, "--subsets", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_edges"] == 220
    assert main(["render", a, "-o", str(tmp_path / "a.dot")]) == 0
    capsys.readouterr()
    dot = (tmp_path / "a.dot").read_text()
    assert 'subgraph "cluster_' in dot and "@END" in dot
    assert main(["compare", a, b, "--json"]) == 0
    pos = json.loads(capsys.readouterr().out)[0]["positions"]
    assert set(pos["shared"]) | set(pos["only_a"]) | set(pos["only_b"]) <= {"X", "END"}
    assert main(["compare", a, b]) == 0
    assert "positions shared:" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, args, message", [
    ({"drop_label_row": 3}, [], "line 4: no position labels"),
    ({"labelled": False, "unequal": True}, ["--positions"], "no position labels: give every row"),
])
def test_bad_positions_are_one_line_errors(capsys, tmp_path, kwargs, args, message):
    task = _task_file(tmp_path, **kwargs)
    assert main(["discover", "random:gpt2-tiny", task, "--method", "eap", "--top-n", "5", "--quiet",
                 "-o", str(tmp_path / "c.json"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_discover_neurons_and_export_to_mib(capsys, tmp_path):
    task = _task_file(tmp_path, labelled=False)
    out = str(tmp_path / "n.json")
    assert main(["discover", "random:gpt2-tiny", task, "--neurons", "--method", "eap", "--top-n", "30",
                 "-o", out, "--quiet"]) == 0
    assert "neurons: 30 of" in capsys.readouterr().out
    assert main(["export", out, "--format", "mib-pt", "-o", str(tmp_path / "n.pt")]) == 0
    assert int(torch.load(tmp_path / "n.pt", weights_only=True)["neurons_in_graph"].sum()) == 30
    capsys.readouterr()
    assert main(["evaluate", "random:gpt2-tiny", task, "--circuit", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["neurons"] == 30
    assert main(["discover", "random:gpt2-tiny", task, "--neurons", "--positions", "-o", out]) == 2
    assert "neuron masks are per sender" in capsys.readouterr().err


def test_export_to_mib_sums_positions_when_asked(capsys, tmp_path):
    task = _task_file(tmp_path)
    a, m = str(tmp_path / "a.json"), str(tmp_path / "m.json")
    assert main(["discover", "random:gpt2-tiny", task, "--positions", "--method", "eap", "--top-n", "12",
                 "-o", a, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", a, "--format", "mib-json", "-o", m]) == 2
    err = capsys.readouterr().err
    assert "--sum-positions" in err and err.count("\n") == 1
    assert main(["export", a, "--format", "mib-json", "--sum-positions", "-o", m]) == 0
    with open(a) as f:
        saved = json.load(f)
    plain = {e.split("->")[0].split("@")[0] + "->" + e.split("->")[1].split("@")[0]
             for e, v in saved["edges"].items() if v["in_graph"]}
    with open(m) as f:
        mib = json.load(f)
    kept = {name for name, e in mib["edges"].items() if e["in_graph"]}
    assert len(kept) == len(plain) > 0
    name = sorted(kept)[0]
    at = [v["score"] for e, v in saved["edges"].items()
          if e.split("->")[0].split("@")[0] + "->" + e.split("->")[1].split("@")[0] == name]
    assert len(at) == 2 and mib["edges"][name]["score"] == pytest.approx(sum(at), rel=1e-5, abs=1e-7)
    capsys.readouterr()
    assert main(["export", m.replace("m.json", "a.json"), "--format", "json", "--sum-positions",
                 "-o", str(tmp_path / "plain.json")]) == 0
    with open(tmp_path / "plain.json") as f:
        flat = json.load(f)
    assert flat.get("positions") is None and flat["provenance"]["summed_over_positions"] == ["X", "END"]
    assert main(["export", str(tmp_path / "plain.json"), "--format", "json", "--sum-positions",
                 "-o", str(tmp_path / "again.json")]) == 2
    assert "not position-aware" in capsys.readouterr().err
