"""Issue 14: held-out MIB curves, edge-pruning, GIM gradients, ensembles, patching directions."""

import dataclasses
import json

import pytest
import torch
from conftest import load_model, random_task

from circuits import evaluation, methods, patching, select
from circuits.cli.main import main
from circuits.graph import Channel
from circuits.methods import edge_pruning as EP
from circuits.methods.ensemble import combine_scores
from circuits.methods.registry import parse_list
from circuits.model import components as C
from circuits.tasks.builtin import build_task
from circuits.tasks.splits import SplitError, split_sizes
from circuits.tasks.task import Metric, split
from circuits.verify import benchmark, checks, groundtruth


@pytest.fixture(scope="module")
def ioi_setup():
    model = load_model("ioi-3l")
    return evaluation.prepare(model, build_task("ioi", model, n=8, seed=0))


def _tiny_setup(spec="random:gpt2-tiny", n=4, metric=None):
    model = load_model(spec)
    task = random_task(model, n=n)
    if metric is not None:
        task = task.with_metric(metric)
    return evaluation.prepare(model, task)


# ---- MIB's curve: one definition, both rankings ----

def test_mib_pairing_cpr_by_signed_cmd_by_abs(ioi_setup):
    scores = methods.get("eap").score(ioi_setup)
    mib = checks.mib_scores(ioi_setup, scores)
    signed = checks.faithfulness_curve(ioi_setup, scores, absolute=False)
    absolute = checks.faithfulness_curve(ioi_setup, scores, absolute=True)
    assert mib.cpr == checks.cpr_cmd(signed)[0] and mib.cmd == checks.cpr_cmd(absolute)[1]
    assert [p.edges for p in mib.signed] == [int(pct / 100 * ioi_setup.graph.n_edges) for pct in checks.MIB_PERCENTS]
    # negating the scores reverses the signed ranking, not the |score| one
    flipped = checks.mib_scores(ioi_setup, -scores)
    assert [p.faithfulness for p in flipped.absolute] == [p.faithfulness for p in mib.absolute]
    assert flipped.cpr != mib.cpr
    d = mib.as_dict()
    assert d["CPR"] == d["by_signed_score"]["CPR"] and d["CMD"] == d["by_abs_score"]["CMD"]


# ---- splits ----

def test_split_is_seeded_disjoint_and_complete(ioi_setup):
    task = ioi_setup.task
    d1, t1 = split(task, 0.25, seed=3)
    _, t2 = split(task, 0.25, seed=3)
    assert torch.equal(t1.clean, t2.clean) and (len(d1), len(t1)) == (6, 2)
    def rows(t):
        return [tuple(r[:n]) for r, n in zip(t.clean.tolist(), t.lengths.tolist())]
    assert sorted(rows(d1) + rows(t1)) == sorted(rows(task))
    assert t1.meta["split"] == "test" and d1.meta["examples"] == 6


def test_split_sizes_refuse_too_few_test_examples():
    assert split_sizes(64, 0.5) == (32, 32)
    with pytest.raises(SplitError, match="leaves 1 test example;"):
        split_sizes(10, 0.1)
    with pytest.raises(SplitError, match="no discovery"):
        split_sizes(3, 0.9)
    with pytest.raises(SplitError, match=r"\(0, 1\)"):
        split_sizes(10, 1.0)


# ---- directions ----

def test_denoising_is_noising_of_the_swapped_task():
    """Denoising takes the gradient at the corrupted run; noising the swapped task (clean ↔
    corrupted) takes it there too, with the opposite delta: the importances are negatives."""
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=4)
    swapped = dataclasses.replace(task, clean=task.corrupted, corrupted=task.clean)
    den = methods.get("eap").score(evaluation.prepare(model, task), direction="denoising")
    noi = methods.get("eap").score(evaluation.prepare(model, swapped), direction="noising")
    assert torch.allclose(den, -noi, atol=1e-5) and den.abs().max() > 0
    plain = methods.get("eap").score(evaluation.prepare(model, task))
    assert not torch.allclose(den, plain)


