"""Readable and affordable at real scale: the faithfulness search, short summaries, GQA groups,
ACDC's cost model. Fast: stand-in setups and tiny models."""

import math
import re

import pytest
import torch
from conftest import load_model, random_task

from circuits import circuit as circuit_io
from circuits import discover, evaluation, select
from circuits.methods.acdc import edge_cost, expected_forwards


class CurveSetup:
    """A stand-in Setup whose circuit metric is a smooth function of the edges kept: faithfulness
    rises like a logistic in log n, with the crossing of 0.8 near `centre` edges."""

    def __init__(self, graph, centre: float, width: float = 0.6):
        self.graph, self.centre, self.width = graph, centre, width
        self.sizes = []

    def faithfulness_of(self, n: int) -> float:
        if n <= 0:
            return 0.0
        if self.width == 0:       # saturating, as smollm2-135m's IOI under EAP-IG measured
            return 0.95 * (1 - math.exp(-((n / self.centre) ** 1.2)))
        return 1 / (1 + math.exp(-(math.log(n) - math.log(self.centre)) / self.width)) * 1.2

    def empty_metric(self):
        return 0.0

    def clean_metric(self):
        return torch.tensor([1.0])

    def metric(self, mask):
        n = int(mask.sum())
        self.sizes.append(n)
        return torch.tensor([self.faithfulness_of(n)])


def smollm2_graph():
    return circuit_io.graph_from_summary({"family": "llama", "n_layers": 30, "n_heads": 9, "n_kv_heads": 3,
                                          "has_mlp": True, "parallel": False})


@pytest.mark.parametrize("centre,width", [(40.0, 0.6), (900.0, 0.6), (6000.0, 0.6), (30000.0, 0.6),
                                          (7000.0, 0), (2000.0, 0)])
def test_search_takes_a_handful_of_evaluations_and_meets_its_tolerance(centre, width):
    g = smollm2_graph()
    assert g.n_edges == 70651
    setup = CurveSetup(g, centre, width)
    scores = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0)) * g.allowed
    found = discover.smallest_faithful(setup, scores, 0.8, prune=False)
    tol = discover.search_tolerance(g.n_edges)
    assert found.tolerance == tol == 706
    assert len(found.tried) <= 7, found.tried                  # not a scan to single edges
    assert min(setup.sizes) >= tol                              # no absurd tiny circuits
    assert len(setup.sizes) == len(set(setup.sizes))            # each size evaluated once
    assert setup.faithfulness_of(found.n) >= 0.8
    assert found.n == tol or setup.faithfulness_of(found.n - tol) < 0.8     # smallest, within tol
    assert found.faithfulness == pytest.approx(setup.faithfulness_of(found.n))
    assert int(found.mask.sum()) == found.n


def test_search_on_a_small_graph_is_exact_to_the_edge():
    """1% of a small graph is under one edge: the search is then exact, as before."""
    g = circuit_io.graph_from_summary({"family": "gpt2", "n_layers": 2, "n_heads": 4, "has_mlp": True,
                                       "parallel": False})
    setup = CurveSetup(g, 20.0, width=0.3)
    scores = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) * g.allowed
    found = discover.smallest_faithful(setup, scores, 0.8, prune=False)
    assert found.tolerance == 1
    exact = min(n for n in range(1, g.n_edges + 1) if setup.faithfulness_of(n) >= 0.8)
    assert found.n == exact
    assert len(found.tried) <= 10


def test_search_reuses_the_empty_circuit_and_the_found_circuits_metric():
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model, n=4))
    calls = []
    real = setup.metric_of_coef
    object.__setattr__(setup, "metric_of_coef", lambda *a, **k: calls.append(1) or real(*a, **k))
    found = discover.run(setup, "eap")
    n_search = found.details["search"]["evaluations"]
    # m(∅) is the corrupted run prepare() recorded (resample); the final faithfulness reuses the search's
    assert len(calls) == n_search
    assert found.faithfulness["faithfulness"] == pytest.approx(
        evaluation.Setup.faithfulness(setup, found.circuit.mask)["faithfulness"], abs=1e-6)


