import pytest
from conftest import load_model

from circuits.model.loader import Model
from circuits.tasks.builtin import TASKS, build_task
from circuits.tasks.task import TaskError


@pytest.mark.parametrize("name", [n for n, spec in TASKS.items() if spec.any_model])
def test_each_task_builds_100_valid_pairs_with_gpt2_tokenizer(name):
    model = load_model("random:gpt2-tiny")
    task = build_task(name, model, n=100)
    assert len(task) == 100
    assert (task.clean != task.corrupted).any(1).all()
    assert task.answers.shape[0] == 100 and (task.answers[:, 0] >= 0).all()


class SplittingTokenizer:
    """GPT-2's tokenizer, except that some words become two tokens."""

    def __init__(self, tok, split):
        self.tok, self.split = tok, split
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id

    def encode(self, text):
        ids = []
        for word in self.split:
            if word in text:
                text = text.replace(word, word + "\u00a7")     # an extra token after the word
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def with_tokenizer(tok):
    base = load_model("random:gpt2-tiny")
    return Model(base.spec, base.weights, base.graph, tok, None, {})


def test_names_that_are_not_one_token_are_dropped_and_counted():
    base = load_model("random:gpt2-tiny")
    model = with_tokenizer(SplittingTokenizer(base.tokenizer, [" Mary", " John"]))
    task = build_task("ioi", model, n=50)
    assert task.meta["dropped"]["name is not one token"] == 2
    assert len(task) == 50


def test_too_few_valid_items_is_refused():
    base = load_model("random:gpt2-tiny")
    model = with_tokenizer(SplittingTokenizer(base.tokenizer, ["France", "Germany", "Italy", "Spain", "Japan", "Russia",
                                                               "China", "Egypt", "Greece", "Canada", "Poland", "Austria",
                                                               "Ireland", "Norway", "Sweden", "Cuba", "Peru", "Kenya",
                                                               "Iran"]))
    with pytest.raises(TaskError, match="capital-country: only 1 single-token"):
        build_task("capital-country", model, n=20)


def test_years_that_do_not_split_are_dropped():
    base = load_model("random:gpt2-tiny")
    model = with_tokenizer(SplittingTokenizer(base.tokenizer, [" 17"]))
    task = build_task("greater-than", model, n=20)
    assert task.meta["dropped"]["year does not split as century + two digits"] > 0


class DigitTokenizer(SplittingTokenizer):
    """GPT-2's tokenizer, except that numbers are spelt one token per digit (SmolLM2, Llama 3)."""

    def __init__(self, tok):
        super().__init__(tok, [])

    def encode(self, text):
        import re
        return [i for piece in re.split(r"(\d)", text) if piece for i in self.tok.encode(piece)]


def test_greater_than_on_a_digit_level_tokenizer_predicts_the_tens_digit():
    base = load_model("random:gpt2-tiny")
    tok = DigitTokenizer(base.tokenizer)
    model = with_tokenizer(tok)
    task = build_task("greater-than", model, n=40)
    assert len(task) == 40 and task.meta["tokenization"] == "one token per digit"
    digit = {tok.encode(str(d))[0]: d for d in range(10)}
    for row in range(len(task)):
        clean = tok.decode(task.clean[row, : task.lengths[row]].tolist())
        start_tens = int(clean.split("year ")[1][2])              # "1732" -> 3
        above = {digit[i] for i in task.answers[row].tolist() if i >= 0}
        below = {digit[i] for i in task.wrongs[row].tolist() if i >= 0}
        assert above == set(range(start_tens + 1, 10)) and below == set(range(start_tens))
        assert clean.endswith(clean.split("year ")[1][:2])         # ends with the century


def test_text_task_needs_a_tokenizer():
    model = with_tokenizer(None)
    with pytest.raises(TaskError, match="needs a tokenizer"):
        build_task("sva", model)


def test_unknown_task_and_tiny_vocabulary():
    model = load_model("random:gpt2-tiny")
    with pytest.raises(TaskError, match="unknown built-in task"):
        build_task("nope", model)
    small = Model("m", model.weights, model.graph, None, None, {"content_tokens": [1, 5]})
    with pytest.raises(TaskError, match="induction needs at least"):
        build_task("induction", small)


def test_pronoun_names_are_checked_as_the_prompt_spells_them():
    """The templates start with the name (no leading space): names that split there are dropped
    by the name check, so none is lost later as a clean/corrupted length mismatch."""
    model = load_model("random:gpt2-tiny")
    task = build_task("pronoun", model, n=100)
    assert set(task.meta["dropped"]) == {"name is not one token at the start of a sentence"}
    assert len(model.tokenizer.encode("Emma")) > 1 and task.meta["dropped"][
        "name is not one token at the start of a sentence"] == 5
