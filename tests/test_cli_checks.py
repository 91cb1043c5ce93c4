"""The command line refuses what it would otherwise get silently wrong, in one line."""

import json
from pathlib import Path

import pytest

from circuits.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
IOI = str(ROOT / "tasks" / "examples" / "ioi-mini.jsonl")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--help" in err, err
    return err


@pytest.mark.parametrize("argv,says", [
    (["discover", "--top-n", "0"], "--top-n: must be at least 1"),
    (["discover", "--tau", "-1", "--method", "acdc"], "--tau: must be 0 or more"),
    (["discover", "--target-faithfulness", "1.5"], "must be in (0, 1]"),
    (["discover", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["discover", "--method", "nope"], "invalid choice"),
    (["discover", "--top-n", "5", "--greedy", "3"], "not allowed with"),
    (["verify", "c.json", "induction-2l", "induction", "--subsets", "-2"], "must be 0 or more"),
])
def test_bad_values_are_one_line_usage_errors(capsys, argv, says):
    assert says in _usage_error(capsys, argv)


@pytest.mark.parametrize("argv,says", [
    (["--method", "acdc", "--steps", "3"], "--steps does not apply to --method acdc"),
    (["--method", "eap", "--tau", "0.1", "--resume"], "--tau, --resume do not apply to --method eap"),
    (["--method", "eap", "--candidates", "5"], "--candidates does not apply"),
    (["--top-n", "5", "--target-faithfulness", "0.9"], "two ways to choose the size"),
    (["--method", "acdc", "--top-n", "5"], "decides its circuit with --tau"),
])
def test_options_the_method_would_ignore_are_refused(capsys, tmp_path, argv, says):
    assert says in _error(capsys, ["discover", "--out", str(tmp_path / "c.json"), *argv])


def test_typos_in_model_task_and_device_get_suggestions_fast(capsys):
    assert "did you mean induction-2l?" in _error(capsys, ["discover", "induction-3l"])
    assert "did you mean ioi?" in _error(capsys, ["discover", "induction-2l", "iio"])
    assert "no usable CUDA device" in _error(capsys, ["evaluate", "induction-2l", "induction", "--device", "cuda"])
    assert "device 'foo'" in _error(capsys, ["evaluate", "induction-2l", "induction", "--device", "foo"])


def test_acdc_checkpoint_is_never_silently_discarded(capsys, tmp_path):
    out = tmp_path / "c.json"
    assert "no checkpoint at" in _error(capsys, ["discover", "--method", "acdc", "--resume", "--out", str(out)])
    Path(str(out) + ".ckpt.pt").write_bytes(b"interrupted run")
    err = _error(capsys, ["discover", "--method", "acdc", "--out", str(out)])
    assert "add --resume to continue it" in err
    assert Path(str(out) + ".ckpt.pt").read_bytes() == b"interrupted run"


def test_a_task_the_model_does_not_perform_is_refused(capsys, tmp_path):
    """ioi-3l never saw years: clean and fully ablated runs score the same."""
    err = _error(capsys, ["discover", "ioi-3l", "greater-than", "--out", str(tmp_path / "c.json"), "--quiet"])
    assert "faithfulness is undefined" in err and "Does the model perform this task?" in err
    assert not (tmp_path / "c.json").exists()
    assert main(["evaluate", "ioi-3l", "greater-than"]) == 0
    assert "faithfulness   undefined" in capsys.readouterr().out


def test_verify_and_evaluate_use_the_circuits_own_ablation(capsys, tmp_path):
    out = str(tmp_path / "mean.json")
    assert main(["discover", "--ablation", "mean", "--out", out, "--quiet", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["ablation"] == "mean" and found["metric"] == "logit-diff"
    assert main(["evaluate", "induction-2l", "induction", "--circuit", out, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ablation"] == "mean"
    assert evaluated["faithfulness"] == pytest.approx(found["faithfulness"], abs=1e-6)
    assert main(["verify", out, "induction-2l", "induction", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ablation"] == "mean"
    assert main(["evaluate", "induction-2l", "induction", "--circuit", out, "--ablation", "resample", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ablation"] == "resample"


def test_discover_says_what_pruning_removed_and_reports_known_heads_in_json(capsys, tmp_path):
    out = str(tmp_path / "c.json")
    assert main(["discover", "random:gpt2-tiny", IOI, "--method", "eap", "--top-n", "10", "--out", out,
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    n = json.loads(Path(out).read_text())["n_edges_in_graph"]
    assert n < 10 and f"{10 - n} of 10 selected pruned off input→logits paths" in printed
    assert main(["discover", "--out", out, "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["known_heads"]) == {"previous_token_heads", "induction_heads"}


def test_multi_token_answers_report_whole_continuations(capsys, tmp_path):
    """One example with a 3-token answer: 3 rows, reported as 1 example; the metric shown is
    the log-probability of the whole continuation; `wrong` is not read under logprob."""
    from circuits.model import loader
    from circuits.tasks.files import load_file
    from circuits.tasks.task import Metric, metric_values
    model = loader.load("random:gpt2-tiny")
    answer = " Eiffel Tower"
    n_tokens = len(model.tokenizer.encode(answer))
    assert n_tokens > 1
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"clean": "The tower in Paris is the", "corrupted": "The tower in Tokyo is the",
                                "answer": answer, "wrong": " Tokyo Tower"}) + "\n")
    task = load_file(path, model.tokenizer, metric=Metric.LOGPROB)
    assert len(task) == n_tokens and task.meta["examples"] == 1
    assert main(["evaluate", "random:gpt2-tiny", str(path), "--metric", "logprob", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from circuits import patching
    logits = patching.run(model.weights, model.graph, task.clean, positions=task.positions).logits
    whole = metric_values(Metric.LOGPROB, logits, task).sum().item()
    assert report["examples"] == 1 and report["clean"] == pytest.approx(whole, rel=1e-5)
    assert main(["evaluate", "random:gpt2-tiny", str(path), "--metric", "logprob"]) == 0
    assert f"1 example ({n_tokens} answer-token rows)" in capsys.readouterr().out


def test_applying_a_circuit_to_another_model_is_said(capsys, tmp_path):
    out = str(tmp_path / "c.json")
    assert main(["discover", "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "random:gpt2-tiny", "induction", "--circuit", out, "--json"]) == 0
    assert "the circuit was found on induction-2l; applying it to random:gpt2-tiny" in capsys.readouterr().err


def test_discover_and_verify_never_write_over_their_inputs(capsys, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(Path(IOI).read_text())
    before = task.read_text()
    assert "is the input file" in _error(capsys, ["discover", "random:gpt2-tiny", str(task), "-o", str(task)])
    out = str(tmp_path / "c.json")
    assert main(["discover", "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    saved = Path(out).read_text()
    assert "is the input file" in _error(capsys, ["verify", out, "induction-2l", "induction", "--out", out])
    assert task.read_text() == before and Path(out).read_text() == saved


def test_faithfulness_has_one_definition_of_undefined():
    from circuits.evaluation import behaviour_gap, normalized_faithfulness
    assert behaviour_gap(2.0, 1.0) == 1.0 and behaviour_gap(1.0, 1.0 + 1e-9) is None
    assert normalized_faithfulness(1.5, 1.0, 2.0) == 0.5
    nan = normalized_faithfulness(5.0, 1.0, 1.0 + 1e-9)     # not a huge ratio over rounding noise
    assert nan != nan


def test_packaged_gguf_names_pass_the_model_check():
    """The preflight model check knows the packaged GGUF models (it once refused smollm2-135m)."""
    from circuits.cli.common import check_model_spec
    check_model_spec("smollm2-135m")
    with pytest.raises(ValueError, match="did you mean smollm2-135m"):
        check_model_spec("smolm2-135m")
