"""Scoring methods and ACDC: equivalences with exact patching and with slow references."""

import pytest
import torch
from conftest import load_model, random_task

from circuits import evaluation, methods, select
from circuits.graph import build
from circuits.methods.acdc import acdc
from circuits.model.adapters import Arch, LayerWeights, Norm, Positional, Weights
from circuits.model.loader import Model
from circuits.tasks.task import Metric, from_pairs

ATTRIBUTION = ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted"]


def linear_model(seed=0):
    """Attention-only, no norm, W_Q = W_K = 0 (uniform attention): the logits are linear in
    every receiver's input, so first-order attribution is exact."""
    g = torch.Generator().manual_seed(seed)
    d, H, L, V = 4, 2, 2, 7
    arch = Arch(family="linear", n_layers=L, n_heads=H, n_kv_heads=H, d_model=d, d_head=d, d_mlp=0,
                d_vocab=V, n_ctx=8, norm=Norm.NONE, norm_eps=1e-5, positional=Positional.NONE,
                attn_only=True, attn_scale=1.0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    layers = [LayerWeights(ln1=(None, None), W_Q=torch.zeros(H, d, d), b_Q=torch.zeros(H, d),
                           W_K=torch.zeros(H, d, d), b_K=torch.zeros(H, d), W_V=rnd(H, d, d),
                           b_V=rnd(H, d), W_O=rnd(H, d, d), b_O=rnd(d)) for _ in range(L)]
    w = Weights(arch, rnd(V, d), None, layers, (None, None), rnd(d, V), None)
    return Model("linear", w, build(arch), None, None, {})


def test_eap_equals_exact_on_a_linear_model():
    model = linear_model()
    task = from_pairs("t", [[1, 2, 3, 4], [2, 3, 1, 0]], [[5, 6, 0, 1], [4, 4, 2, 2]], [[1], [2]], [[3], [4]])
    setup = evaluation.prepare(model, task)
    eap = methods.get("eap").score(setup)
    exact = methods.get("exact").score(setup)
    assert torch.allclose(eap, exact, atol=1e-5)
    assert exact.abs().max() > 0.1


def bridge_reference_eap(model, task):
    """Per-edge gradients through TransformerLens bridge hooks: an independent implementation."""
    b, arch, g = model.bridge, model.arch, model.graph
    L, H = arch.n_layers, arch.n_heads
    b.set_use_split_qkv_input(True)
    b.set_use_attn_result(True)
    try:
        senders = ["hook_embed", "hook_pos_embed"] + [n for l in range(L) for n in
                                                      (f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out")]

        def outputs(tokens):
            store = {}
            hooks = [(n, (lambda n: lambda t, hook: store.__setitem__(n, t.detach().clone()))(n)) for n in senders]
            with torch.no_grad():
                b.run_with_hooks(tokens, fwd_hooks=hooks)
            rows = [store["hook_embed"] + store["hook_pos_embed"]]
            for l in range(L):
                rows += [store[f"blocks.{l}.attn.hook_result"][:, :, h] for h in range(H)]
                rows.append(store[f"blocks.{l}.hook_mlp_out"])
            return torch.stack(rows)

        delta = outputs(task.corrupted) - outputs(task.clean)                  # [S, B, P, d]
        eps = {}
        recv = [(f"blocks.{l}.hook_{c}_input", l, c) for l in range(L) for c in "qkv"]
        recv += [(f"blocks.{l}.ln2.hook_in", l, "mlp") for l in range(L)] + [("ln_final.hook_in", L, "logits")]

        def adder(name):
            def add(t, hook):
                eps[name] = torch.zeros_like(t, requires_grad=True)
                return t + eps[name]
            return add
        logits = b.run_with_hooks(task.clean, fwd_hooks=[(n, adder(n)) for n, _, _ in recv])
        at = logits[torch.arange(len(task)), task.positions]
        metric = (at.gather(1, task.answers) - at.gather(1, task.wrongs)).mean()
        grads = dict(zip(eps, torch.autograd.grad(metric, list(eps.values()))))
    finally:
        b.set_use_split_qkv_input(False)
        b.set_use_attn_result(False)
    scores = torch.zeros(g.n_senders, g.n_receivers)
    for name, layer, ch in recv:
        gr = grads[name]
        if ch in "qkv":
            for h in range(gr.shape[2]):
                r = g.receiver_index[f"a{layer}.h{h}<{ch}>"]
                n = int(g.n_inputs[r])
                scores[:n, r] = torch.einsum("sbpd,bpd->s", delta[:n], gr[:, :, h])
        else:
            r = g.receiver_index["logits" if ch == "logits" else f"m{layer}"]
            n = int(g.n_inputs[r])
            scores[:n, r] = torch.einsum("sbpd,bpd->s", delta[:n], gr)
    return -scores


def test_eap_equals_slow_per_edge_gradient_reference():
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=3)
    ours = methods.get("eap").score(evaluation.prepare(model, task))
    theirs = bridge_reference_eap(model, task)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"])
def test_eap_ig_logit_edges_sum_to_the_metric_difference(spec):
    model = load_model(spec)
    task = random_task(model, n=4)
    setup = evaluation.prepare(model, task)
    scores = methods.get("eap-ig-activations").score(setup, steps=50)
    total = scores[:, model.graph.logits_col].sum().item()
    expected = (setup.clean_metric().mean() - setup.metric(model.graph.empty_mask()).mean()).item()
    assert total == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", ATTRIBUTION + ["exact"])
def test_clean_equal_to_corrupted_gives_zero_scores(name):
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=3)
    same = type(task)("same", task.clean, task.clean.clone(), task.answers, task.wrongs, task.lengths)
    scores = methods.get(name).score(evaluation.prepare(model, same))
    assert scores.abs().max() <= 1e-6


@pytest.mark.parametrize("name", ATTRIBUTION)
def test_attribution_tracks_exact_on_a_small_model(name):
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model, n=6))
    a = methods.get(name).score(setup)[model.graph.allowed]
    b = methods.get("exact").score(setup)[model.graph.allowed]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def acdc_setup():
    model = load_model("random:gpt2-tiny")
    return evaluation.prepare(model, random_task(model, n=6))