def test_components_name_kv_groups_once_not_each_head():
    model = load_model("random:llama-tiny")
    g = model.graph
    per = g.arch.n_heads // g.arch.n_kv_heads
    mask = g.mask_from_edges(["input->a1.kv1<k>", "a1.h0->logits", "input->a1.h0<q>"])
    scores = torch.zeros(g.n_senders, g.n_receivers)
    scores[g.edge("input->a1.kv1<k>")] = 3.0
    scores[g.edge("a1.h0->logits")] = 1.0
    comp = circuit_io.components(circuit_io.Circuit(g, mask, scores, {}))
    group = f"a1.kv1 (" + ",".join(f"h{h}" for h in range(per, 2 * per)) + ")"
    assert comp["kv_groups"] == {group: [f"a1.h{h}" for h in range(per, 2 * per)]}
    assert comp["heads"] == ["a1.h0"]                       # not the group's heads, which nothing else found
    assert comp["edges_by_receiver"] == {"q": 1, "k": 1, "logits": 1}
    assert comp["top"][0] == {"component": group, "score": 3.0}


def test_discover_summary_stays_short_on_a_large_circuit(capsys, tmp_path):
    from circuits.cli.main import main
    out = tmp_path / "c.json"
    assert main(["discover", "random:llama-tiny", "induction", "--method", "eap", "--top-n", "60",
                 "--no-prune", "--quiet", "--n", "8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert len(lines) <= 10 and max(len(line) for line in lines) <= 400, text
    assert re.search(r"\d+ heads?, \d+ KV groups?, \d+ MLPs?; edges into q \d+", text)
    assert "strongest: " in text


def test_acdc_cost_model_weights_late_layers_less():
    model = load_model("random:gpt2-tiny")
    g = model.graph
    L = g.arch.n_layers
    assert edge_cost(g, g.logits_col) == pytest.approx(0.5 / (L + 0.5))
    assert edge_cost(g, g.attn_cols[0][0]) == pytest.approx(1.0 * (L + 0.5) / (L + 0.5))
    costs = [edge_cost(g, r) for r in range(g.n_receivers)]
    assert costs == sorted(costs, reverse=True)
    assert expected_forwards(g, g.full_mask()) < g.n_edges
    assert expected_forwards(g, g.empty_mask()) == 0


def test_verify_says_what_it_will_spend_and_samples_minimality(capsys, tmp_path):
    from circuits.cli.main import main
    out = tmp_path / "c.json"
    assert main(["discover", "random:gpt2-tiny", "induction", "--method", "eap", "--top-n", "40",
                 "--quiet", "--n", "4", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "random:gpt2-tiny", "induction", "--n", "4", "--subsets", "2",
                 "--minimality-sample", "2"]) == 0
    captured = capsys.readouterr()
    plan = next(line for line in captured.err.splitlines() if line.startswith("verify: "))
    # two MIB curves (by signed score and by |score|) of 10 sizes each
    assert re.search(r"verify: \d+ circuit evaluations: curve 20, completeness 4, minimality 3, ablations 5 "
                     r"\(a sample of 2 of \d+ components\); about \d+", plan), plan
    assert re.search(r"minimality +sampled 2 of \d+ components: .*95% interval", captured.out), captured.out


def test_eap_from_the_setups_kept_clean_graph_equals_eap_with_its_own_forward():
    """prepare(keep_clean_graph=True) saves EAP its second clean forward; same scores, and the
    graph serves once (a second EAP runs its own forward)."""
    from circuits import methods
    model = load_model("random:llama-tiny")
    task = random_task(model, n=6)
    plain = methods.get("eap").score(evaluation.prepare(model, task, batch_size=4))
    setup = evaluation.prepare(model, task, batch_size=4, keep_clean_graph=True)
    assert torch.equal(setup.clean_metric(), evaluation.prepare(model, task, batch_size=4).clean_metric())
    kept = methods.get("eap").score(setup)
    assert all(not c._graph for c in setup.chunks)
    again = methods.get("eap").score(setup)
    torch.testing.assert_close(kept, plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(again, plain, rtol=1e-4, atol=1e-6)
