"""On the shipped induction model every method finds the previous-token -> induction-head path."""

import pytest
import torch
from conftest import load_model

from circuits import discover, evaluation, methods
from circuits.discover import Selection
from circuits.tasks import builtin

ATTRIBUTION = ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted"]


@pytest.fixture(scope="module")
def setup():
    model = load_model("induction-2l")
    return evaluation.prepare(model, builtin.build_task("induction", model, n=48))


def heads(setup):
    meta = setup.model.meta
    return meta["previous_token_heads"], meta["induction_heads"]


def has_path(circuit_edges, prev, ind):
    return any(f"{p}->{i}<k>" in circuit_edges for p in prev for i in ind)


@pytest.mark.parametrize("method", ATTRIBUTION + ["exact", "acdc", "hybrid"])
def test_method_finds_previous_token_to_induction_head(setup, method):
    prev, ind = heads(setup)
    assert prev and ind
    found = discover.run(setup, method, tau=0.05, selection=Selection(target_faithfulness=0.8),
                         candidates=40)
    edges = set(found.circuit.edge_names())
    assert has_path(edges, prev, ind), (method, sorted(edges))
    # pruned circuits keep only components on input->logits paths
    assert set(ind) & set(found.circuit.node_names())


def spearman(a, b):
    ra = torch.argsort(torch.argsort(a)).float()
    rb = torch.argsort(torch.argsort(b)).float()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


@pytest.mark.parametrize("method", ATTRIBUTION)
def test_attribution_rank_correlates_with_exact(setup, method):
    allowed = setup.graph.allowed
    exact = methods.get("exact").score(setup)[allowed]
    approx = methods.get(method).score(setup)[allowed]
    assert spearman(approx.abs(), exact.abs()) >= 0.8