def test_denoising_works_under_a_divergence_metric_noising_refuses():
    setup = _tiny_setup(metric=Metric.KL)
    with pytest.raises(ValueError, match="zero gradient"):
        methods.get("eap").score(setup)
    assert methods.get("eap").score(setup, direction="denoising").abs().max() > 0


# ---- GIM ----

@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny"])
def test_gim_with_every_switch_off_is_eap_exactly(spec):
    setup = _tiny_setup(spec)
    off = {"freeze_norm": False, "softmax_temperature": 1.0, "q_scale": 1.0, "k_scale": 1.0, "v_scale": 1.0}
    for direction in ("noising", "denoising"):
        assert torch.equal(methods.get("eap-gim").score(setup, direction=direction, **off),
                           methods.get("eap").score(setup, direction=direction))


def _columns(graph, layer, kind):
    return [r for r in range(graph.n_receivers) if graph.receivers[r].layer == layer
            and getattr(graph.receivers[r], "channel", None) is not None
            and graph.receivers[r].channel.value == kind]


def _gim(setup, **switch):
    off = {"freeze_norm": False, "softmax_temperature": 1.0, "q_scale": 1.0, "k_scale": 1.0, "v_scale": 1.0}
    return methods.get("eap-gim").score(setup, **{**off, **switch})


def test_each_gim_switch_changes_what_it_should():
    setup = _tiny_setup("random:gpt2-tiny")
    g = setup.graph
    last = g.arch.n_layers - 1
    eap = methods.get("eap").score(setup)
    logits = g.logits_col
    q, k, v = (_columns(g, last, c) for c in ("q", "k", "v"))
    assert q and k and v
    # q scaling: the last layer's q receivers see exactly the scaled gradient; logits untouched
    half_q = _gim(setup, q_scale=0.5)
    assert torch.allclose(half_q[:, q], 0.5 * eap[:, q], atol=1e-6)
    assert torch.equal(half_q[:, logits], eap[:, logits]) and torch.allclose(half_q[:, v], eap[:, v])
    half_v = _gim(setup, v_scale=0.5)
    assert torch.allclose(half_v[:, v], 0.5 * eap[:, v], atol=1e-6)
    # softmax temperature: the pattern's backward changes q and k gradients, not v's or the logits'
    tempered = _gim(setup, softmax_temperature=2.0)
    assert not torch.allclose(tempered[:, q], eap[:, q]) and not torch.allclose(tempered[:, k], eap[:, k])
    assert torch.allclose(tempered[:, v], eap[:, v], atol=1e-6)
    assert torch.allclose(tempered[:, logits], eap[:, logits], atol=1e-6)      # explicit attention: rounding
    # frozen norm statistics: every receiver read through a norm changes, the logits too
    frozen = _gim(setup, freeze_norm=True)
    assert not torch.allclose(frozen[:, logits], eap[:, logits])


def test_gim_changes_the_backward_only():
    setup = _tiny_setup("random:llama-tiny")
    w, g, c = setup.model.weights, setup.graph, setup.chunks[0]
    mods = C.GradientMods(True, 2.0, 0.25, 0.25, 0.5)
    plain = patching.run(w, g, c.task.clean, positions=c.task.positions).logits
    modded = patching.run(w, g, c.task.clean, positions=c.task.positions, grad_mods=mods).logits
    assert torch.allclose(plain, modded, atol=1e-5)


# ---- ensembles ----

@pytest.mark.parametrize("combine", ["rank", "score", "magnitude"])
def test_an_ensemble_of_one_method_ranks_like_it(ioi_setup, combine):
    """Both of MIB's rankings are kept; "magnitude" (unsigned) keeps the |score| one."""
    g = ioi_setup.graph
    base = methods.get("eap").score(ioi_setup)
    ens = methods.get("ensemble").score(ioi_setup, members="eap", combine=combine)
    assert (ens[g.allowed] >= 0).all() if combine == "magnitude" else (ens[g.allowed] < 0).any()
    for absolute in ((True,) if combine == "magnitude" else (True, False)):
        for n in (1, 3, 10, 26, 100, 200):
            assert torch.equal(select.top_n(g, ens, n, absolute=absolute), select.top_n(g, base, n, absolute=absolute))
    twice = combine_scores(g, [base, base], combine)
    assert torch.allclose(twice, ens)