@pytest.mark.parametrize("tau,metric", [(1e-5, Metric.KL), (3e-5, Metric.KL), (0.003, Metric.LOGIT_DIFF)])
def test_acdc_equals_naive_reference(tau, metric):
    setup = acdc_setup()
    fast = acdc(setup, tau, metric=metric)
    naive = acdc(setup, tau, metric=metric, naive=True)
    assert torch.equal(fast.mask, naive.mask)
    assert 0 < int(fast.mask.sum()) < setup.graph.n_edges
    assert fast.tested == naive.tested


def test_acdc_from_a_start_mask_equals_naive_reference():
    """hybrid's path: edges removed up front in early layers must be ablated in every test (a
    forward started at the receiver's layer from the clean prefix would drop them)."""
    from circuits.tasks.builtin import build_task
    model = load_model("induction-2l")
    setup = evaluation.prepare(model, build_task("induction", model, n=16, seed=0))
    start = select.top_n(model.graph, methods.get("eap-ig-activations").score(setup), 30)
    assert (~start & model.graph.allowed)[:, model.graph.attn_cols[0][0]:model.graph.attn_cols[0][1]].any()
    fast = acdc(setup, 0.01, metric=Metric.KL, start_mask=start)
    naive = acdc(setup, 0.01, metric=Metric.KL, start_mask=start, naive=True)
    assert torch.equal(fast.mask, naive.mask)
    assert torch.allclose(fast.scores, naive.scores, atol=1e-5)


def test_resumed_acdc_equals_uninterrupted(tmp_path):
    setup = acdc_setup()
    whole = acdc(setup, 1e-5)
    ckpt = tmp_path / "run.ckpt.pt"
    calls = {"n": 0}
    original = type(setup).metric_of_coef

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    type(setup).metric_of_coef = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            acdc(setup, 1e-5, checkpoint=ckpt, checkpoint_every=0.0)
    finally:
        type(setup).metric_of_coef = original
    assert ckpt.is_file()
    resumed = acdc(setup, 1e-5, checkpoint=ckpt, resume=True)
    assert torch.equal(resumed.mask, whole.mask)
    assert resumed.tested == whole.tested
    with pytest.raises(ValueError, match="different ACDC run"):
        acdc(setup, 2e-5, checkpoint=ckpt, resume=True)


def test_selection_is_pure_idempotent_and_never_adds_edges():
    model = load_model("random:gpt2-tiny")
    g = model.graph
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0))
    before = scores.clone()
    for mask in (select.top_n(g, scores, 20), select.threshold(g, scores, 1.0), select.greedy(g, scores, 15)):
        assert not (mask & ~g.allowed).any()
        pruned = select.prune(g, mask)
        assert not (pruned & ~mask).any()
        assert torch.equal(select.prune(g, pruned), pruned)
    assert int(select.top_n(g, scores, 20).sum()) == 20
    assert int(select.greedy(g, scores, 15).sum()) <= 15
    assert torch.equal(scores, before)
    full = g.full_mask()
    assert torch.equal(select.prune(g, full), full)


def test_hybrid_searches_within_a_faithful_candidate_set():
    from circuits import discover
    from circuits.tasks.builtin import build_task
    model = load_model("induction-2l")
    setup = evaluation.prepare(model, build_task("induction", model, n=16, seed=0))
    found = discover.run(setup, "hybrid")
    n = found.circuit.provenance["parameters"]["candidates"]
    candidates = select.top_n(model.graph, methods.get("eap-ig-activations").score(setup), n)
    assert setup.faithfulness(candidates)["faithfulness"] >= discover.HYBRID_CANDIDATE_FAITHFULNESS
    assert not (found.circuit.mask & ~candidates).any()
    assert found.faithfulness["faithfulness"] > 0.5
