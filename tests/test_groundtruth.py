import pytest
import torch
from conftest import load_model

from circuits import evaluation, methods
from circuits.graph import node_scores as graph_node_scores
from circuits.tasks.builtin import build_task
from circuits.verify.groundtruth import auroc, edge_auroc, node_auroc, roc


def test_auroc_known_values():
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1, 1, 0, 0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert auroc(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.75)
    fpr, tpr = roc(torch.tensor([2.0, 1.0]), torch.tensor([1, 0]))
    assert (fpr, tpr) == ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc(torch.tensor([1.0]), torch.tensor([1]))


def test_node_and_edge_auroc_on_the_induction_model():
    model = load_model("induction-2l")
    setup = evaluation.prepare(model, build_task("induction", model, n=32))
    scores = methods.get("eap-ig-activations").score(setup)
    truth = set(model.meta["previous_token_heads"] + model.meta["induction_heads"])
    assert node_auroc(model.graph, graph_node_scores(setup.graph, scores), truth) >= 0.8
    key = model.graph.mask_from_edges([f"{p}->{i}<k>" for p in model.meta["previous_token_heads"]
                                       for i in model.meta["induction_heads"]])
    assert edge_auroc(model.graph, scores, key) >= 0.85   # the two K-composition edges rank high