def test_ensemble_averages_its_members(ioi_setup):
    g = ioi_setup.graph
    a, b = methods.get("eap").score(ioi_setup), methods.get("eap-ig-inputs").score(ioi_setup, steps=2)
    mixed = combine_scores(g, [a, b], "score")
    expected = (a / a[g.allowed].abs().max() + b / b[g.allowed].abs().max()) / 2
    assert torch.allclose(mixed[g.allowed], expected[g.allowed], atol=1e-6)


# ---- edge pruning ----

def test_patching_is_differentiable_in_coef(ioi_setup):
    w, g, c = ioi_setup.model.weights, ioi_setup.graph, ioi_setup.chunks[0]
    theta = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(th):
        coef = torch.sigmoid(th).float() * g.allowed
        return patching.run(w, g, c.task.clean, positions=c.task.positions, coef=coef,
                            ablated=c.ablated).logits[:, :50].sum()
    th = theta.clone().requires_grad_(True)
    with torch.enable_grad():
        f(th).backward()
    with torch.no_grad():
        plain = patching.run(w, g, c.task.clean, positions=c.task.positions,
                             coef=(torch.sigmoid(theta).float() * g.allowed), ablated=c.ablated).logits[:, :50].sum()
        assert torch.isclose(f(theta), plain)
    s, r = [int(x) for x in torch.nonzero(g.allowed)[-1]]            # an edge into the logits
    e = torch.zeros_like(theta)
    e[s, r] = 0.05
    with torch.no_grad():
        fd = (f(theta + e) - f(theta - e)) / 0.1
    assert th.grad[s, r].item() == pytest.approx(fd.item(), rel=0.05, abs=0.05)


def test_edge_pruning_is_deterministic_and_nonnegative(ioi_setup):
    kw = {"steps": 6, "warm_start": "eap"}
    a = methods.get("edge-pruning").score(ioi_setup, **kw)
    b = methods.get("edge-pruning").score(ioi_setup, **kw)
    assert torch.equal(a, b)
    allowed = ioi_setup.graph.allowed
    assert (a[allowed] >= 0).all() and (a[~allowed] == 0).all()
    other = methods.get("edge-pruning").score(ioi_setup, seed=1, **kw)
    assert not torch.equal(a, other)


def test_edge_pruning_levels_and_target_sparsity():
    assert EP.levels(0.95, "mib") == pytest.approx([0.5, 0.8, 0.9, 0.95])
    assert EP.levels(0.95, "single") == [0.95]
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            EP.check_target_sparsity(bad)


def test_edge_pruning_meets_its_target_density():
    setup = _tiny_setup()
    _, _, records = EP.train_mask(setup, target_sparsities=[0.7], steps=40, lr=0.2)
    assert records[0]["density_end"] < 0.5


def test_score_estimator_is_unbiased_for_the_expected_loss_of_hard_circuits():
    """DisARM over many antithetic pairs ≈ the exact gradient of E[loss] over hard masks, with
    two edges into the logits uncertain (every other edge kept for sure): E is a sum over 4 masks."""
    setup = _tiny_setup(metric=Metric.KL)
    g = setup.graph
    edges = [(s, r) for s, r in torch.nonzero(g.allowed).tolist() if g.receivers[r].channel is Channel.LOGITS]
    single = torch.zeros((len(edges),) + tuple(g.allowed.shape))
    for i, (s, r) in enumerate(edges):
        single[i, s, r] = 1.0
    effect = setup.metric_of_coef(single, Metric.KL).mean(1)      # each edge removed alone
    (s1, r1), (s2, r2) = [edges[i] for i in torch.argsort(effect, descending=True)[:2].tolist()]
    theta = torch.full((g.n_senders, g.n_receivers), 40.0)
    theta[s1, r1] = theta[s2, r2] = -EP.open_logit(torch.zeros(()))   # open with probability 1/2
    theta.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):                                           # 600 pairs, 200 at a time
        EP._score_step(setup, theta, g.allowed.float(), gen, "kl", None, 200)
    theta.grad /= 3
    p1, p2 = torch.sigmoid(EP.open_logit(theta.detach()))[[s1, s2], [r1, r2]].tolist()
    loss = {}
    for a in (0, 1):
        for b in (0, 1):
            mask = g.allowed.clone()
            mask[s1, r1], mask[s2, r2] = bool(a), bool(b)
            loss[a, b] = setup.metric(mask, Metric.KL).mean().item()
    # d E / d theta_e = p_e (1 − p_e) · (E[loss | e kept] − E[loss | e removed])
    exact1 = p1 * (1 - p1) * (p2 * (loss[1, 1] - loss[0, 1]) + (1 - p2) * (loss[1, 0] - loss[0, 0]))
    exact2 = p2 * (1 - p2) * (p1 * (loss[1, 1] - loss[1, 0]) + (1 - p1) * (loss[0, 1] - loss[0, 0]))
    scale = max(abs(exact1), abs(exact2))                      # the noise scales with the larger effect
    assert scale > 1e-4
    assert theta.grad[s1, r1].item() == pytest.approx(exact1, abs=0.1 * scale)
    assert theta.grad[s2, r2].item() == pytest.approx(exact2, abs=0.1 * scale)
    others = g.allowed.clone()
    others[s1, r1] = others[s2, r2] = False
    assert (theta.grad[others] == 0).all() and (theta.grad[~g.allowed] == 0).all()


