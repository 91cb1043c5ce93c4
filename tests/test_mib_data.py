"""MIB circuit-track and EAP-IG task data, read as Tasks."""

import json
import re

import pytest
import torch

from circuits.model import loader
from circuits.tasks.files import load_file
from circuits.tasks.task import Metric, TaskError


@pytest.fixture(scope="module")
def tok():
    return loader.gpt2_tokenizer()


def _ioi_row(io, s, place="store", obj="drink"):
    prompt = f"When {io} and {s} went to the {place}, {s} gave a {obj} to"
    flip = f"When {io} and {s} went to the {place}, {io} gave a {obj} to"
    return {"template": "When {name_A} and {name_B} went to the {place}, {name_C} gave a {object} to",
            "metadata": {"indirect_object": io, "subject": s, "object": obj, "place": place},
            "prompt": prompt, "choices": [io, s], "answerKey": 0,
            "s2_io_flip_counterfactual": {"prompt": flip, "choices": [io, s], "answerKey": 1},
            "abc_counterfactual": {"prompt": prompt.replace(f", {s} gave", ", Paul gave"),
                                   "choices": [io, s, "Paul"], "answerKey": -1}}


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mib_ioi_rows(tmp_path, tok):
    path = _write_jsonl(tmp_path / "ioi.jsonl", [_ioi_row("Mary", "John"), _ioi_row("Anna", "Tom")])
    task = load_file(path, tok)
    assert task.metric is Metric.LOGIT_DIFF and len(task) == 2
    assert task.meta["counterfactual"] == "s2_io_flip_counterfactual"
    assert tok.decode(task.answers[0, :1]) == " Mary" and tok.decode(task.wrongs[0, :1]) == " John"
    assert tok.decode(task.corrupted[0, 1 : int(task.lengths[0])]).endswith("Mary gave a drink to")
    abc = load_file(path, tok, counterfactual="abc_counterfactual")
    assert tok.decode(abc.corrupted[0, 1 : int(abc.lengths[0])]).endswith("Paul gave a drink to")


def test_mib_rows_in_one_json_array(tmp_path, tok):
    path = tmp_path / "ioi.json"
    path.write_text(json.dumps([_ioi_row("Mary", "John")]))
    assert len(load_file(path, tok)) == 1


def test_mib_unknown_counterfactual_names_the_options(tmp_path, tok):
    path = _write_jsonl(tmp_path / "ioi.jsonl", [_ioi_row("Mary", "John")])
    with pytest.raises(TaskError, match="abc_counterfactual, s2_io_flip_counterfactual"):
        load_file(path, tok, counterfactual="nope_counterfactual")


def test_mib_drops_misaligned_rows_and_counts_them(tmp_path, tok):
    bad = _ioi_row("Mary", "John")
    bad["s2_io_flip_counterfactual"]["prompt"] = "A much longer and entirely different prompt, gave a drink to"
    path = _write_jsonl(tmp_path / "ioi.jsonl", [_ioi_row("Anna", "Tom"), bad])
    task = load_file(path, tok)
    assert len(task) == 1
    assert task.meta["dropped"] == {"clean/counterfactual token lengths differ": 1}
    path = _write_jsonl(tmp_path / "all-bad.jsonl", [bad])
    with pytest.raises(TaskError, match="no usable rows"):
        load_file(path, tok)


def test_mib_multiple_choice_rows(tmp_path, tok):
    def row(key, cf_key):
        prompt = ("Question: The ball is red. What color is the ball?\nA. blue\nB. red\nC. green\n"
                  "D. black\nAnswer:")
        cf = prompt.replace("A.", "W.").replace("B.", "X.").replace("C.", "Y.").replace("D.", "Z.")
        return {"prompt": prompt, "choices": {"label": ["A", "B", "C", "D"], "text": ["blue", "red", "green", "black"]},
                "answerKey": key, "symbol_counterfactual": {
                    "prompt": cf, "choices": {"label": ["W", "X", "Y", "Z"], "text": ["blue", "red", "green", "black"]},
                    "answerKey": cf_key}}
    task = load_file(_write_jsonl(tmp_path / "mcqa.jsonl", [row(1, 1), row(2, 2)]), tok)
    assert task.meta["mib_task"] == "multiple-choice"
    assert tok.decode(task.answers[0, :1]) == "B" and tok.decode(task.wrongs[0, :1]) == "X"


