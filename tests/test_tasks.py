import json

import pytest
import torch
from conftest import load_model

from circuits import evaluation
from circuits.model.loader import gpt2_tokenizer
from circuits.tasks.files import load_file
from circuits.tasks.task import Metric, TaskError, from_pairs, metric_values

TOK = gpt2_tokenizer()


def write(tmp_path, rows, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


GOOD = {"clean": "When Mary and John went out, John gave it to", "corrupted":
        "When Mary and John went out, Paul gave it to", "answer": " Mary", "wrong": " John"}


def test_good_file_loads_with_bos_and_positions(tmp_path):
    task = load_file(write(tmp_path, [GOOD, GOOD]), TOK)
    assert task.clean[0, 0] == TOK.bos_token_id
    assert task.positions.tolist() == [task.clean.shape[1] - 1] * 2
    assert task.answers.tolist() == [[TOK.encode(" Mary")[0]]] * 2


def test_csv_with_answer_lists(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('clean,corrupted,answer,wrong\n'
                 f'"{GOOD["clean"]}","{GOOD["corrupted"]}","["" Mary"", "" Anna""]"," John"\n')
    task = load_file(p, TOK)
    assert task.answers.shape == (1, 2)


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n")
    with pytest.raises(TaskError, match="empty"):
        load_file(p, TOK)


def test_lengths_differ_names_line(tmp_path):
    bad = dict(GOOD, corrupted="When Mary and John went out, Paul Smith gave it to")
    with pytest.raises(TaskError, match=r"line 2: clean has \d+ tokens but corrupted has \d+"):
        load_file(write(tmp_path, [GOOD, bad]), TOK)



def test_every_task_file_error_names_the_file_as_given(tmp_path, monkeypatch):
    """Validation after tokenizing once said 'mismatch, line 3' (the stem), parsing 'x.jsonl, line 2'."""
    monkeypatch.chdir(tmp_path)
    bad = dict(GOOD, corrupted="When Mary and John went out, Paul Smith gave it to")
    write(tmp_path, [GOOD, GOOD, bad], "mismatch.jsonl")
    with pytest.raises(TaskError, match=r"^mismatch\.jsonl, line 3: clean has"):
        load_file("mismatch.jsonl", TOK)
    (tmp_path / "badjson.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"^badjson\.jsonl, line 2: not valid JSON"):
        load_file("badjson.jsonl", TOK)
    same = dict(GOOD, corrupted=GOOD["clean"])
    write(tmp_path, [same], "same.jsonl")
    with pytest.raises(TaskError, match=r"^same\.jsonl: clean and corrupted prompts are identical"):
        load_file("same.jsonl", TOK)


def test_multi_token_answer_names_line(tmp_path):
    bad = dict(GOOD, answer=" Maryanne-Louise")
    with pytest.raises(TaskError, match="line 1: answer ' Maryanne-Louise' is [0-9]+ tokens"):
        load_file(write(tmp_path, [bad]), TOK)


def test_unknown_fields_named(tmp_path):
    with pytest.raises(TaskError, match="line 1: unknown field.*colour"):
        load_file(write(tmp_path, [dict(GOOD, colour="red")]), TOK)


def test_missing_field(tmp_path):
    row = dict(GOOD)
    del row["wrong"]
    with pytest.raises(TaskError, match="line 1: missing field.*wrong"):
        load_file(write(tmp_path, [row]), TOK)


def test_clean_identical_to_corrupted_everywhere(tmp_path):
    same = dict(GOOD, corrupted=GOOD["clean"])
    with pytest.raises(TaskError, match="identical on every line"):
        load_file(write(tmp_path, [same, same]), TOK)


def test_invalid_json_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(TaskError, match="line 2: not valid JSON"):
        load_file(p, TOK)


def test_nan_metric_is_refused():
    model = load_model("random:gpt2-tiny")
    task = from_pairs("t", [[1, 2, 3]], [[1, 2, 4]], [[5]], [[6]])
    # A NaN in the weights' output row of the answer token makes the metric NaN.
    import copy
    w = copy.copy(model.weights)
    w.W_U = model.weights.W_U.clone()
    w.W_U[:, 5] = float("nan")
    broken = type(model)(model.spec, w, model.graph, model.tokenizer, None, {})
    with pytest.raises(TaskError, match="not finite on the clean run for row"):
        evaluation.prepare(broken, task)


def test_metrics_on_known_logits():
    task = from_pairs("t", [[1, 2]], [[1, 3]], [[0]], [[1]])
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    assert metric_values(Metric.LOGIT_DIFF, logits, task).item() == pytest.approx(2.0)
    p = torch.softmax(logits, -1)[0]
    assert metric_values(Metric.PROB_DIFF, logits, task).item() == pytest.approx((p[0] - p[1]).item())
    assert metric_values(Metric.LOGPROB, logits, task).item() == pytest.approx(p[0].log().item())
    assert metric_values(Metric.KL, logits, task, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_multi_token_answer_scored_as_continuation_logprob(tmp_path):
    """One row per answer token; the rows' log-probs sum to the continuation's log-probability."""
    from circuits import evaluation, patching
    model = load_model("random:gpt2-tiny")
    tok = model.tokenizer
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"clean": "The tower in Paris is the", "corrupted": "The tower in Tokyo is the",
                                "answer": " Eiffel Tower"}) + "\n")
    task = load_file(path, tok, metric=Metric.LOGPROB)
    cont = tok.encode(" Eiffel Tower")
    assert len(cont) > 1 and len(task) == len(cont)
    assert task.meta["multi_token_answers"] == 1 and task.meta["examples"] == 1
    rows = evaluation.prepare(model, task).clean_metric()
    full = torch.tensor([[tok.bos_token_id] + tok.encode("The tower in Paris is the") + cont])
    logp = patching.run(model.weights, model.graph, full).logits.log_softmax(-1)[0]
    n = full.shape[1] - len(cont)
    want = sum(logp[n - 1 + i, t].item() for i, t in enumerate(cont))
    assert rows.sum().item() == pytest.approx(want, abs=1e-4)


def test_multi_token_answer_needs_the_logprob_metric(tmp_path):
    model = load_model("random:gpt2-tiny")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"clean": "a b", "corrupted": "a c", "answer": " Eiffel Tower", "wrong": " x"}) + "\n")
    with pytest.raises(TaskError, match="--metric logprob"):
        load_file(path, model.tokenizer)