def test_edge_pruning_hard_mask_estimators_are_deterministic(ioi_setup):
    for estimator in ("score", "both"):
        kw = {"steps": 4, "warm_start": "none", "estimator": estimator, "samples": 2, "schedule": "single"}
        a = methods.get("edge-pruning").score(ioi_setup, **kw)
        assert torch.equal(a, methods.get("edge-pruning").score(ioi_setup, **kw))
        assert not torch.equal(a, methods.get("edge-pruning").score(ioi_setup, seed=1, **kw))
    with pytest.raises(ValueError, match="estimator must be one of pathwise, score, both"):
        EP.train_mask(ioi_setup, target_sparsities=[0.9], steps=2, estimator="hard")


TRACR = [(name, ablation) for name in ("tracr-reverse", "tracr-proportion", "tracr-sort")
         for ablation in ("zero", "resample")]


@pytest.mark.slow
@pytest.mark.parametrize("name,ablation", TRACR)
def test_edge_pruning_recovers_tracr_ground_truth(name, ablation):
    """No warm start: the mask is learned from scratch, told only the circuit's size. Estimator
    "both": tracr-sort's a0.h0 path under zero ablation acts through an MLP on a ReLU plateau,
    which no pathwise gradient crosses, so hard masks are needed; l0_weight 10: a penalty of 100
    closes the query and key of tracr-proportion's a1.h0 (each matters only while the other is
    kept) before the objective can hold them. Margins over 4 seeds: 1.7–11.9 logits."""
    model = load_model(name)
    setup = evaluation.prepare(model, build_task("tracr", model, n=50, seed=0), patching.Ablation(ablation))
    truth = groundtruth.shipped_ground_truth(model, ablation)
    sparsity = 1 - int(truth.sum()) / model.graph.n_edges
    scores = methods.get("edge-pruning").score(setup, warm_start="none", steps=200, schedule="single",
                                               target_sparsity=sparsity, estimator="both", l0_weight=10.0)
    assert groundtruth.edge_auroc(model.graph, scores, truth) == 1.0


# ---- the benchmark and its command line ----

def test_method_lists_are_parsed_and_checked():
    assert parse_list("eap,edge-pruning:steps=3:objective=kl,ensemble:members=eap+eap-gim") == [
        ("eap", {}), ("edge-pruning", {"steps": 3, "objective": "kl"}), ("ensemble", {"members": "eap,eap-gim"})]
    for bad, says in [("eap,nope", "unknown method 'nope'"), ("eap:wat=1", "no parameter 'wat'"),
                      ("edge-pruning:target_sparsity=1.2", "(0, 1)"), ("eap:direction=up", "noising, denoising"),
                      ("ensemble:members=eap+nope", "unknown method"),
                      ("edge-pruning:estimator=hard", "pathwise, score, both"),
                      ("edge-pruning:samples=0", "at least 1")]:
        with pytest.raises(ValueError, match=None) as err:
            parse_list(bad)
        assert says in str(err.value)