def test_mib_arithmetic_rows(tmp_path, tok):
    rows = [{"prompt": "Q: How much is 27 plus 64? A: ", "label": "91", "operator": "+", "operand1": 27,
             "operand2": 64, "random_counterfactual": {"prompt": "Q: How much is 72 plus 37? A: ", "label": 109,
                                                       "operand1": 72, "operand2": 37}}]
    task = load_file(_write_jsonl(tmp_path / "arith.jsonl", rows), tok)
    assert tok.decode(task.answers[0, :1]) == "91" and tok.decode(task.wrongs[0, :1]) == "109"


def test_mib_unknown_row_kind_is_refused(tmp_path, tok):
    rows = [{"prompt": "Hello", "odd_counterfactual": {"prompt": "Bye"}}]
    with pytest.raises(TaskError, match="not one of the known tasks"):
        load_file(_write_jsonl(tmp_path / "odd.jsonl", rows), tok)


def test_eap_ig_csv_logit_diff(tmp_path, tok):
    mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]
    path = tmp_path / "ioi.csv"
    path.write_text(",clean,corrupted,correct_idx,incorrect_idx\n"
                    f"0,\"When Mary and John went out, John gave a drink to\","
                    f"\"When Mary and John went out, Paul gave a drink to\",{mary},{john}\n")
    task = load_file(path, tok)
    assert task.meta["format"] == "eap-ig-csv" and task.metric is Metric.LOGIT_DIFF
    assert task.answers.tolist() == [[mary]] and task.wrongs.tolist() == [[john]]


def test_eap_ig_csv_greater_than(tmp_path, tok):
    path = tmp_path / "gt.csv"
    path.write_text("clean,corrupted,label\n"
                    "The war lasted from the year 1752 to the year 17,The war lasted from the year 1701 to the year 17,52\n")
    task = load_file(path, tok)
    assert task.metric is Metric.PROB_DIFF
    later = {tok.decode([t]) for t in task.answers[0].tolist() if t >= 0}
    earlier = {tok.decode([t]) for t in task.wrongs[0].tolist() if t >= 0}
    assert "53" in later and "99" in later and "52" not in later and {"52", "00"} <= earlier
    path.write_text("clean,corrupted,label\nThe war lasted from the year 1752 to the year 17,"
                    "The war lasted from the year 1701 to the year 17,152\n")
    with pytest.raises(TaskError, match="two-digit"):
        load_file(path, tok)


def test_our_own_format_still_refuses_counterfactual_option(tmp_path, tok):
    path = _write_jsonl(tmp_path / "own.jsonl", [{"clean": "a b", "corrupted": "a c", "answer": " d", "wrong": " e"}])
    assert len(load_file(path, tok)) == 1
    with pytest.raises(TaskError, match="MIB-format data only"):
        load_file(path, tok, counterfactual="abc_counterfactual")


def test_mib_missing_fields_are_refused_with_the_line(tmp_path, tok):
    row = _ioi_row("Mary", "John")
    del row["metadata"]["subject"]
    path = tmp_path / "a.jsonl"      # named as given, like every task-file error
    with pytest.raises(TaskError, match=re.escape(f"{path}, line 2: missing field 'metadata.subject'")):
        load_file(_write_jsonl(path, [_ioi_row("Anna", "Tom"), row]), tok)
    row = _ioi_row("Mary", "John")
    row["s2_io_flip_counterfactual"]["prompt"] = 7
    with pytest.raises(TaskError, match="should be text"):
        load_file(_write_jsonl(tmp_path / "b.jsonl", [row]), tok)


