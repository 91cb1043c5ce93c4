"""Invariants of the one patching mechanism, on GPT-2-, NeoX-, Llama-style and native models."""

import pytest
import torch
from bridge_reference import node_patched_logits, receiver_fed_corrupted_logits
from conftest import TINY, load_model, random_task

from circuits import evaluation, patching
from circuits.graph import Channel, build
from circuits.model.adapters import Arch, LayerWeights, Norm, Positional, Weights
from circuits.patching import Ablation

ABLATIONS = list(Ablation)
HF = ["random:gpt2-tiny", "random:neox-tiny", "random:llama-tiny"]


def full_logits(model, setup, coef, tokens=None):
    chunk = setup.chunks[0]
    tokens = chunk.task.clean if tokens is None else tokens
    with torch.no_grad():
        return patching.run(model.weights, model.graph, tokens, coef=coef, ablated=chunk.ablated).logits


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_full_circuit_reproduces_clean_logits(tiny, ablation):
    task = random_task(tiny)
    setup = evaluation.prepare(tiny, task, ablation)
    clean = tiny.bridge(task.clean)
    patched = full_logits(tiny, setup, setup.coef(tiny.graph.full_mask()))
    assert (patched - clean).abs().max() <= 1e-4


def test_empty_circuit_under_resample_reproduces_corrupted_logits(tiny):
    task = random_task(tiny)
    setup = evaluation.prepare(tiny, task, Ablation.RESAMPLE)
    patched = full_logits(tiny, setup, setup.coef(tiny.graph.empty_mask()))
    assert (patched - tiny.bridge(task.corrupted)).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", HF)
def test_recorded_empty_metric_equals_the_patched_empty_circuit(spec):
    """Under resample m(∅) is read from the corrupted run prepare() makes anyway; it must equal the
    metric of the empty circuit patched in (padded rows included)."""
    model = load_model(spec)
    task = random_task(model, n=6, vary_lengths=True)
    setup = evaluation.prepare(model, task, Ablation.RESAMPLE, batch_size=4)
    assert all(c.corrupted_logits is not None for c in setup.chunks)
    patched = setup.metric(model.graph.empty_mask()).mean().item()
    assert abs(setup.empty_metric() - patched) <= 1e-5 * max(1.0, abs(patched))


@pytest.mark.parametrize("density", [0.03, 0.5, 0.97])
@pytest.mark.parametrize("stages", [1, 8])
def test_kept_edges_form_equals_the_general_form(tiny, density, stages, monkeypatch):
    """A circuit's evaluation (one variant, no grad: kept senders' sums, token-major, a block of
    layers at a time) equals the general form the other methods run (two variants side by side)."""
    from circuits import patch_sums
    monkeypatch.setattr(patch_sums, "BLOCK_STAGES", stages)
    task = random_task(tiny, vary_lengths=True)
    setup = evaluation.prepare(tiny, task, Ablation.RESAMPLE)
    g = tiny.graph
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0)) < density) & g.allowed
    coef = setup.coef(mask)
    kept = full_logits(tiny, setup, coef)
    general = full_logits(tiny, setup, torch.stack([coef, coef]))[: kept.shape[0]]
    assert (kept - general).abs().max() <= 1e-4


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_patching_all_outgoing_edges_equals_patching_the_node(tiny, ablation):
    task = random_task(tiny, vary_lengths=True)
    setup = evaluation.prepare(tiny, task, ablation)
    g = tiny.graph
    for node in ["input", "a0.h1", f"a{g.arch.n_layers - 1}.h0"] + (["m0"] if g.arch.has_mlp else []):
        s = g.sender_index[node]
        coef = torch.zeros(g.n_senders, g.n_receivers)
        coef[s] = 1.0
        ours = full_logits(tiny, setup, coef * g.allowed)
        theirs = node_patched_logits(tiny, node, task.clean, task.corrupted, ablation, task.valid)
        valid = task.valid
        assert (ours - theirs)[valid].abs().max() <= 1e-4, node


@pytest.mark.parametrize("spec", HF)
def test_patching_all_incoming_edges_equals_feeding_the_corrupted_input(spec):
    model = load_model(spec)
    task = random_task(model)
    setup = evaluation.prepare(model, task, Ablation.RESAMPLE)
    g = model.graph
    last = g.arch.n_layers - 1
    cases = [("a1.h2<q>", "blocks.1.hook_q_input", 2), ("a1.h1<k>" if not g.arch.grouped else "a1.kv1<k>",
              "blocks.1.hook_k_input", 1), ("a0.h3<v>" if not g.arch.grouped else "a0.kv0<v>",
              "blocks.0.hook_v_input", 0 if g.arch.grouped else 3), (f"m{last}", f"blocks.{last}.ln2.hook_in", None),
             ("logits", "ln_final.hook_in", None)]
    for receiver, hook, index in cases:
        r = g.receiver_index[receiver]
        coef = torch.zeros(g.n_senders, g.n_receivers)
        coef[:, r] = 1.0
        ours = full_logits(model, setup, coef * g.allowed)
        theirs = receiver_fed_corrupted_logits(model, hook, index, task.clean, task.corrupted)
        assert (ours - theirs).abs().max() <= 1e-4, receiver


def test_native_model_receivers_fed_corrupted_input():
    """Natively booted models have no split q/k/v hooks: check whole-layer q/k/v, MLP, logits."""
    model = load_model("random:native-tiny")
    task = random_task(model)
    setup = evaluation.prepare(model, task, Ablation.RESAMPLE)
    g = model.graph
    c0, c1 = g.attn_cols[1]
    for cols, hook in ((list(range(c0, c1)), "blocks.1.ln1.hook_in"), ([g.mlp_col[0]], "blocks.0.ln2.hook_in"),
                       ([g.logits_col], "ln_final.hook_in")):
        coef = torch.zeros(g.n_senders, g.n_receivers)
        coef[:, cols] = 1.0
        ours = full_logits(model, setup, coef * g.allowed)
        theirs = receiver_fed_corrupted_logits(model, hook, None, task.clean, task.corrupted)
        assert (ours - theirs).abs().max() <= 1e-4, hook