def test_benchmark_reports_held_out_curves_both_directions_and_jaccard(tmp_path):
    model = load_model("induction-2l")
    task = build_task("induction", model, n=16, seed=0)
    rep = benchmark.run(model, task, parse_list("eap,ensemble:members=eap:combine=rank"), test_fraction=0.5, seed=0)
    labels = [m["label"] for m in rep["methods"]]
    assert labels == ["eap", "eap:direction=denoising", "ensemble:members=eap:combine=rank"]
    assert rep["split"] == {"seed": 0, "test_fraction": 0.5, "discovery": 8, "test": 8}
    eap, ens = rep["methods"][0], rep["methods"][2]
    assert [p["percent"] for p in eap["by_signed_score"]["points"]] == list(checks.MIB_PERCENTS)
    assert ens["CPR"] == pytest.approx(eap["CPR"]) and ens["CMD"] == pytest.approx(eap["CMD"])
    assert rep["jaccard_at_5_percent"]["matrix"][0][2] in (1.0, None)
    assert rep["direction"][0]["method"] == "eap" and rep["direction"][0]["better"] in ("noising", "denoising", "mixed")
    text = benchmark.table(rep)
    assert "CPR" in text and "direction for eap" in text
    from circuits.io import plot
    out = plot.save_curves(rep, tmp_path / "curves.svg")
    assert out.read_text().startswith("<svg") and "eap:direction=denoising" in out.read_text()
    json.dumps(rep)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv,says", [
    (["benchmark", "ioi-3l", "ioi", "--methods", "eap,nope"], "unknown method 'nope'"),
    (["benchmark", "ioi-3l", "ioi", "--n", "10", "--test-fraction", "0.1"], "leaves 1 test example"),
    (["benchmark", "ioi-3l", "ioi", "--test-fraction", "1.5"], "must be in (0, 1)"),
    (["benchmark", "ioi-3l", "ioi", "--methods", "edge-pruning:target_sparsity=1"], "must be in (0, 1)"),
    (["benchmark", "ioi-3l", "ioi", "--plot", "x.pdf"], ".svg or .png"),
    (["discover", "ioi-3l", "ioi", "--method", "edge-pruning", "--target-sparsity", "0"], "must be in (0, 1)"),
    (["discover", "ioi-3l", "ioi", "--method", "eap-ig-inputs", "--direction", "denoising"], "--direction does not apply"),
    (["discover", "ioi-3l", "ioi", "--method", "eap", "--estimator", "score"], "--estimator does not apply"),
    (["benchmark", "ioi-3l", "ioi", "--methods", "edge-pruning:estimator=reinforce"], "pathwise, score, both"),
    (["discover", "ioi-3l", "ioi", "--method", "eap", "--n", "4", "--test-fraction", "0.2"], "leaves 1 test example"),
    (["verify", "c.json", "ioi-3l", "ioi", "--n", "4", "--test-fraction", "0.2"], "leaves 1 test example"),
    (["discover", "ioi-3l", "ioi", "--method", "ensemble", "--members", "eap,nope"], "unknown method 'nope'"),
])
def test_bad_benchmark_input_is_one_line(capsys, argv, says):
    assert says in _error(capsys, argv)


def test_discover_records_direction_and_split_and_verify_holds_out(capsys, tmp_path):
    out = tmp_path / "c.json"
    assert main(["discover", "induction-2l", "induction", "--method", "eap", "--direction", "denoising",
                 "--n", "16", "--test-fraction", "0.5", "--top-n", "10", "--out", str(out), "--quiet"]) == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["direction"] == "denoising" and prov["parameters"]["direction"] == "denoising"
    assert prov["split"]["discovery"] == 8 and prov["task"]["examples"] == 8
    capsys.readouterr()
    assert main(["verify", str(out), "induction-2l", "induction", "--n", "16", "--test-fraction", "0.5",
                 "--subsets", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["held_out"]["test"] == 8
    assert rep["curve"]["CPR"] == rep["curve"]["by_signed_score"]["CPR"]