def test_mib_null_counterfactual_rows_are_dropped(tmp_path, tok):
    row = _ioi_row("Mary", "John")
    row["s2_io_flip_counterfactual"] = None
    task = load_file(_write_jsonl(tmp_path / "a.jsonl", [_ioi_row("Anna", "Tom"), row]), tok)
    assert len(task) == 1 and task.meta["dropped"] == {"s2_io_flip_counterfactual is null": 1}


def test_mib_negative_answer_key_is_refused(tmp_path, tok):
    row = {"prompt": "Q?\nA. x\nB. y\nAnswer:", "choices": {"label": ["A", "B"]}, "answerKey": -1,
           "symbol_counterfactual": {"prompt": "Q?\nC. x\nD. y\nAnswer:", "choices": {"label": ["C", "D"]},
                                     "answerKey": 0}}
    with pytest.raises(TaskError, match="answerKey -1 does not index"):
        load_file(_write_jsonl(tmp_path / "m.jsonl", [row]), tok)


def test_mib_arithmetic_multi_token_answers_are_dropped(tmp_path, tok):
    def row(label, cf_label):
        return {"prompt": "Q: How much is 27 plus 64? A: ", "label": label, "operator": "+", "operand1": 27,
                "random_counterfactual": {"prompt": "Q: How much is 72 plus 37? A: ", "label": cf_label}}
    task = load_file(_write_jsonl(tmp_path / "a.jsonl", [row("91", 109), row("1234", 4321)]), tok)
    assert len(task) == 1 and task.meta["dropped"] == {"arithmetic answer is several tokens": 1}


def test_eap_ig_greater_than_with_correct_idx_header_and_missing_fields(tmp_path, tok):
    path = tmp_path / "gt.csv"
    path.write_text("clean,corrupted,correct_idx\nThe war lasted from the year 1752 to the year 17,"
                    "The war lasted from the year 1701 to the year 17,52\n")
    assert load_file(path, tok).metric is Metric.PROB_DIFF
    rows = [{"clean": "a b", "corrupted": "a c", "correct_idx": 5, "incorrect_idx": 6},
            {"clean": "a b", "corrupted": "a c", "correct_idx": 5}]
    path = tmp_path / "e.jsonl"
    with pytest.raises(TaskError, match=re.escape(f"{path}, line 2: missing field 'incorrect_idx'")):
        load_file(_write_jsonl(path, rows), tok)


def test_task_files_for_a_tracr_model_pad_with_its_masked_token(tmp_path):
    """Padding must be the token the non-causal model masks, or padded rows read it as input."""
    from circuits import evaluation, patching
    model = loader.load("tracr-sort")
    rows = [{"clean": "3 1 2", "corrupted": "2 3 1", "answer": "3", "wrong": "1"},
            {"clean": "5 1 2 4 3", "corrupted": "1 2 3 4 5", "answer": "5", "wrong": "1"}]
    task = load_file(_write_jsonl(tmp_path / "sort.jsonl", rows), model.tokenizer)
    setup = evaluation.prepare(model, task, patching.Ablation.ZERO)
    short = torch.tensor([model.tokenizer.encode("BOS 3 1 2")])
    alone = patching.run(model.weights, model.graph, short, positions=torch.tensor([3])).logits
    torch.testing.assert_close(setup.chunks[0].clean_logits[:1], alone)


def test_task_file_token_outside_a_fixed_vocabulary_names_the_line(tmp_path):
    model = loader.load("tracr-reverse")
    rows = [{"clean": "a b", "corrupted": "b a", "answer": "b", "wrong": "a"},
            {"clean": "a q", "corrupted": "b a", "answer": "a", "wrong": "b"}]
    with pytest.raises(TaskError, match=r"line 2: tokens \['q'\] are not in this model's vocabulary"):
        load_file(_write_jsonl(tmp_path / "r.jsonl", rows), model.tokenizer)