def test_engine_settings_leave_logits_unchanged(tiny):
    """Recording, gradient taps, prefixes and variant batching change nothing by themselves."""
    task = random_task(tiny)
    setup = evaluation.prepare(tiny, task, Ablation.RESAMPLE)
    w, g = tiny.weights, tiny.graph
    plain = tiny.bridge(task.clean)[torch.arange(len(task)), task.positions]
    with torch.no_grad():
        recorded = patching.run(w, g, task.clean, positions=task.positions, record=True)
    tapped = patching.run(w, g, task.clean, positions=task.positions, taps=True)
    zero = torch.zeros(3, g.n_senders, g.n_receivers)
    chunk = setup.chunks[0]
    with torch.no_grad():
        batched = patching.run(w, g, task.clean, positions=task.positions, coef=zero,
                               ablated=chunk.ablated, prefix=chunk.prefix(1, g))
    for logits in (recorded.logits, tapped.logits.detach(), batched.logits[: len(task)], batched.logits[-len(task):]):
        assert (logits - plain).abs().max() <= 1e-4


def test_prefix_start_equals_full_forward(tiny):
    task = random_task(tiny)
    setup = evaluation.prepare(tiny, task, Ablation.RESAMPLE)
    g = tiny.graph
    coef = torch.zeros(g.n_senders, g.n_receivers)
    c0, c1 = g.attn_cols[1]
    coef[:, c0:c1] = torch.rand(g.n_senders, c1 - c0, generator=torch.Generator().manual_seed(0)) > 0.5
    coef[:, g.logits_col] = 1.0
    coef = coef * g.allowed
    full = setup.metric_of_coef(coef)
    assert torch.allclose(setup.metric_of_coef(coef, start_layer=1), full, atol=1e-5)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_results_do_not_depend_on_batch_size(ablation):
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=6, vary_lengths=True)
    g = model.graph
    mask = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(3)) > 0.5
    whole = evaluation.prepare(model, task, ablation).metric(mask)
    chunked = evaluation.prepare(model, task, ablation, batch_size=2).metric(mask)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_same_seed_same_numbers():
    from circuits.model import loader
    a = loader.load("random:gpt2-tiny", seed=7, check=False)
    b = loader.load("random:gpt2-tiny", seed=7, check=False)
    task = random_task(a)
    mask = a.graph.full_mask()
    mask[:, : a.graph.n_receivers // 2] = False
    m1 = evaluation.prepare(a, task).metric(mask)
    m2 = evaluation.prepare(b, task).metric(mask)
    assert torch.equal(m1, m2)


def micro_model():
    """One attention-only layer, one head, no norm, d=2, identity maps, uniform attention.

    logits[p] = x[p] + mean_{j<=p} x[j]   (input->logits plus the head, whose v reads the input).
    """
    arch = Arch(family="micro", n_layers=1, n_heads=1, n_kv_heads=1, d_model=2, d_head=2, d_mlp=0,
                d_vocab=3, n_ctx=8, norm=Norm.NONE, norm_eps=1e-5, positional=Positional.NONE,
                attn_only=True, attn_scale=1.0)
    eye = torch.eye(2)
    layer = LayerWeights(ln1=(None, None), W_Q=torch.zeros(1, 2, 2), b_Q=torch.zeros(1, 2),
                         W_K=torch.zeros(1, 2, 2), b_K=torch.zeros(1, 2), W_V=eye[None].clone(),
                         b_V=torch.zeros(1, 2), W_O=eye[None].clone(), b_O=torch.zeros(2))
    W_E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
    return Weights(arch, W_E, None, [layer], (None, None), torch.eye(2, 3), None)


def test_micro_model_matches_hand_computation():
    w = micro_model()
    g = build(w.arch)
    clean, corrupted = torch.tensor([[0, 1, 2]]), torch.tensor([[2, 2, 0]])
    x, xc = w.W_E[clean[0]], w.W_E[corrupted[0]]
    mean = lambda v: torch.cumsum(v, 0) / torch.arange(1, 4)[:, None]
    ablated = patching.ablated_outputs(w, g, Ablation.RESAMPLE, corrupted=corrupted)
    run = lambda coef: patching.run(w, g, clean, coef=coef, ablated=ablated).logits[0, :, :2]
    coef = torch.zeros(g.n_senders, g.n_receivers)
    assert torch.allclose(run(coef), x + mean(x))
    v = g.receiver_index["a0.h0<v>"]
    coef[0, v] = 1.0                                       # input->a0.h0<v> ablated
    assert torch.allclose(run(coef), x + mean(xc))
    coef = torch.zeros(g.n_senders, g.n_receivers)
    coef[g.sender_index["a0.h0"], g.logits_col] = 1.0      # a0.h0->logits ablated
    assert torch.allclose(run(coef), x + mean(xc))
    coef[0, g.logits_col] = 1.0                            # both edges into the logits
    assert torch.allclose(run(coef), xc + mean(xc))
    zero = patching.ablated_outputs(w, g, Ablation.ZERO, corrupted=corrupted)
    coef = torch.zeros(g.n_senders, g.n_receivers)
    coef[0, v] = 0.5                                       # half-ablated edge: linear in the coefficient
    got = patching.run(w, g, clean, coef=coef, ablated=zero).logits[0, :, :2]
    assert torch.allclose(got, x + 0.5 * mean(x))
