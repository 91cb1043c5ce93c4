import json
from pathlib import Path

import pytest

from circuits.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
IOI = str(ROOT / "tasks" / "examples" / "ioi-mini.jsonl")


@pytest.mark.parametrize("circuit,expected", [("full", 1.0), ("empty", 0.0)])
def test_evaluate_gpt2_small_full_and_empty(capsys, circuit, expected):
    assert main(["evaluate", "random:gpt2-small", IOI, "--circuit", circuit, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faithfulness"] == pytest.approx(expected, abs=1e-5)
    assert report["total_edges"] == 32491


def test_evaluate_other_ablations_tiny(capsys):
    for ablation in ("mean", "zero", "mean-pos"):
        assert main(["evaluate", "random:gpt2-tiny", IOI, "--ablation", ablation, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["faithfulness"] == pytest.approx(1.0)


def test_errors_are_messages_not_tracebacks(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b", "corrupted": "a c", "answer": " x", "wrong": " y", "extra": 1}\n')
    assert main(["evaluate", "random:gpt2-tiny", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown field(s) extra" in err and "Traceback" not in err
    assert main(["graph", "random:nonsense"]) == 2
    assert "unknown random architecture" in capsys.readouterr().err


def test_hub_id_offline_fails_clearly(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["graph", "hf:no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "Offline?" in err and "save_pretrained" in err


def test_local_checkpoint_directory(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)).save_pretrained(tmp_path)
    assert main(["graph", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edges"]["total"] == 6 * 1 + 3 + 4
    assert main(["graph", str(tmp_path)]) == 0
    assert ", 1 layer, 2 heads, d_model 16" in capsys.readouterr().out


def test_discover_verify_render_export_compare_cli(tmp_path, capsys):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert main(["discover", "random:gpt2-tiny", IOI, "--method", "eap", "--top-n", "15", "--out", a, "--quiet"]) == 0
    assert main(["discover", "random:gpt2-tiny", IOI, "--method", "acdc", "--tau", "1e-5", "--out", b,
                 "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["verify", a, "random:gpt2-tiny", IOI, "--json", "--subsets", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"faithfulness", "curve", "completeness", "minimality", "ablation_sensitivity"} <= set(report)
    assert main(["verify", a, "random:gpt2-tiny", IOI, "--min-faithfulness", "1e9", "--subsets", "2"]) == 1
    minimality = next(ln for ln in capsys.readouterr().out.splitlines() if "minimality" in ln)
    assert "none" not in minimality
    assert "every component needed" in minimality or "not needed: " in minimality
    assert main(["render", a, "-o", str(tmp_path / "a.svg")]) == 0
    assert (tmp_path / "a.svg").is_file() and (tmp_path / "a.dot").is_file()
    for fmt, name in (("mib-pt", "a.pt"), ("mib-json", "a.mib.json"), ("graphml", "a.graphml"), ("node-link", "a.nl.json")):
        assert main(["export", a, "--format", fmt, "-o", str(tmp_path / name)]) == 0
    assert main(["import", str(tmp_path / "a.pt"), "--format", "mib", "--model", "random:gpt2-tiny",
                 "-o", str(tmp_path / "back.json")]) == 0
    capsys.readouterr()
    assert main(["compare", a, b, "-o", str(tmp_path / "diff.svg")]) == 0
    out = capsys.readouterr().out
    assert "edge Jaccard" in out and (tmp_path / "diff.svg").is_file()
    assert main(["compare", a]) == 2


def test_compare_across_models_cli(tmp_path, capsys):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert main(["discover", "induction-2l", "induction", "--method", "eap", "--out", a, "--quiet", "--n", "16"]) == 0
    assert main(["discover", "random:llama-tiny", "induction", "--method", "eap", "--top-n", "20", "--out", b,
                 "--quiet", "--n", "8"]) == 0
    capsys.readouterr()
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "aligned by relative depth" in out and "no counterpart" in out


def test_metric_choices_match_the_metrics():
    """The CLI lists metric names literally (it imports torch lazily); keep them in step."""
    from circuits.cli.main import parser
    from circuits.tasks.task import Metric
    sub = next(a for a in parser()._actions if a.dest == "command")
    for command, dest in (("evaluate", "metric"), ("discover", "metric"), ("discover", "acdc_metric")):
        action = next(a for a in sub.choices[command]._actions if a.dest == dest)
        assert set(action.choices) == {m.value for m in Metric}, (command, dest)


def test_counterfactual_option_is_refused_for_builtin_tasks():
    assert main(["evaluate", "induction-2l", "induction", "--counterfactual", "abc_counterfactual"]) == 2


def _induction_circuit_files(tmp_path):
    from circuits import circuit as circuit_io
    from circuits.io import formats
    from circuits.model import loader
    g = loader.load("induction-2l").graph
    c = circuit_io.Circuit(g, g.full_mask(), None, {"model": "induction-2l"})
    circuit_io.save(c, tmp_path / "cc.json")
    formats.save_mib_json(c, tmp_path / "mib.json")
    formats.save_mib_pt(c, tmp_path / "ex.mib-pt")
    return tmp_path / "cc.json", tmp_path / "mib.json", tmp_path / "ex.mib-pt"


def test_import_wrong_format_is_one_line_and_mib_pt_is_read_by_content(tmp_path, capsys):
    _, mib_json, mib_pt = _induction_circuit_files(tmp_path)
    out = str(tmp_path / "x.json")
    assert main(["import", str(mib_json), "--format", "graphml", "--model", "induction-2l", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{mib_json}: not GraphML" in err and "expected a GraphML circuit" in err
    assert main(["import", str(mib_pt), "--format", "node-link", "--model", "induction-2l", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mib_pt}: binary content" in err and "node-link" in err
    assert main(["import", str(mib_pt), "--format", "mib", "--model", "induction-2l", "-o", out]) == 0
    assert "110 edges" in capsys.readouterr().out


def test_outputs_that_are_an_input_file_are_refused(tmp_path, capsys, monkeypatch):
    cc, mib_json, _ = _induction_circuit_files(tmp_path)
    before = {p: p.read_bytes() for p in (cc, mib_json)}
    monkeypatch.chdir(tmp_path)
    runs = [["export", str(cc), "--format", "graphml", "-o", str(cc)],
            ["export", "cc.json", "--format", "mib-json", "-o", "./cc.json"],        # another spelling
            ["import", str(mib_json), "--format", "mib", "--model", "induction-2l", "-o", str(mib_json)],
            ["render", str(cc), "-o", str(cc)],
            ["compare", str(cc), str(mib_json), "-o", str(mib_json)]]
    for argv in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refusing to write" in err and "is the input file" in err and err.count("\n") == 1, argv
    # render also writes the DOT file next to -o: an input there is refused too
    dot_named = tmp_path / "c.dot"
    dot_named.write_bytes(cc.read_bytes())
    assert main(["render", str(dot_named), "-o", str(tmp_path / "c.svg")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (cc, mib_json)} == before
    assert dot_named.read_bytes() == cc.read_bytes() and not (tmp_path / "c.svg").exists()


def test_counts_are_pluralized(tmp_path, capsys):
    from circuits.cli.common import plural
    assert (plural(1, "example"), plural(2, "head"), plural(0, "edge")) == ("1 example", "2 heads", "0 edges")
    one = tmp_path / "one.jsonl"
    one.write_text(Path(IOI).read_text().splitlines()[0] + "\n")
    assert main(["evaluate", "random:gpt2-tiny", str(one)]) == 0
    assert "one: 1 example, metric" in capsys.readouterr().out


def test_verify_minimality_line_says_every_component_needed():
    from circuits.cli.tools import _minimality_line
    mini = {"drop": {"a0.h1": 0.5, "m0": 0.2}, "threshold": 0.01, "not_needed": []}
    assert _minimality_line(mini).startswith("every component needed")
    assert _minimality_line(dict(mini, not_needed=["m0"])).startswith("not needed: m0 ")
    assert _minimality_line({"drop": {}, "threshold": 0.01, "not_needed": []}) == "no components to remove"


def test_tasks_listing_aligns_every_description(capsys):
    from circuits.tasks.builtin import TASKS
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    width = max(len(name) for name in TASKS)
    rows = [ln for ln in lines if ln.split(" ", 1)[0] in TASKS]
    assert len(rows) == len(TASKS) and "capital-country" in TASKS
    for ln in rows + [ln for ln in lines if ln.lstrip().startswith("e.g.")]:
        assert ln[width:width + 2] == "  " and ln[width + 2] != " ", ln


def test_dtype_flag_loads_in_that_precision_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["discover", "random:llama-tiny", "ioi", "--method", "eap", "--dtype", "bfloat16",
                 "--quiet", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["provenance"]["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["discover", "random:llama-tiny", "ioi", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
